"""``itmrt serve``'s searcher over a sharded gallery (:mod:`itmrt.scale`): shards in this process or on Ray."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.tiled import TopK
from itmrt.scale import RayOptions, SearchRequest, open_shards
from itmrt.scale.open_gallery import Shards
from itmrt.serve.searcher import RuntimeSearcher

log = logging.getLogger("itmrt.serve")


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

    def files_changed(self) -> str | None:
        """Why a memory-mapped shard file is no longer the one opened, or None (shards copied into memory, or
        on Ray actors, which check their own before each search: None)."""
        changed = getattr(self.shards, "files_changed", None)
        return changed() if changed is not None else None

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
                          copy_mb: float = 0.0, **load_options: Any) -> ShardedSearcher:
    """:func:`open_shards`, wrapped for ``itmrt serve``; ``copy_mb``: copy the shards into memory when their
    files take at most this many MB (else they stay mapped and are checked before each search)."""
    shards = open_shards(gallery, ray=ray, warn=warn, copy_mb=copy_mb, **load_options)
    if ray is None:
        held = getattr(shards, "bytes", 0) / (1 << 20)
        log.info("sharded gallery: %d shards, %.1f MB, %s", len(shards.gallery.shards), held,
                 "copied into memory" if getattr(shards, "in_memory", False) else
                 f"memory-mapped (over --copy-shards-mb {copy_mb:g}); files checked before each search")
    try:
        return ShardedSearcher(shards, on_long, shortlist, warn)
    except BaseException:
        shards.close()
        shards.runtime.close()
        raise
