"""Tiled scoring of any number of images against any number of captions, with streaming top-k.

The score matrix is computed in tiles of ``Bi`` images x ``Bc`` captions. A
cross-attention scorer holds a handful of ``Bi x Bc x L x n`` float32
intermediates per tile (similarities, shifted values, weights...), so the tile
is sized from a memory budget in bytes rather than a pair count. As each tile
finishes, its scores are merged into the running top-k of every image (its best
captions, i2t) and of every caption (its best images, t2i); the full matrix is
kept only when asked for.

Ties are ordered by the lower index, exactly as a stable descending sort of
the full matrix orders them, so tiled and full rankings agree even for
duplicate captions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from itmrt.bundle.names import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS, LENGTHS
from itmrt.errors import ItmrtError
from itmrt.limits import check_top_k
from itmrt.runtime.backends import Backend
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.options import DEFAULT_BUDGET_BYTES

INTERMEDIATES_PER_PAIR = 8
"""Live ``L x n`` float32 arrays per (image, caption) pair in a cross-attention tile (a generous estimate)."""

Progress = Callable[[int], None]


@dataclass
class TopK:
    """Best ``k`` candidates per query, best first: indices ``[Q, k]`` (-1 = none) and scores ``[Q, k]``."""

    indices: np.ndarray
    scores: np.ndarray

    @classmethod
    def none(cls, queries: int) -> TopK:
        """No candidates for each of ``queries`` queries (a direction not searched)."""
        return cls(np.empty((queries, 0), dtype=np.int64), np.empty((queries, 0), dtype=np.float32))


def check_finite_scores(scores: np.ndarray, remedy: str = "check the bundle with `itmrt check`") -> None:
    """Refuse NaN or infinite scores: a ranking of them would look like a result and mean nothing."""
    if not np.isfinite(scores).all():
        raise ItmrtError(f"the scorer gave NaN or infinite scores (its graph or its inputs are broken); {remedy}")


class StreamingTopK:
    """Running top-k per row, merged from candidate blocks as they arrive."""

    def __init__(self, rows: int, k: int) -> None:
        self.k = check_top_k(k)
        self.scores = np.full((rows, k), -np.inf, dtype=np.float32)
        self.indices = np.full((rows, k), -1, dtype=np.int64)

    def update(self, rows: slice | np.ndarray, scores: np.ndarray, candidates: np.ndarray) -> None:
        """Merge ``scores [r, c]`` of candidates ``candidates [c]`` into rows ``rows``."""
        check_finite_scores(scores)
        held_scores, held_ids = self.scores[rows], self.indices[rows]
        all_scores = np.concatenate([held_scores, scores.astype(np.float32, copy=False)], axis=1)
        all_ids = np.concatenate([held_ids, np.broadcast_to(candidates, scores.shape)], axis=1)
        width, k = all_scores.shape[1], self.k
        if width > 4 * k:
            # Keep every entry >= each row's k-th largest score (ties included), then sort only those.
            kth = np.partition(all_scores, width - k, axis=1)[:, width - k]
            keep = int((all_scores >= kth[:, None]).sum(axis=1).max())
            part = np.argpartition(-all_scores, keep - 1, axis=1)[:, :keep]
            all_scores = np.take_along_axis(all_scores, part, axis=1)
            all_ids = np.take_along_axis(all_ids, part, axis=1)
        missing = all_ids < 0  # empty slots sort last
        order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, all_ids), -all_scores), axis=1)[:, :k]
        self.scores[rows] = np.take_along_axis(all_scores, order, axis=1)
        self.indices[rows] = np.take_along_axis(all_ids, order, axis=1)

    def result(self) -> TopK:
        return TopK(self.indices.copy(), self.scores.copy())


@dataclass
class ScoreResult:
    """Top-k both ways, and the full ``images x captions`` matrix when it was requested."""

    t2i: TopK  # per caption: best images
    i2t: TopK  # per image: best captions
    scores: np.ndarray | None
    tile_shape: tuple[int, int]
    tiles: int


def tile_shape(
    n_images: int,
    n_captions: int,
    bytes_per_pair: int,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    max_images: int | None = None,
    max_captions: int | None = None,
) -> tuple[int, int]:
    """``(Bi, Bc)`` whose intermediates fit ``budget_bytes`` (never below one pair), near square."""
    if budget_bytes <= 0:
        raise ItmrtError(f"the scoring memory budget must be positive, not {budget_bytes} bytes")
    pairs = max(1, budget_bytes // max(1, bytes_per_pair))
    cap_i = min(n_images, max_images or n_images)
    cap_c = min(n_captions, max_captions or n_captions)
    bc = max(1, min(cap_c, math.isqrt(pairs)))
    bi = max(1, min(cap_i, pairs // bc))
    bc = max(1, min(cap_c, pairs // bi))
    return _balanced(n_images, bi), _balanced(n_captions, bc)


def _balanced(total: int, size: int) -> int:
    """The smallest tile size that covers ``total`` in as many tiles as ``size`` needs.

    Never larger than ``size`` (the budget holds), but the last tile is no longer a small remainder
    (e.g. 200 images in 88-image tiles become tiles of 67, 67, 66 rather than 88, 88, 24), which keeps
    the work of each tile even across threads.
    """
    tiles = -(-total // size)
    return -(-total // tiles)


def pair_bytes(captions: CaptionEmbeddings, images: np.ndarray) -> int:
    """Estimated scorer working memory per (image, caption) pair."""
    if captions.token_level:
        return int(captions.lengths.max()) * int(images.shape[1]) * 4 * INTERMEDIATES_PER_PAIR
    return 4 * INTERMEDIATES_PER_PAIR


def score_tiled(
    scorer: Backend,
    images: np.ndarray,
    captions: CaptionEmbeddings,
    top_k: int = 10,
    keep_scores: bool = False,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    tile: tuple[int, int] | None = None,
    max_images: int | None = None,
    max_captions: int | None = None,
    progress: Progress | None = None,
) -> ScoreResult:
    """Score every image against every caption in tiles; keep top-k per image and per caption.

    ``images``: ``[Ni, n, d]`` region embeddings (or ``[Ni, D]`` for global
    models), any array-like (a gallery's memmap is read one tile at a time).
    ``tile`` fixes ``(Bi, Bc)`` instead of deriving it from ``budget_bytes``;
    ``max_images`` / ``max_captions`` cap it (a TensorRT profile's batch limits).
    """
    n_img, n_cap = int(images.shape[0]), len(captions)
    if n_img == 0 or n_cap == 0:
        raise ItmrtError("nothing to score: no images or no captions")
    if tile is None:
        bi, bc = tile_shape(n_img, n_cap, pair_bytes(captions, images), budget_bytes, max_images, max_captions)
    else:
        bi, bc = max(1, min(tile[0], n_img)), max(1, min(tile[1], n_cap))
    k_t2i, k_i2t = min(top_k, n_img), min(top_k, n_cap)
    t2i, i2t = StreamingTopK(n_cap, k_t2i), StreamingTopK(n_img, k_i2t)
    full = np.empty((n_img, n_cap), dtype=np.float32) if keep_scores else None
    # Captions of similar length share a tile: each tile is padded only to its own longest caption.
    order = np.argsort(captions.lengths, kind="stable") if captions.token_level else np.arange(n_cap)
    tiles = 0
    for c0 in range(0, n_cap, bc):
        cap_ids = order[c0 : c0 + bc]
        cap_batch, cap_lengths = captions.padded(cap_ids)
        feeds = {CAPTION_EMBEDDINGS: cap_batch}
        if captions.token_level:
            feeds[LENGTHS] = cap_lengths.astype(np.int32)
        for i0 in range(0, n_img, bi):
            i1 = min(i0 + bi, n_img)
            feeds[IMAGE_EMBEDDINGS] = np.ascontiguousarray(images[i0:i1], dtype=np.float32)
            block = scorer.run(feeds)[0]
            if block.shape != (i1 - i0, len(cap_ids)):
                raise ItmrtError(f"the scorer returned shape {block.shape}, expected {(i1 - i0, len(cap_ids))}")
            i2t.update(slice(i0, i1), block, cap_ids)
            t2i.update(cap_ids, block.T, np.arange(i0, i1))
            if full is not None:
                full[i0:i1, cap_ids] = block
            tiles += 1
        if progress:
            progress(len(cap_ids))
    return ScoreResult(t2i.result(), i2t.result(), full, (bi, bc), tiles)


def top_k_of_matrix(scores: np.ndarray, k: int, remedy: str = "check the inputs") -> tuple[TopK, TopK]:
    """(t2i, i2t) top-k of a full ``images x captions`` matrix (stable: ties by lower index)."""
    check_top_k(k)
    check_finite_scores(scores, remedy)

    def best(matrix: np.ndarray, kk: int) -> TopK:
        order = np.argsort(-matrix, axis=1, kind="stable")[:, :kk]
        return TopK(order.astype(np.int64), np.take_along_axis(matrix, order, axis=1).astype(np.float32))

    return best(scores.T, min(k, scores.shape[0])), best(scores, min(k, scores.shape[1]))
