"""``itmrt infer`` on a sharded gallery: its shards searched in this process, or on Ray with ``--ray``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def search_sharded(request: Any, captions: list[str], top_k: int, scores_out: Path | None, shortlist: int | None,
                   progress: bool, out: Path, timer: Any) -> tuple[int, str]:
    """Open the shards (``request``: infer's BundleRequest), encode, search, merge and write, each a stage of
    ``timer``; the number of images and how they were searched."""
    from itmrt.cli.infer_cmd import _write_outputs
    from itmrt.cli.progress import progress_bars
    from itmrt.errors import ItmrtError
    from itmrt.runtime.one_caption import FEW_CAPTIONS
    from itmrt.scale.open_gallery import open_shards
    from itmrt.scale.shard import SearchRequest, require_shortlist

    if request.images is not None:
        raise ItmrtError("give either a sharded gallery or --images, not both")
    load_options = request.runtime.load_keywords()  # the runtime group, as keywords the Ray actors take too
    search = SearchRequest(top_k, shortlist, request.directions, scores_out is not None, **request.regions).check()
    require_shortlist(request.regions, shortlist)
    with timer.stage("load"):  # the bundle here, and each shard where it is searched (Ray: the actors start)
        shards = open_shards(request.gallery, ray=request.ray, **load_options)
    try:
        with timer.stage("kernels"):  # a few captions are the one-caption scorer's, as in a single gallery
            few = shards.runtime.one_caption is not None and len(captions) <= FEW_CAPTIONS
            if shards.runtime.fused is not None and not few:
                shards.runtime.fused.warm_kernels()
        with timer.stage("encode_captions"):
            encoded = shards.runtime.encode_captions(captions)
        with timer.stage("score"), progress_bars(progress) as bars:
            result = shards.search(encoded, search, progress=bars("search (shards)", len(shards.gallery.shards)))
        with timer.stage("write"):
            ids = shards.gallery.ids  # every image's line names it: every shard's ids are read
            _write_outputs(out, scores_out, captions, result.t2i, result.i2t, result.scores, request.outputs.overwrite,
                           None if ids is None else list(ids))
    finally:
        shards.close()
        shards.runtime.close()
    where = "Ray actors" if request.ray is not None else "this process"
    scoring = f"shortlist of {shortlist} per shard and query" if shortlist is not None else "full scoring"
    return len(shards.gallery), f"{len(shards.gallery.shards)} shards in {where}, {scoring}"
