"""Opening a sharded gallery for search: its shards in this process or on Ray actors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from itmrt.errors import ItmrtError
from itmrt.limits import check_flag
from itmrt.scale.layout import ShardedGallery, read_sharded_gallery
from itmrt.scale.local import LocalShards, check_copy_mb
from itmrt.scale.ray_search import RayOptions, RayShards

Shards = LocalShards | RayShards


def open_shards(gallery: str | Path, *, ray: RayOptions | None = None, verify: bool = True, copy_mb: float = 0.0,
                **load_options: Any) -> Shards:
    """A sharded gallery opened for search: its bundle loaded here (``load_options`` as
    :func:`itmrt.runtime.load` takes them) and its shards in this process, or on Ray actors with ``ray``.

    The result's ``runtime`` encodes captions; ``search(captions, SearchRequest(...))`` answers;
    ``close()`` ends the actors (and the runtime's GPU resources). ``copy_mb``: shards in this process are
    copied into memory when their files take at most this many MB (:class:`~itmrt.scale.local.LocalShards`).
    """
    from itmrt.runtime.api import load

    check_open_options(ray, verify, copy_mb)
    sharded = read_sharded_gallery(gallery)
    runtime = load(sharded.bundle_path, **load_options)
    try:
        return shards_with(runtime, sharded, ray, load_options, verify, copy_mb)
    except BaseException:
        runtime.close()
        raise


def shards_with(runtime: Any, sharded: ShardedGallery, ray: RayOptions | None, load_options: dict[str, Any],
                verify: bool = True, copy_mb: float = 0.0) -> Shards:
    """``sharded``'s shards opened for ``runtime`` (already loaded: a running service keeps its own across
    versions of the gallery), in this process or on Ray actors. The options are checked by its callers
    (:func:`open_shards`, ``ServeOptions``) before anything is loaded."""
    if ray is None:
        return LocalShards(runtime, sharded, verify, copy_mb=copy_mb)
    return RayShards(runtime, sharded, ray, load_options, verify)


def check_open_options(ray: object, verify: object, copy_mb: object) -> None:
    """The keywords of :func:`open_shards` checked before the bundle is loaded (a string or a list failed in a
    comparison once the bundle was open, a ``ray`` address given as text as a missing attribute)."""
    if ray is not None and not isinstance(ray, RayOptions):
        raise ItmrtError(f"ray must be an itmrt.scale.RayOptions (e.g. RayOptions(address='auto')) or None, "
                         f"not {ray!r}")
    check_flag(verify, "verify")
    check_copy_mb(copy_mb)
    if ray is not None:
        ray.check()
