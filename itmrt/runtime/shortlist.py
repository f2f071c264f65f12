"""Shortlist retrieval: a cheap global score picks K candidates per query, the cross-attention scorer reranks them.

Full cross-attention scoring costs one scorer evaluation per (image, caption)
pair, so a gallery of N images costs N evaluations per caption. The shortlist
stage cuts that to about K per query:

1. **Global score.** Each caption becomes the mean of its l2-normalised token
   embeddings (real tokens only, ``<start>``/``<end>`` included, as the scorer
   sees them), re-normalised; each image the mean of its l2-normalised region
   embeddings, re-normalised. The global score is their cosine: one matrix
   product of ``[Q, d]`` by ``[d, N]``, from what the encoders already produce
   (no new graph). Why it is a sensible proxy for NAAF / SCAN: both start
   from the word-region cosine matrix ``s_ij`` and aggregate it with
   attention weights; ``mean(u) . mean(v) = (1/mn) sum_ij s_ij`` is the same
   matrix aggregated with *uniform* weights, i.e. the cross-attention score
   with its attention flattened. It ranks a caption's true images high
   whenever many of its words match many regions, which is what the learned
   embedding space is trained to make true; the recall it costs is measured
   by ``benchmarks/bench_shortlist.py``.
2. **Candidates.** Per query, the top-K of the global score (ties by the lower
   index), computed for blocks of queries so the ``[Q, N]`` global matrix never
   exists whole.
3. **Rerank.** Queries are grouped so that a group's candidate union stays
   small (queries sorted by their best candidate, so e.g. the five captions
   of one image land together; a group grows while its union is at most
   ``UNION_FACTOR x K``, or while growing lowers its cost per query counting
   a fixed overhead per scorer call); the scorer scores the union x group
   sub-matrix with the runtime's usual tiled machinery, and each query keeps
   only its own candidates' scores. The work per query grows with K (and
   the call overhead), not with the gallery size.

With K = the gallery size the candidates are every item and the result is
full scoring's. Global models (CMPM) need no shortlist: their full score is
already one matrix product.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.limits import is_integer
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.tiled import StreamingTopK, TopK

UNION_FACTOR = 2
"""A rerank group grows while the union of its candidates is at most this many times K."""
MAX_GROUP = 1024
"""Most queries per rerank group (the scorer tiles bigger sub-matrices itself; this bounds the bookkeeping)."""
CALL_OVERHEAD_PAIRS = 512
"""The fixed cost of one scorer call, in pair evaluations (measured with one thread: ~0.5 ms per call for the
fused and the graph scorer, ~50 pairs at their ~95K / ~60K pairs/s; set generously, since contended cores make
a call's start far dearer - two contended threads measured ~25 ms)."""
GLOBAL_BLOCK_BYTES = 32 << 20
"""Memory for one block of the global score matrix while picking candidates."""
_EPS = 1e-8

ScoreMatrix = Callable[[np.ndarray, CaptionEmbeddings], np.ndarray]
"""``(image embeddings [Ni, n, d], captions) -> [Ni, Nc]`` cross-attention scores (the runtime's scorer)."""
ScoreRows = Callable[[np.ndarray, CaptionEmbeddings], "np.ndarray | None"]
"""``(image ids [Ni], captions) -> [Ni, Nc]`` scores of those images of the gallery, or None where it does not
apply (the one-caption scorer: :meth:`itmrt.runtime.api.Runtime.score_images`)."""


def _l2norm(x: np.ndarray) -> np.ndarray:
    return x / (np.sqrt((x * x).sum(axis=-1, keepdims=True)) + _EPS)


def caption_global_vectors(captions: CaptionEmbeddings) -> np.ndarray:
    """``[N, d]`` l2-normalised means of each caption's l2-normalised token embeddings (real tokens only)."""
    if not captions.token_level or captions.offsets is None:
        raise ItmrtError("the shortlist needs token-level caption embeddings (a cross-attention bundle: NAAF or SCAN)")
    lengths = captions.lengths.astype(np.int64)
    if len(lengths) == 0:
        raise ItmrtError("no captions to shortlist")
    if (lengths < 1).any():
        raise ItmrtError("a caption has no tokens; every caption needs at least one")
    tokens = _l2norm(np.asarray(captions.vectors, dtype=np.float32))
    starts = captions.offsets[:-1].astype(np.int64)
    contiguous = np.array_equal(captions.offsets[1:] - captions.offsets[:-1], lengths)
    if contiguous:
        sums = np.add.reduceat(tokens, starts, axis=0) if len(tokens) else np.zeros((0, tokens.shape[1]), np.float32)
    else:
        sums = np.stack([tokens[s : s + m].sum(axis=0) for s, m in zip(starts, lengths)])
    return _l2norm((sums / lengths[:, None]).astype(np.float32))


def image_global_vectors(images: np.ndarray, batch: int = 1024) -> np.ndarray:
    """``[N, d]`` l2-normalised means of each image's l2-normalised region embeddings (read in batches: memmaps)."""
    if images.ndim != 3:
        raise ItmrtError(
            f"the shortlist needs region embeddings (images x regions x d), not shape {tuple(images.shape)}"
        )
    n = int(images.shape[0])
    out = np.empty((n, int(images.shape[2])), dtype=np.float32)
    for start in range(0, n, batch):
        regions = _l2norm(np.asarray(images[start : start + batch], dtype=np.float32))
        out[start : start + batch] = _l2norm(regions.mean(axis=1))
    return out


def top_candidates(queries: np.ndarray, items: np.ndarray, shortlist: int,
                   block_bytes: int = GLOBAL_BLOCK_BYTES) -> np.ndarray:
    """``[Q, K]`` indices of each query's K best items by cosine (best first; ties by the lower index)."""
    n_items = int(items.shape[0])
    k = min(shortlist, n_items)
    out = np.empty((int(queries.shape[0]), k), dtype=np.int64)
    rows = max(1, block_bytes // max(1, 4 * n_items))
    everything = np.arange(n_items)
    for q0 in range(0, len(queries), rows):
        block = queries[q0 : q0 + rows] @ items.T
        best = StreamingTopK(len(block), k)
        best.update(slice(None), block, everything)
        out[q0 : q0 + len(block)] = best.indices
    return out


def group_queries(
    candidates: np.ndarray,
    union_factor: int = UNION_FACTOR,
    max_group: int = MAX_GROUP,
    call_overhead_pairs: int = CALL_OVERHEAD_PAIRS,
) -> list[np.ndarray]:
    """Queries in rerank groups (each query in one group) that keep the scorer's work near the K pairs per query.

    A group costs ``call_overhead_pairs + union x members`` pair evaluations.
    Queries are visited in order of their best candidate, so queries that want
    the same items (the captions of one image) come together; a query joins
    the current group while the union stays within ``union_factor x K`` or
    while joining lowers the group's cost per query (many small groups would
    pay the per-call overhead over and over).
    """
    k = candidates.shape[1]
    limit = max(k, union_factor * k)
    order = np.lexsort((np.arange(len(candidates)), candidates[:, 0]))
    groups: list[np.ndarray] = []
    current: list[int] = []
    union: set[int] = set()

    def per_query(union_size: int, members: int) -> float:
        return (call_overhead_pairs + union_size * members) / members

    for q in order:
        wanted = union.union(candidates[q].tolist())
        g = len(current)
        joins = g == 0 or (
            g < max_group and (len(wanted) <= limit or per_query(len(wanted), g + 1) <= per_query(len(union), g))
        )
        if not joins:
            groups.append(np.array(current, dtype=np.int64))
            current, wanted = [], set(candidates[q].tolist())
        current.append(int(q))
        union = wanted
    if current:
        groups.append(np.array(current, dtype=np.int64))
    return groups


def _best_of(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of one query's candidate scores, best first, ties by the lower index."""
    clean = np.where(np.isnan(scores), -np.inf, scores)
    order = np.lexsort((ids, -clean))[:k]
    return ids[order], scores[order]


def rerank_text_to_image(score_matrix: ScoreMatrix, images: np.ndarray, captions: CaptionEmbeddings,
                         candidates: np.ndarray, k: int, score_rows: ScoreRows | None = None) -> TopK:
    """Per caption, its candidate images ``candidates [Nc, K]`` reranked by the scorer; the best ``k``.

    ``score_rows``: scores a group's candidates by their image ids where it can (reading their cached per-image
    constants), else ``score_matrix`` scores their embeddings."""
    keep = min(k, candidates.shape[1])
    indices = np.full((len(captions), keep), -1, dtype=np.int64)
    scores = np.full((len(captions), keep), -np.inf, dtype=np.float32)
    for group in group_queries(candidates):
        union = np.unique(candidates[group])
        block = score_rows(union, captions.take(group)) if score_rows is not None else None
        if block is None:
            block = score_matrix(np.asarray(images[union]), captions.take(group))  # [len(union), len(group)]
        for column, caption in enumerate(group):
            wanted = candidates[caption]
            rows = np.searchsorted(union, wanted)
            indices[caption], scores[caption] = _best_of(block[rows, column], wanted, keep)
    return TopK(indices, scores)


def rerank_image_to_text(score_matrix: ScoreMatrix, images: np.ndarray, captions: CaptionEmbeddings,
                         candidates: np.ndarray, k: int) -> TopK:
    """Per image, its candidate captions ``candidates [Ni, K]`` reranked by the scorer; the best ``k``."""
    n_images = int(images.shape[0])
    keep = min(k, candidates.shape[1])
    indices = np.full((n_images, keep), -1, dtype=np.int64)
    scores = np.full((n_images, keep), -np.inf, dtype=np.float32)
    for group in group_queries(candidates):
        union = np.unique(candidates[group])
        block = score_matrix(np.asarray(images[np.sort(group)]), captions.take(union))  # [len(group), len(union)]
        image_rows = np.argsort(np.argsort(group))  # group member -> its row in the sorted image block
        for member, image in enumerate(group):
            wanted = candidates[image]
            columns = np.searchsorted(union, wanted)
            indices[image], scores[image] = _best_of(block[image_rows[member], columns], wanted, keep)
    return TopK(indices, scores)


def check_shortlist(shortlist: int, k: int) -> None:
    """One-line errors for a shortlist that cannot hold the ``k`` results asked for."""
    if not is_integer(shortlist):
        raise ItmrtError(f"--shortlist must be an integer, not {shortlist!r}")
    if shortlist < 1:
        raise ItmrtError(f"--shortlist must be at least 1, not {shortlist}")
    if shortlist < k:
        raise ItmrtError(
            f"--shortlist {shortlist} is smaller than --top-k {k}; the shortlist must hold at least k candidates"
        )


def shortlist_search(
    score_matrix: ScoreMatrix,
    images: np.ndarray,
    captions: CaptionEmbeddings,
    k: int,
    shortlist: int,
    directions: tuple[str, ...] = ("t2i", "i2t"),
    image_vectors: np.ndarray | None = None,
    score_rows: ScoreRows | None = None,
) -> dict[str, TopK]:
    """Shortlisted top-``k`` per caption ("t2i") and/or per image ("i2t").

    ``image_vectors``: the images' global vectors if already computed (a
    gallery's, cached by the runtime); computed here otherwise. ``score_rows``:
    see :func:`rerank_text_to_image`.
    """
    check_shortlist(shortlist, k)
    if int(images.shape[0]) == 0 or len(captions) == 0:
        raise ItmrtError("nothing to score: no images or no captions")
    caption_vectors = caption_global_vectors(captions)
    if image_vectors is None:
        image_vectors = image_global_vectors(images)
    found: dict[str, TopK] = {}
    if "t2i" in directions:
        candidates = top_candidates(caption_vectors, image_vectors, shortlist)
        found["t2i"] = rerank_text_to_image(score_matrix, images, captions, candidates, k, score_rows)
    if "i2t" in directions:
        candidates = top_candidates(image_vectors, caption_vectors, shortlist)
        found["i2t"] = rerank_image_to_text(score_matrix, images, captions, candidates, k)
    return found
