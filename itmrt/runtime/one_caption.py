"""One caption (or a few) against many images: the query a retrieval service mostly answers.

The batched scorers (the scorer graph, :mod:`itmrt.runtime.fused`) are built
for many captions at once. Asked about one caption they waste most of their
work: the fused kernels pad its words to 64 vector lanes, every call recomputes
each image's Gram matrix ``V V^T`` (about 2.6x the similarity product itself
at 36 regions and 14 words), and a tile is scored pair by pair. Here one call
does, for a block of images at a time:

1. the word x region similarities of every caption of the call as one float32
   GEMM over the block's ``B * n`` regions (ONNX Runtime's MLAS, which reads a
   block 3-7x faster than numpy's BLAS for these skinny products on this CPU);
   float16 storage is cast inside the same graph, a piece of the block at a
   time (:data:`CAST_PIECES`), each piece multiplied while its float32 copy is
   still in the cache: no float32 copy of the gallery, nor of a block, is made (a warmed runtime, or a call
   over :data:`LARGE_CALL_VALUES`, widens and multiplies float16 blocks in one compiled pass instead:
   :mod:`itmrt.runtime.region_kernels`, about 2x faster than the graph's cast);
2. NAAF's (or SCAN's) per-word steps as numpy operations over the whole block
   ``[B, n, T]`` - images, regions and words at once; the few per-caption steps
   (the word-axis norm, the intra-caption propagation, the mean) on each
   caption's columns. A warmed runtime scores NAAF's steps with a compiled kernel instead
   (:mod:`itmrt.runtime.one_caption_kernels`, :meth:`OneCaptionScorer.load_kernels`), which releases the
   interpreter lock for the whole block: the numpy steps hold it between their inner loops, so two workers
   gained little on them.

Per-image constants. ``||vhat||^2 = w^T G w`` needs each image's Gram matrix
``G = V V^T`` (NAAF, SCAN t2i); SCAN i2t needs each region's norm. They depend
only on the gallery, so they are computed once per gallery *content* (its
embeddings' sha256, not its path; by the compiled Gram kernel where the region kernels are loaded) and
kept: ``n * n * 4`` bytes an image in
float32 (5.2 KB at 36 regions, 3.5% of the float32 embeddings, 7% of float16
ones; 518 MB for 100K images). Float16 would halve that; measured, it moved
scores by up to 5e-6 (``w^T G w`` sums ``n^2`` rounded terms: half the 1e-5
parity margin on the first data tried), so they stay float32. All galleries' constants together are bounded by
:data:`CONSTANTS_BUDGET_BYTES`, least recently used first out; a gallery too
large for the budget, or plain arrays (whose content may change between calls
unseen), get them block by block inside each call instead - the same scores,
slower. Where the region kernels are loaded and NAAF's steps run in numpy (a
one-shot command over a large gallery), a call without cached constants does
not compute them at all: it sums each word's attended vector directly,
``d`` multiply-adds per weighted region-word pair (NAAF weighs only the regions
above its threshold), and a gallery's first scan caches nothing; its second
builds the constants (:meth:`OneCaptionScorer._scan_builds`).

Nothing per call grows with the gallery except the output: the callers' plain
top-k of ``N x C`` scores. ``threads`` workers split the blocks, each with its
own single-threaded ONNX Runtime session (numpy releases the GIL inside its
operations).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.bundle.names import (
    NAAF_INTRA_FACTOR,
    NAAF_LAMBDA,
    NAAF_THRESHOLD,
    SCAN_AGG_FUNCS,
    SCAN_CROSS_ATTN,
    SCAN_LAMBDA_LSE,
    SCAN_LAMBDA_SOFTMAX,
    SCAN_RAW_FEATURE_NORMS,
)
from itmrt.errors import ItmrtError
from itmrt.limits import check_threads
from itmrt.optional import compiled_kernels
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.sessions import create_session

FEW_CAPTIONS = 16
"""Calls with at most this many captions take this path (``benchmarks/bench_one_caption.py`` measures the crossover
against the batched fused scorer)."""
ONE_CAPTION_SCORERS = ("naaf", "scan")  # the manifest traits' scorer kinds this module scores (bundle/traits.py)
BLOCK_IMAGES = 256
"""Most images per block. Measured, one caption x 1000 images, interleaved (load 2.4): blocks of 256 against 128
images, float16 27.4 / 28.4 ms (one thread), 19.3 / 20.1 ms (two); float32 23.8 / 24.8, 15.7 / 17.4 ms - half
the numpy calls of the per-word steps, whose interpreter-bound share two threads cannot split. Earlier, 128
images against 64: 25.1 against 27.1 ms."""
BLOCK_VALUES = 128 * 36 * 16
"""Values of a block's ``[B, n, T]`` intermediates when a call has several captions (fewer images for more words):
they stay in the core's cache (measured: 32 captions at once in blocks of 64 images ran 2.3x slower per caption
than 16)."""
ONE_CAPTION_BLOCK_VALUES = 256 * 36 * 16
"""The same for a call with one caption: up to 16 words, blocks of :data:`BLOCK_IMAGES`."""
CAST_PIECES = 8
"""Pieces a float16 block is cast and multiplied in (32 images of a 256-image block: 4.7 MB in float32).
Measured, 1000 images x 14 words, one thread: float32 15.6 ms; float16 in 1 piece 22.7, 4 pieces 19.0, 8 pieces
18.8, 16 pieces 19.1, 43 pieces 20.9 (each node's fixed cost)."""
KERNEL_LANES = 64
"""Images the compiled kernel scores side by side (:data:`itmrt.runtime.one_caption_kernels.LANES`)."""
SPLIT_MIN_IMAGES = 8
"""Fewest images of a block when a call's few images (a rerank's 20-100 candidates) are split over the threads:
one block a thread took the rerank of 50 compact-storage candidates (decoded in the block) from 8.0-10.3 to
4.8-6.0 ms on two threads (docs/region-index.md, session 14)."""
CONSTANTS_BUDGET_BYTES = 1 << 30
"""Most memory the cached per-image constants of all galleries may take together."""
LARGE_CALL_VALUES = 1 << 30
"""Stored values a call reads (float16 storage) or builds constants from (any storage) above which a scorer
that was not warmed loads the region kernels anyway (about 29,000 images at 36 x 1024): importing numba and
loading the kernels from its cache took 0.36 s in a fresh process, and against the graph the similarity kernel
saved 13 ms per 1000 float16 images, the Gram kernel 40 ms (one thread; ``python
benchmarks/bench_region_kernels.py``): at 29,000 images the similarity kernel alone saves what loading costs."""

DIRECT_PAIRS_PER_IMAGE = 320
"""Weighted (region, word) pairs per image, on average over a block, up to which a call that has no cached
constants sums each word's attended vector directly (:func:`itmrt.runtime.region_kernels.attended_norms`: ``d``
multiply-adds a pair) instead of computing the block's Gram matrices, which cost as much as about 340 pairs
(``python benchmarks/bench_region_kernels.py``, 256 float16 images x 12 words, one thread: every one of the 36
regions weighted, 432 pairs, 7.5 ms directly against 6.2 ms through the Gram kernel; a tenth weighted, 2.0 ms
against 5.6). NAAF weighs only the regions above its threshold, so most pairs are zero."""
_EPS = np.float32(1e-8)
_LEAKY = np.float32(0.1)
_SHIFT_LIMIT = np.float32(40.0)  # exp(+-40) are normal float32s (36 * exp(40) < 3.4e38)


@dataclass(frozen=True)
class NaafParameters:
    """NAAF's frozen test-time constants (MODELS.md section 2)."""

    threshold: float
    lambda_softmax: float
    intra_factor: float


@dataclass(frozen=True)
class ScanParameters:
    """SCAN's options and constants (MODELS.md section 4)."""

    cross_attn: str
    raw_feature_norm: str
    agg_func: str
    lambda_softmax: float
    lambda_lse: float


Parameters = NaafParameters | ScanParameters


def parameters_from_graph(path: str | Path) -> Parameters:
    """The family's constants as the scorer graph's metadata records them (one-line error otherwise)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ItmrtError(f"cannot read the scorer graph {path}: {exc}; export the bundle again") from None
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        if meta.get("family") == "naaf":
            return NaafParameters(float(meta[NAAF_THRESHOLD]), float(meta[NAAF_LAMBDA]), float(meta[NAAF_INTRA_FACTOR]))
        if meta.get("family") == "scan":
            options = (meta["cross_attn"], meta["raw_feature_norm"], meta["agg_func"])
            if all(value in allowed for value, allowed in
                   zip(options, (SCAN_CROSS_ATTN, SCAN_RAW_FEATURE_NORMS, SCAN_AGG_FUNCS))):
                return ScanParameters(meta["cross_attn"], meta["raw_feature_norm"], meta["agg_func"],
                                      float(meta[SCAN_LAMBDA_SOFTMAX]), float(meta[SCAN_LAMBDA_LSE]))
    except (KeyError, ValueError):
        pass
    raise ItmrtError(f"the scorer graph {path} lacks its family's constants in its metadata, or they are not ones "
                     "the runtime knows; export the bundle again")


# -- the captions of one call ----------------------------------------------------------------------------------


@dataclass
class QueryCaptions:
    """The captions of one call: tokens back to back ``[T, d]`` and what each caption needs on its own."""

    tokens: np.ndarray  # [T, d] float32
    bounds: list[tuple[int, int]]  # caption c's columns
    starts: np.ndarray  # [C] each caption's first column
    lengths: np.ndarray  # [C] its number of words
    intra: list[np.ndarray] = field(default_factory=list)  # NAAF: [m, m] intra-caption softmax per caption
    intra_flat: np.ndarray | None = None  # NAAF: the same back to back, row-major (the compiled kernel's layout)
    intra_starts: np.ndarray | None = None  # NAAF: where caption c's matrix starts in intra_flat
    grams: list[np.ndarray] = field(default_factory=list)  # SCAN i2t: [m, m] word Gram matrix per caption
    norms: np.ndarray | None = None  # SCAN t2i: [T] word norms
    padded_tokens: np.ndarray | None = None  # the tokens padded for the float16 similarity kernel, once loaded


def query_captions(captions: CaptionEmbeddings, parameters: Parameters) -> QueryCaptions:
    if not captions.token_level or captions.offsets is None:
        raise ItmrtError("the one-caption scorer needs token-level caption embeddings (a NAAF or SCAN bundle)")
    lengths = captions.lengths.astype(np.int64)
    if len(lengths) == 0 or (lengths < 1).any():
        raise ItmrtError("nothing to score: no captions, or a caption without tokens")
    starts = captions.offsets[:-1].astype(np.int64)
    rows = np.concatenate([np.arange(start, start + m) for start, m in zip(starts, lengths)])
    tokens = np.ascontiguousarray(np.asarray(captions.vectors, dtype=np.float32)[rows])
    ends = np.cumsum(lengths)
    bounds = [(int(end - m), int(end)) for end, m in zip(ends, lengths)]
    query = QueryCaptions(tokens, bounds, ends - lengths, lengths)
    for a, b in bounds:
        words = tokens[a:b]
        if isinstance(parameters, NaafParameters):
            logits = np.float32(parameters.intra_factor) * (words @ words.T)
            logits = np.exp(logits - logits.max(axis=1, keepdims=True))
            query.intra.append((logits / logits.sum(axis=1, keepdims=True)).astype(np.float32))
        elif parameters.cross_attn == "i2t":
            query.grams.append(words @ words.T)
    if isinstance(parameters, ScanParameters) and parameters.cross_attn == "t2i":
        query.norms = np.sqrt((tokens * tokens).sum(axis=1))
    if query.intra:
        query.intra_flat = np.concatenate([matrix.reshape(-1) for matrix in query.intra])
        query.intra_starts = np.concatenate([[0], np.cumsum(lengths * lengths)[:-1]]).astype(np.int64)
    return query


def check_rows(rows: object, n_images: int) -> np.ndarray:
    """``rows`` of :meth:`OneCaptionScorer.score` as int64 image numbers, each within ``0 .. n_images - 1``, or a
    one-line error: numpy wrapped a negative row around to the gallery's end, truncated a float, read booleans
    as rows 0 and 1, and failed deep inside numpy or ONNX Runtime on a row past the end or a 2-D array."""
    try:
        index = np.asarray(rows)
    except (TypeError, ValueError):  # a ragged list
        raise ItmrtError(f"rows must be a 1-D array of image numbers, not {type(rows).__name__}") from None
    if index.ndim != 1:
        raise ItmrtError(f"rows must be a 1-D array of image numbers, not of shape {index.shape}")
    if index.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(index.dtype, np.integer):
        raise ItmrtError(f"rows must be integers (image numbers), not {index.dtype}")
    low, high = index.min(), index.max()
    if low < 0 or high >= n_images:
        raise ItmrtError(f"rows must be within 0..{n_images - 1} (the {n_images} images given), not "
                         f"{low if low < 0 else high}")
    return index.astype(np.int64)


# -- the score of one block ----------------------------------------------------------------------------------


Product = Callable[[Any, np.ndarray], np.ndarray]
"""Batched quadratic forms ``sum_jk w[b,j,t] G[b,j,k] w[b,k,t]`` of ``G [B, n, n]`` and ``w [B, n, T]``: ``[B, T]``
(:func:`quadratic_forms`; numpy's batched product would hand it to a multi-threaded BLAS at many words,
and threads contending with the block workers for two busy cores measured 1000x slower)."""
Scratch = dict[tuple[str, str], np.ndarray]
"""Block-sized arrays a worker reuses from block to block (a fresh 100+ KB array per operation costs numpy an
allocation and its page faults: in-place, the step-4 softmax measured 2x faster): one flat array per name and
dtype, grown to the largest block asked for and viewed in each call's shape. Keyed by shape instead, a service
kept one array for every block size and caption length its requests ever had, and grew without bound."""


def _buffer(scratch: Scratch | None, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    if scratch is None:
        return np.empty(shape, dtype=dtype)
    key, size = (name, np.dtype(dtype).name), math.prod(shape)
    flat = scratch.get(key)
    if flat is None or flat.size < size:
        flat = scratch[key] = np.empty(size, dtype=dtype)
    return flat[:size].reshape(shape)


def quadratic_forms(grams: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``w^T G w`` per image and word, in numpy (the workers run it as one ONNX Runtime graph)."""
    return np.einsum("bjt,bjt->bt", np.matmul(grams, weights), weights)


def max_over_regions(values: np.ndarray) -> np.ndarray:
    """``values.max(axis=1)`` by halving the region axis (numpy reduces a middle axis about 5x slower)."""
    while values.shape[1] > 1:
        half = values.shape[1] // 2
        folded = np.maximum(values[:, :half], values[:, half : 2 * half])
        if values.shape[1] % 2:
            np.maximum(folded[:, 0], values[:, 2 * half], out=folded[:, 0])
        values = folded
    return values[:, 0]


def naaf_block(sims: np.ndarray, grams: np.ndarray | None, query: QueryCaptions, p: NaafParameters,
               product: Product = quadratic_forms, scratch: Scratch | None = None) -> np.ndarray:
    """NAAF scores ``[B, C]`` from similarities ``[B, n, T]`` and the block's Gram matrices ``[B, n, n]`` (None:
    ``product`` computes ``w^T G w`` without them).

    The step-4 softmax is max-shifted as in :func:`itmrt.families.naaf.model.naaf_scores` (the same value as the
    released ``p / (sum p + 1e-8)``); ``vhat`` is never formed: ``u . vhat = sum_j w s``, ``||vhat||^2 = w^T G w``.
    Sums over the regions are products with a vector of ones (numpy's reductions over a middle axis are slow).
    """
    lam, threshold = np.float32(p.lambda_softmax), np.float32(p.threshold)
    shape = sims.shape
    ones = np.ones(shape[1], dtype=np.float32)
    best = max_over_regions(sims)  # [B, T]
    r = best - threshold
    has_positive = r > 0
    # Step 4: weights over the regions above the threshold, and the aggregated-feature term.
    weights = _buffer(scratch, "weights", shape)
    np.subtract(sims, best[:, None, :], out=weights)
    np.multiply(weights, lam, out=weights)
    np.exp(weights, out=weights)
    above = _buffer(scratch, "above", shape, np.bool_)
    np.greater(sims, threshold, out=above)
    np.multiply(weights, above, out=weights)
    # The weights' normalisation is applied to the [B, T] sums, not to the [B, n, T] weights (one pass less):
    # u . vhat = (sum_j w s) / den and ||vhat||^2 = (w^T G w) / den^2.
    denominator = np.matmul(ones, weights) + _EPS * np.exp(-lam * np.maximum(r, np.float32(0)))
    denominator = np.where(has_positive, denominator, np.float32(1))
    dot = np.einsum("bjt,bjt->bt", weights, sims) / denominator
    norm_sq = product(grams, weights) / (denominator * denominator)
    aggregated = np.where(has_positive, dot / np.sqrt(np.maximum(norm_sq, _EPS * _EPS)), np.float32(0))
    # Step 5: relevance - the leaky similarities normalised over each caption's words, softmax over regions.
    clipped = _buffer(scratch, "clipped", shape)
    np.multiply(sims, _LEAKY, out=clipped)
    np.maximum(sims, clipped, out=clipped)  # LeakyReLU for a slope below 1
    logits = _buffer(scratch, "logits", shape)
    np.multiply(clipped, clipped, out=logits)
    if len(query.starts) == 1:  # a product with ones: 4x faster than reduceat over the short word axis
        factor = lam / (np.sqrt(np.matmul(logits, np.ones(shape[2], dtype=np.float32)))[:, :, None] + _EPS)
    else:
        squares = np.add.reduceat(logits, query.starts, axis=2)  # [B, n, C]: each caption's words
        factor = np.repeat(lam / (np.sqrt(squares) + _EPS), query.lengths, axis=2)
    np.multiply(clipped, factor, out=logits)
    # |logit| <= lam (a word's share of its region's norm over the words): for lam up to 40, exp(logit) lies
    # between exp(-40) and exp(40), normal floats, and a softmax needs no shift (it cancels); above that, the
    # max over the regions is subtracted.
    if lam > _SHIFT_LIMIT:
        np.subtract(logits, max_over_regions(logits)[:, None, :], out=logits)
    np.exp(logits, out=logits)
    relevance = np.einsum("bjt,bjt->bt", logits, sims) / np.matmul(ones, logits)
    # Step 3: the negative branch, its decision propagated within each caption.
    decision = np.empty_like(r)
    for c, (a, b) in enumerate(query.bounds):
        np.matmul(r[:, a:b], query.intra[c].T, out=decision[:, a:b])
    per_word = aggregated + relevance + np.where(decision < 0, r, np.float32(0))
    # Step 6: the mean over each caption's words.
    return np.add.reduceat(per_word, query.starts, axis=1) / query.lengths.astype(np.float32)


def _raw_norm(attn: np.ndarray, how: str, axis: int) -> np.ndarray:
    """SCAN's ``raw_feature_norm`` of ``attn`` over its query axis ``axis``."""
    if how == "softmax":
        e = np.exp(attn - attn.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    if how.startswith("clipped"):
        attn = np.where(attn >= 0, attn, _LEAKY * attn)
    if how.endswith("l2norm"):
        return attn / (np.sqrt((attn * attn).sum(axis=axis, keepdims=True)) + _EPS)
    if how.endswith("l1norm"):
        return attn / (np.abs(attn).sum(axis=axis, keepdims=True) + _EPS)
    return attn


def _aggregate(row_sim: np.ndarray, how: str, lambda_lse: np.float32) -> np.ndarray:
    """SCAN's ``agg_func`` over the last axis (the queries)."""
    if how == "Max":
        return row_sim.max(axis=-1)
    if how == "LogSumExp":
        return np.log(np.exp(lambda_lse * row_sim).sum(axis=-1)) / lambda_lse
    if how == "Mean":
        return row_sim.sum(axis=-1) / np.float32(row_sim.shape[-1])
    return row_sim.sum(axis=-1)


def scan_block(sims: np.ndarray, grams: np.ndarray | None, region_norms: np.ndarray | None, query: QueryCaptions,
               p: ScanParameters, product: Product = quadratic_forms) -> np.ndarray:
    """SCAN scores ``[B, C]`` from similarities ``[B, n, T]`` (t2i: the block's Gram matrices; i2t: its region norms).

    As :func:`itmrt.families.scan.model.scan_scores`: the attended context is never formed
    (``q . attended = sum w (q . c)``, ``||attended||^2 = w^T G w``).
    """
    lam, lam_lse = np.float32(p.lambda_softmax), np.float32(p.lambda_lse)
    scores = np.empty((sims.shape[0], len(query.bounds)), dtype=np.float32)
    for c, (a, b) in enumerate(query.bounds):
        attn = sims[:, :, a:b]  # [B, regions, words]
        if p.cross_attn == "t2i":  # queries: the words (axis 2), context: the regions (axis 1)
            assert query.norms is not None
            logits = lam * _raw_norm(attn, p.raw_feature_norm, axis=2)
            weights = np.exp(logits - max_over_regions(logits)[:, None, :])
            weights /= weights.sum(axis=1, keepdims=True)
            products = np.einsum("bjt,bjt->bt", weights, attn)
            attended_sq = product(grams, np.ascontiguousarray(weights))
            query_norms = query.norms[None, a:b]
        else:  # queries: the regions (axis 1), context: the words (axis 2)
            assert region_norms is not None
            logits = lam * _raw_norm(attn, p.raw_feature_norm, axis=1)
            weights = np.exp(logits - logits.max(axis=2, keepdims=True))
            weights /= weights.sum(axis=2, keepdims=True)
            products = np.einsum("bjt,bjt->bj", weights, attn)
            attended_sq = np.einsum("bjt,bjt->bj", weights @ query.grams[c], weights)
            query_norms = region_norms
        attended = np.sqrt(np.maximum(attended_sq, np.float32(0)))
        row_sim = products / np.maximum(query_norms * attended, _EPS)
        scores[:, c] = _aggregate(row_sim, p.agg_func, lam_lse)
    return scores


# -- per-image constants ---------------------------------------------------------------------------------------


@dataclass
class ImageConstants:
    """One gallery's per-image constants: Gram matrices ``[N, n, n]`` or region norms ``[N, n]`` (float32)."""

    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


def constants_bytes(parameters: Parameters, n_images: int, regions: int) -> int:
    """What one gallery's per-image constants take in memory."""
    per_image = regions if isinstance(parameters, ScanParameters) and parameters.cross_attn == "i2t" else regions**2
    return 4 * per_image * n_images


class _Worker:
    """One thread's ONNX Runtime sessions: the similarity GEMM and the Gram matrices, per storage dtype."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str], Any] = {}
        self.scratch: Scratch = {}

    def _session(self, kind: str, dtype: np.dtype) -> Any:
        key = (kind, dtype.name)
        if key not in self._sessions:
            self._sessions[key] = _graph_session(kind, dtype)
        return self._sessions[key]

    def similarities(self, block: np.ndarray, query: QueryCaptions,
                     kernel: Callable[..., None] | None = None) -> np.ndarray:
        """``block [B, n, d]`` regions times the query's tokens ``[T, d]^T``: ``[B * n, T]`` in float32.

        Float16 blocks go to ``kernel`` (:func:`itmrt.runtime.region_kernels.similarities`, widened and
        multiplied in one pass) when it is loaded; else they are cast inside the graph in :data:`CAST_PIECES`
        pieces of whole images, each cast and multiplied before the next, so a piece's float32 copy is still in
        the cache for its GEMM (one cast of a whole 128-image block writes 19 MB to memory and reads it back).
        """
        block, tokens = _storage(block), query.tokens
        rows = block.reshape(-1, block.shape[-1])
        if block.dtype != np.float16:
            return self._session("sims", block.dtype).run(None, {"a": rows, "b": tokens})[0]
        if kernel is not None and query.padded_tokens is not None:
            from itmrt.runtime.fused import call_compiled

            out = np.empty((len(rows), len(tokens)), dtype=np.float32)
            call_compiled(kernel, rows.view(np.uint16), query.padded_tokens, out)
            return out
        pieces = min(CAST_PIECES, len(block))
        feeds = {"b": tokens}
        for number, images in enumerate(np.array_split(np.arange(len(block)), pieces)):
            feeds[f"a{number}"] = rows[images[0] * block.shape[1] : (images[-1] + 1) * block.shape[1]]
        return self._session(f"sims{pieces}", block.dtype).run(None, feeds)[0]

    def grams(self, images: np.ndarray, kernel: Callable[..., None] | None = None) -> np.ndarray:
        """Each image's ``V V^T``, ``[B, n, n]``: by ``kernel`` (:func:`itmrt.runtime.region_kernels.gram_matrices`,
        or its float16 twin) when it is loaded, else by the graph."""
        images = _storage(images)
        if kernel is None:
            return self._session("gram", images.dtype).run(None, {"a": images})[0]
        from itmrt.runtime.fused import call_compiled
        from itmrt.runtime.region_kernels import gram_matrices_half

        out = np.empty((images.shape[0], images.shape[1], images.shape[1]), dtype=np.float32)
        if images.dtype == np.float16:
            call_compiled(gram_matrices_half, images.view(np.uint16), out)
        else:
            call_compiled(kernel, images, out)
        return out

    def product(self, grams: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``w^T G w`` per image and word, ``[B, T]``: the batched product and the sum over the regions in one
        graph on this worker's thread (an einsum after the product read the ``[B, n, T]`` result once more)."""
        return self._session("product", np.dtype(np.float32)).run(None, {"a": grams, "b": weights})[0]

    def direct_product(self, block: np.ndarray, gram_kernel: Callable[..., None] | None) -> Product:
        """``product(_, weights)``: ``w^T G w`` of ``block``'s images without cached Gram matrices - each word's
        attended vector summed directly where the weighted pairs are few (:data:`DIRECT_PAIRS_PER_IMAGE`), else
        through the block's Gram matrices computed now."""
        from itmrt.runtime import region_kernels
        from itmrt.runtime.fused import call_compiled

        grams: list[np.ndarray] = []  # the block's, once computed (SCAN asks once per caption)

        def product(_grams: Any, weights: np.ndarray) -> np.ndarray:
            if np.count_nonzero(weights) > DIRECT_PAIRS_PER_IMAGE * len(block):
                if not grams:
                    grams.append(self.grams(block, gram_kernel))
                return self.product(grams[0], weights)
            stored = _storage(block)
            out = np.empty((weights.shape[0], weights.shape[2]), dtype=np.float32)
            weights = np.ascontiguousarray(weights, dtype=np.float32)
            if stored.dtype == np.float16:
                call_compiled(region_kernels.attended_norms_half, stored.view(np.uint16), weights, out)
            else:
                call_compiled(region_kernels.attended_norms, stored, weights, out)
            return out

        return product


def _storage(array: np.ndarray) -> np.ndarray:
    """A contiguous float16 or float32 array (what the graphs take), without copying one that already is."""
    array = np.asarray(array)
    if array.dtype not in (np.float16, np.float32):
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)


def _graph_session(kind: str, dtype: np.dtype) -> Any:
    """A one-thread CPU session: ``sims = cast(a) b^T`` (``simsK``: float16 ``a`` in K pieces ``a0 .. aK-1``, each
    cast and multiplied in turn, the results concatenated), ``grams = cast(a) cast(a)^T`` or ``product = sum over
    the regions of (a b) * b`` (both batched)."""
    from onnx import TensorProto, helper

    source = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    nodes, a = [], "a"
    if source == TensorProto.FLOAT16 and not kind.startswith("sims"):
        nodes.append(helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.FLOAT))
        a = "a32"
    if kind == "product":  # sum_j (G w)[b, j, t] w[b, j, t]
        nodes += [helper.make_node("MatMul", ["a", "b"], ["gw"]), helper.make_node("Mul", ["gw", "b"], ["wgw"]),
                  helper.make_node("ReduceSum", ["wgw", "axis"], ["c"], keepdims=0)]
        inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "regions", "regions"]),
                  helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "regions", "cols"])]
        output = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", "cols"])
    elif kind.startswith("sims"):
        inputs = [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["cols", "depth"])]
        if source == TensorProto.FLOAT16:  # nodes in this order: ONNX Runtime runs them so, reusing the buffers
            pieces = int(kind[len("sims"):])
            for number in range(pieces):
                inputs.append(helper.make_tensor_value_info(f"a{number}", source, [f"rows{number}", "depth"]))
                nodes += [helper.make_node("Cast", [f"a{number}"], [f"a32_{number}"], to=TensorProto.FLOAT),
                          helper.make_node("Gemm", [f"a32_{number}", "b"], [f"c{number}"], transB=1)]
            nodes.append(helper.make_node("Concat", [f"c{number}" for number in range(pieces)], ["c"], axis=0))
        else:
            inputs.append(helper.make_tensor_value_info("a", source, ["rows", "depth"]))
            nodes.append(helper.make_node("Gemm", ["a", "b"], ["c"], transB=1))
        output = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["rows", "cols"])
    else:
        nodes += [helper.make_node("Transpose", [a], ["t"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", [a, "t"], ["c"])]
        inputs = [helper.make_tensor_value_info("a", source, ["batch", "regions", "depth"])]
        output = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", "regions", "regions"])
    constants = [helper.make_tensor("axis", TensorProto.INT64, [1], [1])] if kind == "product" else []
    model = helper.make_model(helper.make_graph(nodes, f"one_caption_{kind}", inputs, [output], constants),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)
    return create_session(model.SerializeToString(), threads=1, spinning=False)


# -- the scorer -----------------------------------------------------------------------------------------------


GalleryKey = tuple[object, ...]


class OneCaptionScorer:
    """NAAF or SCAN scores of a few captions against many images, block by block (see the module docstring).

    ``threads``: workers splitting the image blocks (0: one per core).
    """

    def __init__(self, parameters: Parameters, threads: int = 0,
                 budget_bytes: int = CONSTANTS_BUDGET_BYTES, block_images: int = BLOCK_IMAGES) -> None:
        check_threads(threads)
        self.parameters = parameters
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.budget_bytes, self.block_images = budget_bytes, max(1, block_images)
        self._workers = [_Worker() for _ in range(self.threads)]
        self._pool: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[GalleryKey, ImageConstants] = OrderedDict()
        self._lock = threading.Lock()  # the constants cache
        self._calls = threading.Lock()  # one call at a time: the workers' scratch arrays are reused
        self.builds = 0  # galleries whose constants were computed (tests read it)
        # whether a rerank (a call with rows) computes a whole gallery's constants at once: a warmed runtime (a
        # service, whose warm-up pays for them) does; otherwise only once its reranks have asked for as many
        # rows as the gallery holds (:meth:`_rerank_builds`)
        self.reranks_build_constants = False
        self._rows_asked: dict[GalleryKey, int] = {}
        self._scanned: set[GalleryKey] = set()  # galleries scanned once without their constants
        self._kernel: Callable[..., None] | None = None  # NAAF's compiled per-word steps, once loaded
        self._similarity_kernel: Callable[..., None] | None = None  # float16 storage's product, once loaded
        self._gram_kernel: Callable[..., None] | None = None  # the per-image Gram matrices, once loaded
        self._region_kernels_tried = False

    def load_kernels(self) -> bool:
        """Use the compiled kernels from now on, loading them from numba's cache or compiling them now: NAAF's
        per-word steps (:mod:`itmrt.runtime.one_caption_kernels`; it releases the interpreter lock, so two
        workers scale over two cores) and, for NAAF and SCAN alike, float16 storage's similarity product and the
        per-image Gram matrices (:mod:`itmrt.runtime.region_kernels`, where the CPU converts half floats in
        hardware). True when NAAF's per-word kernel is loaded; False for SCAN or where numba is not installed
        (numpy stays).

        A warmed runtime (a service) calls this; a one-shot command does not: importing numba costs about
        0.4 s, more than the kernels save on one call (a call over :data:`LARGE_CALL_VALUES` loads the region
        kernels anyway)."""
        self._load_region_kernels()
        if not isinstance(self.parameters, NaafParameters):
            return False
        if self._kernel is not None:
            return True
        one_caption_kernels = compiled_kernels("itmrt.runtime.one_caption_kernels")
        if one_caption_kernels is None:
            return False
        assert one_caption_kernels.LANES == KERNEL_LANES
        self._kernel = one_caption_kernels.naaf_block
        rng = np.random.default_rng(0)  # compiles (or loads) the kernel for the arrays the scorer passes
        query = query_captions(CaptionEmbeddings(rng.standard_normal((3, 4), dtype=np.float32),
                                                 np.array([3], dtype=np.int32), np.array([0, 3])), self.parameters)
        self._naaf(rng.standard_normal((2, 5, 3), dtype=np.float32), np.ones((2, 5, 5), np.float32), query)
        return True

    def expect_scan(self, values: int, dtype: np.dtype) -> None:
        """Calls to come read ``values`` stored values of ``dtype`` in all (a shard scanned block by block): the
        region kernels are loaded where one call over them would load them (:data:`LARGE_CALL_VALUES`: float16
        storage's product, or any storage's per-image constants), since a scan's small calls each miss the rule
        that pays their import."""
        if values >= LARGE_CALL_VALUES and (self.needs_grams or np.dtype(dtype) == np.float16):
            self._load_region_kernels()

    def _load_region_kernels(self) -> None:
        if self._similarity_kernel is not None or self._region_kernels_tried:
            return
        self._region_kernels_tried = True  # once: without numba or F16C the graph's cast stays
        module = compiled_kernels("itmrt.runtime.region_kernels")
        if module is None or not module.available():
            return
        from itmrt.runtime.fused import call_compiled

        words = module.padded_words(np.ones((2, 8), dtype=np.float32))
        stored = np.zeros((5, 8), dtype=np.uint16)
        for writable in (True, False):  # compiled (or loaded) for copies and for read-only memory maps (galleries)
            stored.setflags(write=writable)
            call_compiled(module.similarities, stored, words, np.empty((5, 2), np.float32))
        call_compiled(module.gram_matrices, np.ones((2, 5, 8), np.float32), np.empty((2, 5, 5), np.float32))
        weights = np.ones((1, 5, 2), np.float32)
        for writable in (True, False):
            stored.setflags(write=writable)
            call_compiled(module.gram_matrices_half, stored.reshape(1, 5, 8), np.empty((1, 5, 5), np.float32))
            call_compiled(module.attended_norms_half, stored.reshape(1, 5, 8), weights, np.empty((1, 2), np.float32))
            regions = np.ones((1, 5, 8), np.float32)
            regions.setflags(write=writable)
            call_compiled(module.attended_norms, regions, weights, np.empty((1, 2), np.float32))
        self._similarity_kernel, self._gram_kernel = module.similarities, module.gram_matrices

    @property
    def kernel_loaded(self) -> bool:
        """Whether NAAF's per-word steps run on the compiled kernel."""
        return self._kernel is not None

    @property
    def region_kernels_loaded(self) -> bool:
        """Whether float16 storage's similarity product and the Gram matrices run on the compiled kernels."""
        return self._similarity_kernel is not None

    @classmethod
    def from_graph(cls, path: str | Path, threads: int = 0) -> OneCaptionScorer:
        return cls(parameters_from_graph(path), threads)

    @property
    def needs_grams(self) -> bool:
        return not (isinstance(self.parameters, ScanParameters) and self.parameters.cross_attn == "i2t")

    def applies(self, captions: CaptionEmbeddings) -> bool:
        """Whether a call with these captions is this scorer's: token-level and at most :data:`FEW_CAPTIONS`."""
        return captions.token_level and 0 < len(captions) <= FEW_CAPTIONS

    # -- per-image constants ----------------------------------------------------------------------

    def _block_constants(self, worker: _Worker, block: np.ndarray) -> np.ndarray:
        if self.needs_grams:
            return worker.grams(block, self._gram_kernel)
        regions = np.asarray(block, dtype=np.float32)
        return np.sqrt(np.einsum("bjd,bjd->bj", regions, regions))

    def constants(self, images: np.ndarray, key: GalleryKey, evict: bool = True,
                  build: bool = True) -> ImageConstants | None:
        """The cached constants of the gallery ``key`` names (its content), computed on first use; None when
        they would not fit :attr:`budget_bytes`, or (``evict`` False) only by evicting another gallery's, or
        (``build`` False) are not cached yet.

        A rerank asks without evicting: the shards of a large gallery each read a few rows per query, and a
        cache that cannot hold them all would otherwise rebuild every shard's constants on every query (20
        shards of 50,000 images: 259 MB each against a 1 GiB budget); its rows' constants are then computed
        inside the call, as for plain arrays."""
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
            held = sum(c.nbytes for c in self._cache.values())
        size = constants_bytes(self.parameters, int(images.shape[0]), int(images.shape[1]))
        if not build or size > self.budget_bytes or (not evict and held + size > self.budget_bytes):
            return None
        if self.needs_grams and math.prod(images.shape) >= LARGE_CALL_VALUES:
            self._load_region_kernels()  # a one-shot command building a large gallery's Gram matrices: they pay
        shape = (int(images.shape[0]), *((images.shape[1],) * (2 if self.needs_grams else 1)))
        values = np.empty(shape, dtype=np.float32)

        def fill(worker: _Worker, start: int, stop: int) -> None:
            values[start:stop] = self._block_constants(worker, images[start:stop])

        self._map_blocks(int(images.shape[0]), fill)
        built = ImageConstants(values)
        with self._lock:
            self._cache[key] = built
            self.builds += 1
            while sum(c.nbytes for c in self._cache.values()) > self.budget_bytes:
                self._cache.popitem(last=False)
        return built

    # -- scoring ----------------------------------------------------------------------------------

    def score(self, images: np.ndarray, captions: CaptionEmbeddings, key: GalleryKey | None = None,
              rows: np.ndarray | None = None) -> np.ndarray:
        """Scores ``[N, C]`` of ``images [N, n, d]`` (float32 or float16; a memmap is read block by block) against
        ``captions``; ``rows``: only those images, in that order (a rerank's candidates).

        ``key``: what identifies the images' content (a gallery's embeddings sha256): their constants are cached
        under it. Without one they are computed inside the call; so are those of ``rows`` whose gallery's
        constants are not cached yet, until :meth:`_rerank_builds` says the gallery's pay.
        """
        if images.ndim != 3:
            raise ItmrtError(f"the one-caption scorer needs region embeddings, not shape {tuple(images.shape)}")
        query = query_captions(captions, self.parameters)
        if query.tokens.shape[1] != images.shape[2]:
            raise ItmrtError(f"image ({images.shape[2]}) and caption ({query.tokens.shape[1]}) embeddings differ "
                             "in size")
        index = None if rows is None else check_rows(rows, int(images.shape[0]))
        total = int(images.shape[0]) if index is None else len(index)
        self.expect_scan(total * int(images.shape[1]) * int(images.shape[2]), images.dtype)  # a one-shot's large call
        if self._similarity_kernel is not None and images.dtype == np.float16:
            from itmrt.runtime.region_kernels import padded_words

            query.padded_tokens = padded_words(query.tokens)
        cached = None
        if key is not None:
            build = self._scan_builds(key) if rows is None else self._rerank_builds(key, images, rows)
            cached = self.constants(images, key, evict=rows is None, build=build)
        out = np.empty((total, len(query.bounds)), dtype=np.float32)

        def score_range(worker: _Worker, start: int, stop: int) -> None:
            picked = slice(start, stop) if index is None else index[start:stop]
            block = images[picked]
            constants = cached.values[picked] if cached is not None else self._call_constants(worker, block)
            out[start:stop] = self._score_block(worker, block, constants, query)

        budget = ONE_CAPTION_BLOCK_VALUES if len(query.bounds) == 1 else BLOCK_VALUES
        size = max(16, budget // (int(images.shape[1]) * len(query.tokens)))
        if self._kernel is not None:  # whole groups of the kernel's lanes (its buffers are its own, per caption)
            size = max(1, size // KERNEL_LANES) * KERNEL_LANES
        # a call's few images (a rerank's candidates): one block a thread, not all of them one block on one
        size = min(self.block_images, size, max(SPLIT_MIN_IMAGES, -(-total // self.threads)))
        with self._calls:
            self._map_blocks(total, score_range, size)
        return out

    def _scan_builds(self, key: GalleryKey) -> bool:
        """Whether a call over every image of the gallery ``key`` computes its constants (cached) rather than
        scoring without them: in a warmed runtime, where nothing replaces them (the region kernels are not
        loaded), and on the gallery's second scan; its first scan sums the attended vectors directly
        (:meth:`_Worker.direct_product`), cheaper than building the Gram matrices when the gallery is scanned
        once (a one-caption command over 100,000 float16 images spent 2.7 s on them, more than on scoring)."""
        if self.reranks_build_constants or not self._sums_directly():
            return True
        with self._lock:
            seen = key in self._scanned
            self._scanned.add(key)
        return seen

    def _rerank_builds(self, key: GalleryKey, images: np.ndarray, rows: np.ndarray) -> bool:
        """Whether a rerank of ``rows`` computes the gallery's constants (cached) rather than its rows' (in the
        call): in a warmed runtime (:attr:`reranks_build_constants`: a service pays at warm-up), else once the
        reranks of this gallery have asked for as many rows as it holds, so computing the gallery's at most
        doubles what the rows' alone would have cost. A one-shot search of a 50,000-image shard for 10
        candidates computed the whole shard's (at 1M images, 20 shards: 16 s before one caption's answer)."""
        if self.reranks_build_constants:
            return True
        with self._lock:
            asked = self._rows_asked[key] = self._rows_asked.get(key, 0) + len(rows)
        return asked >= int(images.shape[0])

    def _sums_directly(self) -> bool:
        """Whether a call without cached constants sums the attended vectors directly
        (:meth:`_Worker.direct_product`): the region kernels are loaded, the Gram matrices would serve only
        ``w^T G w``, and NAAF's steps run in numpy (the compiled kernel takes the Gram matrices)."""
        return (self.needs_grams and self._similarity_kernel is not None
                and not (isinstance(self.parameters, NaafParameters) and self._kernel is not None))

    def _call_constants(self, worker: _Worker, block: np.ndarray) -> np.ndarray | None:
        """A block's constants computed in the call (none cached), or None where it sums directly."""
        return None if self._sums_directly() else self._block_constants(worker, block)

    def _score_block(self, worker: _Worker, block: np.ndarray, constants: np.ndarray | None,
                     query: QueryCaptions) -> np.ndarray:
        n_img, regions = int(block.shape[0]), int(block.shape[1])
        sims = worker.similarities(block, query, self._similarity_kernel)
        sims = sims.reshape(n_img, regions, -1)
        product = worker.product if constants is not None else worker.direct_product(block, self._gram_kernel)
        if isinstance(self.parameters, NaafParameters):
            if self._kernel is not None:
                assert constants is not None
                return self._naaf(sims, constants, query)
            return naaf_block(sims, constants, query, self.parameters, product, worker.scratch)
        if self.parameters.cross_attn == "t2i":
            return scan_block(sims, constants, None, query, self.parameters, product)
        return scan_block(sims, None, constants, query, self.parameters)

    def _naaf(self, sims: np.ndarray, grams: np.ndarray, query: QueryCaptions) -> np.ndarray:
        """:func:`naaf_block` by the compiled kernel (the interpreter lock released for the whole block)."""
        assert self._kernel is not None and isinstance(self.parameters, NaafParameters)
        from itmrt.runtime.fused import call_compiled

        out = np.empty((sims.shape[0], len(query.bounds)), dtype=np.float32)
        call_compiled(self._kernel, np.ascontiguousarray(sims, dtype=np.float32),
                      np.ascontiguousarray(grams, dtype=np.float32), query.starts, query.lengths, query.intra_flat,
                      query.intra_starts, np.float32(self.parameters.threshold),
                      np.float32(self.parameters.lambda_softmax), out)
        return out

    def _map_blocks(self, total: int, work: Callable[[_Worker, int, int], None], size: int | None = None) -> None:
        """``work(worker, start, stop)`` over blocks of ``size`` (default :attr:`block_images`) of ``total``
        images, split among the workers, the calling thread one of them.

        Each worker takes the next block not yet taken: on a shared machine, a worker whose core is taken away
        leaves its blocks to the others instead of holding the whole call back (a fixed share each made the
        slowest worker the call's time).
        """
        size = size or self.block_images
        starts = list(range(0, total, size))
        workers = min(self.threads, len(starts))
        if workers <= 1:
            for start in starts:
                work(self._workers[0], start, min(start + size, total))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="itmrt-one-caption")
        pending = iter(starts)  # next() on a list iterator is atomic: no block is taken twice

        def run(number: int) -> None:
            for start in pending:
                work(self._workers[number], start, min(start + size, total))

        helpers = [self._pool.submit(run, number) for number in range(1, workers)]
        try:
            run(0)
        finally:
            for future in helpers:
                future.result()

    def forget_constants(self, keep: Callable[[GalleryKey], bool] = lambda _key: False) -> None:
        """Drop the cached constants of every gallery but those ``keep`` accepts (a long-running service after
        a swap: the old versions' constants would otherwise stay until the budget pushes them out)."""
        with self._lock:
            for key in [key for key in self._cache if not keep(key)]:
                del self._cache[key]
            self._rows_asked = {key: count for key, count in self._rows_asked.items() if keep(key)}
            self._scanned = {key for key in self._scanned if keep(key)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
