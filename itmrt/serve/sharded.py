"""``itmrt serve``'s searcher over a sharded gallery (:mod:`itmrt.scale`): shards in this process or on Ray."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.tiled import TopK
from itmrt.scale import RayOptions, SearchRequest, open_shards
from itmrt.scale.searcher import Shards
from itmrt.serve.searcher import RuntimeSearcher


class ShardedSearcher(RuntimeSearcher):
    """``itmrt serve``'s searcher over a sharded gallery: captions are tokenised and encoded as
    :class:`~itmrt.serve.searcher.RuntimeSearcher` does, the top-k come from every shard, merged.

    ``shortlist``: rerank each shard's K best candidates (K grows to a request's top_k when that is larger)
    instead of scoring every image.
    """

    def __init__(self, shards: Shards, on_long: str = "refuse", shortlist: int | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        super().__init__(shards.runtime, shards.gallery, on_long, warn=warn)
        self.shards, self.shortlist = shards, shortlist
        self.index_stages: dict[str, float] = {}  # the last search's region index stages (for /metrics)

    def warmup(self) -> float:
        return self.shards.warmup(self.shortlist)

    def top_k(self, captions: CaptionEmbeddings, k: int) -> TopK:
        shortlist = None if self.shortlist is None else max(self.shortlist, k)
        result = self.shards.search(captions, SearchRequest(k=k, shortlist=shortlist))
        self.index_stages = dict(result.stage_seconds)
        assert result.t2i is not None
        return result.t2i

    def close(self) -> None:
        """End the shards' actors and free the runtime."""
        self.shards.close()
        self.shards.runtime.close()


def open_sharded_searcher(gallery: str | Path, *, ray: RayOptions | None = None, on_long: str = "refuse",
                          shortlist: int | None = None, warn: Callable[[str], None] | None = None,
                          **load_options: Any) -> ShardedSearcher:
    """:func:`open_shards`, wrapped for ``itmrt serve``."""
    shards = open_shards(gallery, ray=ray, warn=warn, **load_options)
    try:
        return ShardedSearcher(shards, on_long, shortlist, warn)
    except BaseException:
        shards.close()
        shards.runtime.close()
        raise
