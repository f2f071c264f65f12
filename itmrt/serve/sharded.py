"""``itmrt serve``'s searcher over a sharded gallery (:mod:`itmrt.scale`): shards in this process or on Ray.

A sharded gallery is swapped like a one-folder one (:mod:`itmrt.serve.swap`):
:class:`ShardedSource` watches the gallery's top folder (``itmrt index
--append`` adds shard folders and replaces ``gallery.json`` in one rename) and
the files of every shard folder (a shard file written in place, then restored:
a service reading its shards from their files stopped answering at the change
and answered again only after SIGHUP), and on a change, SIGHUP or the repository load endpoint opens the version on disk
whole - every shard verified, the bundle's runtime kept when the image encoder
that made the gallery is still the one loaded - before the worker answers from
it. The previous version's shards (their files, Ray actors) are let go once the
new one is in use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.tiled import TopK
from itmrt.scale import RayOptions, SearchRequest
from itmrt.scale.layout import ShardedGallery, read_sharded_gallery
from itmrt.scale.open_gallery import Shards, shards_with
from itmrt.serve.searcher import RuntimeSearcher
from itmrt.serve.swap import FolderState, RuntimeSource, folder_state

log = logging.getLogger("itmrt.serve")


class ShardedSearcher(RuntimeSearcher):
    """``itmrt serve``'s searcher over a sharded gallery: captions are tokenised and encoded as
    :class:`~itmrt.serve.searcher.RuntimeSearcher` does, the top-k come from every shard, merged.

    ``shortlist``: rerank each shard's K best candidates (K grows to a request's top_k when that is larger)
    instead of scoring every image; ``regions``: how the region index is searched (:class:`SearchRequest`'s
    region fields; unset ones: each shard's recorded values). Answers name the version by the start of the top
    document's sha256.
    """

    def __init__(self, shards: Shards, on_long: str = "refuse", shortlist: int | None = None,
                 warn: Callable[[str], None] | None = None, regions: dict[str, int] | None = None) -> None:
        super().__init__(shards.runtime, shards.gallery, on_long, warn=warn)
        self.shards, self.shortlist, self.regions = shards, shortlist, dict(regions or {})
        self.version = shards.gallery.sha256[:16] or None
        self.index_stages: dict[str, float] = {}  # the last search's region index stages (for /metrics)

    def warmup(self) -> float:
        return self.shards.warmup(self.shortlist)

    def files_changed(self) -> str | None:
        """Why a shard file read while searching is no longer the one opened, or None (shards copied into
        memory, or on Ray actors, which check their own before and after each search: None)."""
        changed = getattr(self.shards, "files_changed", None)
        return changed() if changed is not None else None

    def top_k(self, captions: CaptionEmbeddings, k: int) -> TopK:
        shortlist = None if self.shortlist is None else max(self.shortlist, k)
        result = self.shards.search(captions, SearchRequest(k=k, shortlist=shortlist, **self.regions))
        self.index_stages = dict(result.stage_seconds)
        assert result.t2i is not None
        return result.t2i

    def contents(self) -> set[str]:
        """The sha256 of every shard's embeddings searched in this process (none on Ray actors)."""
        shards = getattr(self.shards, "shards", [])
        return {shard.gallery.manifest.embeddings.sha256 for shard in shards}

    def close(self) -> None:
        """End the shards' actors and free the runtime."""
        self.shards.close()
        self.shards.runtime.close()

    def discard(self) -> None:
        self.close()


class ShardedSource(RuntimeSource):
    """A sharded gallery on disk and how the service opens it whole (see the module docstring)."""

    def __init__(self, gallery: Path, load_options: dict[str, Any], on_long: Any,
                 warn: Callable[[str], None] | None, ray: RayOptions | None = None, shortlist: int | None = None,
                 copy_mb: float = 0.0, regions: dict[str, int] | None = None) -> None:
        super().__init__(gallery, None, load_options, on_long, warn)
        self.ray, self.shortlist, self.copy_mb, self.regions = ray, shortlist, copy_mb, dict(regions or {})

    def state(self) -> FolderState:
        return folder_state(self.gallery, subfolders=True)

    def open(self, previous: Any = None) -> tuple[RuntimeSearcher, bool, Callable[[], None] | None]:
        """(searcher, whether it needs a warm-up, what to let go of once it is in use)."""
        from itmrt.runtime import load

        sharded = read_sharded_gallery(self.gallery)
        kept = getattr(previous, "runtime", None)
        if kept is not None and not self._fits(sharded, kept):
            kept = None
        runtime = kept if kept is not None else load(sharded.bundle_path, warn=self.warn, **self.load_options)
        try:
            shards = shards_with(runtime, sharded, self.ray, self.load_options, copy_mb=self.copy_mb)
            try:
                searcher = ShardedSearcher(shards, self.on_long, self.shortlist, self.warn, self.regions)
            except BaseException:
                shards.close()
                raise
        except BaseException:
            if kept is None:
                runtime.close()
            raise
        _log_opened(shards, self.copy_mb)
        old = getattr(previous, "shards", None)
        old_runtime = getattr(previous, "runtime", None) if kept is None else None

        def retire() -> None:
            if old is not None:
                _hand_over_ray(old, shards)
                old.close()
            if old_runtime is not None:
                old_runtime.close()

        # A fresh runtime, or fresh actors, warm up on the worker before the first answer.
        return searcher, kept is None or self.ray is not None, retire

    def _fits(self, gallery: Any, runtime: Any) -> bool:
        assert isinstance(gallery, ShardedGallery)
        try:
            same = gallery.bundle_path.resolve() == runtime.bundle.path.resolve()
            if same:
                gallery.check_bundle(runtime.bundle)
        except Exception:  # noqa: BLE001 - another image encoder: the bundle on disk is loaded instead
            return False
        return same


def _hand_over_ray(old: Any, new: Any) -> None:
    """The Ray connection this service made belongs to the newest shards (closing the old ones keeps it)."""
    old_link, new_link = getattr(old, "connection", None), getattr(new, "connection", None)
    if old_link is not None and new_link is not None:
        new_link.owned, old_link.owned = old_link.owned or new_link.owned, False


def _log_opened(shards: Shards, copy_mb: float) -> None:
    if getattr(shards, "in_memory", None) is None:  # on Ray actors
        return
    held = getattr(shards, "bytes", 0) / (1 << 20)
    log.info("sharded gallery: %d shards, %.1f MB, %s", len(shards.gallery.shards), held,
             "copied into memory" if getattr(shards, "in_memory", False) else
             f"read from its files (over --copy-shards-mb {copy_mb:g}); files checked at each search")


def open_sharded_searcher(gallery: str | Path, *, ray: RayOptions | None = None, on_long: str = "refuse",
                          shortlist: int | None = None, warn: Callable[[str], None] | None = None,
                          copy_mb: float = 0.0, **load_options: Any) -> ShardedSearcher:
    """A sharded gallery opened for ``itmrt serve`` (``load_options`` as :func:`itmrt.runtime.load` takes them);
    ``copy_mb``: copy the shards into memory when their files take at most this many MB (else their embeddings
    are read by position and checked at each search)."""
    source = ShardedSource(Path(gallery), load_options, on_long, warn, ray, shortlist, copy_mb)
    searcher = source.open(None)[0]
    assert isinstance(searcher, ShardedSearcher)
    return searcher
