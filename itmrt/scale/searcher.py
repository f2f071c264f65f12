"""Opening a sharded gallery for search - in this process or on Ray - and ``itmrt serve``'s searcher over it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.tiled import TopK
from itmrt.scale.layout import read_sharded_gallery
from itmrt.scale.local import LocalShards
from itmrt.scale.ray_search import RayOptions, RayShards
from itmrt.scale.shard import SearchRequest
from itmrt.serve.searcher import RuntimeSearcher

Shards = LocalShards | RayShards


def open_shards(gallery: str | Path, *, ray: RayOptions | None = None, verify: bool = False,
                **load_options: Any) -> Shards:
    """A sharded gallery opened for search: its bundle loaded here (``load_options`` as
    :func:`itmrt.runtime.load` takes them) and its shards in this process, or on Ray actors with ``ray``.

    The result's ``runtime`` encodes captions; ``search(captions, SearchRequest(...))`` answers;
    ``close()`` ends the actors (and the runtime's GPU resources).
    """
    from itmrt.runtime.api import load

    sharded = read_sharded_gallery(gallery)
    runtime = load(sharded.bundle_path, **load_options)
    try:
        if ray is None:
            return LocalShards(runtime, sharded, verify)
        return RayShards(runtime, sharded, ray, load_options, verify)
    except BaseException:
        runtime.close()
        raise


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

    def warmup(self) -> float:
        return self.shards.warmup(self.shortlist)

    def top_k(self, captions: CaptionEmbeddings, k: int) -> TopK:
        shortlist = None if self.shortlist is None else max(self.shortlist, k)
        result = self.shards.search(captions, SearchRequest(k=k, shortlist=shortlist))
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
