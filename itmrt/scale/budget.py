"""A search with a budget: the images reranked are chosen over every shard together, not K per shard.

Three steps, each of them the same whether the shards are searched in this
process (:class:`itmrt.scale.local.LocalShards`) or by Ray actors
(:class:`itmrt.scale.ray_search.RayShards`, one round of calls per shard step):

1. :func:`shard_estimates`, in each shard: its best images by the region
   index's estimate, with the estimates (on compact storage, the residual
   stage's: the same kind of estimate in every shard);
2. :func:`pool_budget`, once: each caption's ``budget`` best of every shard's
   (ties by the lower gallery row);
3. :func:`score_picked`, in each shard: the pooled images that lie in it,
   scored exactly; then :func:`merge_budget`, once: each caption's best ``k``.

Since each shard scores its own images in both places, a search on Ray gives
the answer of the same search in one process, score for score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.tiled import StreamingTopK, TopK
from itmrt.scale.region_search import ProbeCache
from itmrt.scale.shard import OpenShard, SearchRequest, forgetting_constants_on_change, score_estimate

NEEDS_REGIONS = ("--budget needs a gallery whose every shard has a region index (--shortlist-index regions) and a "
                 "cross-attention bundle")

Picked = tuple[np.ndarray, np.ndarray]
"""Gallery rows and their exact scores, for one caption in one shard."""


def shard_estimates(shard: OpenShard, runtime: Any, captions: CaptionEmbeddings, request: SearchRequest,
                    probes: ProbeCache | None) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 in one shard: each caption's ``budget`` best images of the shard by the region index's estimate (on
    compact storage, at most those its residual stage re-estimated, by that estimate), ``(gallery rows [Q, b],
    estimates [Q, b])`` (the shard's files checked first)."""
    if shard.regions is None or not captions.token_level:
        raise ItmrtError(NEEDS_REGIONS)
    assert request.budget is not None
    if shard.guard is not None:
        shard.guard.check()
    nprobe = request.nprobe if request.nprobe is not None else shard.regions.nprobe
    embeddings = shard.gallery.embeddings
    rescore = shard.regions.default_rescore(request.rescore, embeddings, pooled=True)
    # where the residual stage runs, a shard offers the images it re-estimated (at most): the gallery's best are
    # chosen by comparable estimates, and the stage's work per query stays the split of one budget
    keep = min(request.budget, rescore or request.budget, shard.regions.images)
    estimates = np.empty((len(captions), keep), dtype=np.float32)
    rows = shard.regions.image_candidates(
        captions, score_estimate(runtime), nprobe, keep, int(runtime.options.threads or 0), embeddings, rescore,
        probes=probes,
        refine=request.refine, prefilter=shard.regions.default_prefilter(request.prefilter), estimates=estimates)
    return rows + shard.record.first, estimates


def pool_budget(found: list[tuple[np.ndarray, np.ndarray]], request: SearchRequest) -> list[np.ndarray]:
    """Step 2: from every shard's ``(rows, estimates)`` (any order), each caption's ``budget`` best rows by
    estimate (ties by the lower row), sorted."""
    assert request.budget is not None
    rows, estimates = (np.concatenate(part, axis=1) for part in zip(*found))
    picks = []
    for caption in range(len(rows)):
        chosen = StreamingTopK(1, min(request.budget, rows.shape[1]))
        chosen.update(slice(None), estimates[caption][None, :], rows[caption])
        picks.append(np.sort(chosen.indices[0]))
    return picks


def score_picked(shard: OpenShard, runtime: Any, captions: CaptionEmbeddings,
                 picks: list[np.ndarray]) -> list[Picked]:
    """Step 3 in one shard: for each caption, the rows of ``picks`` (its pooled gallery rows) that lie in this
    shard and their exact scores, one scorer call per caption (the one-caption scorer by their rows, reading the
    shard's cached constants where it holds them); the shard's files checked before and after."""
    with forgetting_constants_on_change(runtime):
        return _score_picked(shard, runtime, captions, picks)


def _score_picked(shard: OpenShard, runtime: Any, captions: CaptionEmbeddings,
                  picks: list[np.ndarray]) -> list[Picked]:
    if shard.guard is not None:
        shard.guard.check()
    first, count = shard.record.first, shard.record.images
    score_rows = runtime.rows_scorer(shard.gallery)
    out: list[Picked] = []
    for caption, rows in enumerate(picks):
        mine = rows[(rows >= first) & (rows < first + count)]
        scores = np.empty(0, dtype=np.float32)
        if len(mine):
            one = captions.take([caption])
            block = score_rows(mine - first, one) if score_rows is not None else None
            if block is None:
                block = runtime.score(np.asarray(shard.gallery.embeddings[mine - first], dtype=np.float32), one)
            scores = np.asarray(block)[:, 0]
        out.append((mine, np.asarray(scores, dtype=np.float32)))
    if shard.guard is not None:  # a file rewritten in place while it was read: its answer is not given
        shard.guard.check()
    return out


def merge_budget(parts: list[list[Picked]], request: SearchRequest) -> tuple[TopK, int]:
    """Each caption's best ``k`` over every shard's scored picks (``parts``: per shard, in any order), ties by the
    lower row; and the pairs scored."""
    captions = len(parts[0]) if parts else 0
    rows = [np.concatenate([part[caption][0] for part in parts]) for caption in range(captions)]
    scores = [np.concatenate([part[caption][1] for part in parts]) for caption in range(captions)]
    widest = max((len(found) for found in rows), default=0)
    best = StreamingTopK(captions, max(1, min(request.k, widest)))
    for caption in range(captions):
        if len(rows[caption]):
            best.update(slice(caption, caption + 1), scores[caption][None, :], rows[caption])
    return best.result(), sum(len(found) for found in rows)
