"""NAAF's score on the CPU as one GEMM per tile plus ONE fused numba pass over the similarity tile.

The exported scorer graph runs docs/models.md section 2 as some twenty elementwise
operators, each reading and writing the whole ``[Bi, Bc, L, n]`` similarity
tile. Here a tile is scored in two steps:

1. one large float32 GEMM: the tile's images' regions ``[Bi * n, d]`` against
   its captions' tokens ``[T, d]`` (ONNX Runtime's MLAS ``Gemm``, so
   ``threads`` means the same as for the graph scorer). Captions are never
   padded: the tokens are laid out position-major (token k of every caption
   longer than k, longest captions first; :func:`position_major`);
2. one numba pass per image over its ``n x T`` similarities
   (:mod:`itmrt.runtime.fused_kernels`): per-word work with 64 tokens in the
   vector lanes, per-caption work with captions in the lanes, and
   ``u . vhat = sum_j w s``, ``||vhat||^2 = w^T G w`` from the image's
   ``n x n`` Gram matrix, so vhat is never formed.

Everything a caption needs on its own (the intra-caption softmax ``W``) is
computed once per caption tile, the Gram matrices once per image.

numba is optional (``pip install itmrt[cpu]``) and imported only when a fused
scorer is built; :func:`fused_available` tells whether it can be.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from itmrt.bundle.names import (
    CAPTION_EMBEDDINGS,
    IMAGE_EMBEDDINGS,
    LENGTHS,
    NAAF_INTRA_FACTOR,
    NAAF_LAMBDA,
    NAAF_THRESHOLD,
    SCORES,
)
from itmrt.errors import ItmrtError
from itmrt.optional import available, require
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.sessions import create_session
from itmrt.runtime.tiled import DEFAULT_BUDGET_BYTES, ScoreResult, StreamingTopK, tile_shape

FUSED_BUDGET_BYTES = 8 << 20
"""Default similarity-tile size (``benchmarks/bench_scorer.py --fused-budgets 2,4,8``: 8 MB beat 2 and 4 MB by ~15%)."""
STRIP_BYTES = 16 << 20
"""Scores gathered before each top-k merge (whole image tiles of one caption tile)."""
GRAM_CACHE_BYTES = 256 << 20
"""Keep every image's Gram matrix across caption tiles while they take at most this much memory."""

CONSTANT_KEYS = (NAAF_THRESHOLD, NAAF_LAMBDA, NAAF_INTRA_FACTOR)
"""Metadata keys of NAAF's frozen constants in the scorer graph."""



def fused_available() -> bool:
    """Whether numba can be imported (the fused scorer's only extra dependency)."""
    return available("numba")


def kernel_cache_fault(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while numba wrote its kernel cache (a full or read-only cache disk)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return any("numba" in frame.filename and frame.filename.endswith("caching.py") for frame in frames)


def call_compiled(kernel: Any, *args: Any) -> Any:
    """``kernel(*args)`` for a numba kernel compiled with ``cache=True``; where numba cannot write its cache (a
    full or read-only disk) at the kernel's first call for these argument types, the kernel is compiled in
    memory instead and called again: the cache is an optimisation, never a condition."""
    try:
        return kernel(*args)
    except OSError as exc:
        if not kernel_cache_fault(exc):
            raise
        from numba.core.caching import NullCache

        kernel._cache = NullCache()
        return kernel(*args)


def disable_kernel_cache() -> None:
    """Compile the fused scorer's kernels in memory only: the cache is an optimisation, never a condition."""
    from numba.core.caching import NullCache

    for dispatcher in kernels_module().kernels():
        dispatcher._cache = NullCache()  # type: ignore[attr-defined]


def kernels_module() -> ModuleType:
    """:mod:`itmrt.runtime.fused_kernels`, imported on first use (it imports numba; its kernels compile,
    or load from numba's cache, at their first call)."""
    require("numba")
    from itmrt.runtime import fused_kernels

    return fused_kernels


@dataclass
class PositionMajor:
    """A caption tile's tokens in the fused kernels' order (see :mod:`itmrt.runtime.fused_kernels`)."""

    order: np.ndarray  # [Bc] tile caption at each sorted place (longest first)
    lengths: np.ndarray  # [Bc] their lengths, sorted
    counts: np.ndarray  # [L] how many captions are longer than k
    offsets: np.ndarray  # [L + 1] first column of position k
    rows: np.ndarray  # [T] each column's token: a row of the caller's token array


@dataclass
class CaptionTile:
    """What :meth:`FusedNaafScorer.score_block` needs of a caption tile, made once per tile."""

    layout: PositionMajor
    tokens: np.ndarray  # [max(T, CHUNK), d] in the layout's column order
    intra: np.ndarray  # ragged intra-caption weights (see fused_kernels.intra_weights)
    pairs: np.ndarray  # [L, L] where position pair (k, l) starts in ``intra``


def position_major(first: np.ndarray, lengths: np.ndarray) -> PositionMajor:
    """The layout of captions whose tokens are rows ``first[c] .. first[c] + lengths[c] - 1``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    ordered = lengths[order]
    counts = (ordered[None, :] > np.arange(int(ordered[0]))[:, None]).sum(axis=1).astype(np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    starts = np.asarray(first, dtype=np.int64)[order]
    rows = np.concatenate([starts[:count] + k for k, count in enumerate(counts)])
    return PositionMajor(order, ordered, counts, offsets, rows)


def _session(nodes: list[Any], inputs: list[Any], output: Any, threads: int) -> Any:
    """An ONNX Runtime CPU session for a one- or two-node graph, on ``threads`` threads."""
    from onnx import helper

    model = helper.make_model(helper.make_graph(nodes, "fused_scorer_part", inputs, [output]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)
    # The numba pass runs right after each GEMM: idle ORT threads must not spin on its cores.
    return create_session(model.SerializeToString(), threads=threads, spinning=False)


def _gemm_session(threads: int) -> Any:
    """``c = a b^T`` (MLAS sgemm)."""
    from onnx import TensorProto, helper

    return _session(
        [helper.make_node("Gemm", ["a", "b"], ["c"], transB=1)],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["rows", "depth"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["cols", "depth"])],
        helper.make_tensor_value_info("c", TensorProto.FLOAT, ["rows", "cols"]), threads)


def _gram_session(threads: int) -> Any:
    """``grams[b] = images[b] images[b]^T`` (batched MLAS sgemm)."""
    from onnx import TensorProto, helper

    return _session(
        [helper.make_node("Transpose", ["images"], ["columns"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["images", "columns"], ["grams"])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", "regions", "depth"])],
        helper.make_tensor_value_info("grams", TensorProto.FLOAT, ["batch", "regions", "regions"]), threads)


class FusedNaafScorer:
    """NAAF's test-time score (docs/models.md section 2) on the CPU: one GEMM + one numba pass per tile.

    Implements the runtime's backend interface (``run`` takes the scorer
    graph's feeds), so it can stand in for the exported scorer graph; the
    tiled driver :meth:`score_tiles` additionally skips caption padding and
    reuses Gram matrices and intra-caption weights across tiles.
    """

    input_names = [IMAGE_EMBEDDINGS, CAPTION_EMBEDDINGS, LENGTHS]
    output_names = [SCORES]

    def __init__(self, threshold: float, lambda_softmax: float, intra_factor: float, threads: int = 0) -> None:
        if threads < 0:
            raise ItmrtError(f"--threads must be 0 (automatic) or positive, not {threads}")
        self.threshold = np.float32(threshold)
        self.lambda_softmax = np.float32(lambda_softmax)
        self.intra_factor = np.float32(intra_factor)
        self.threads = threads
        self.name = "fused:naaf"
        if not fused_available():
            require("numba")  # raises MissingDependency with the install command
        self._kernels: ModuleType | None = None
        self.warn: Callable[[str], None] | None = None  # where a lost kernel cache is reported (the runtime's)
        self._gemm = _gemm_session(threads)
        self._gram = _gram_session(threads)
        self._sims_buffer = np.empty(0, dtype=np.float32)

    @property
    def kernels(self) -> ModuleType:
        """The numba kernels, imported and compiled (or loaded from numba's cache) at first use: a process that
        only scores a few captions at a time (the one-caption scorer's) never pays numba's import."""
        if self._kernels is None:
            self._kernels = kernels_module()
            if self.threads:
                self._kernels.set_threads(self.threads)
            self._compile_kernels()
        return self._kernels

    def _compile_kernels(self) -> None:
        """Compile every kernel by scoring one tiny tile (they compile per argument type, not per size). A cache
        that cannot be written (a full or read-only disk) is an optimisation lost, not a failure: the kernels
        are compiled in memory, with a warning (``warn``, set by the runtime)."""
        rng = np.random.default_rng(0)
        feeds: dict[str, np.ndarray] = {"image_embeddings": rng.standard_normal((1, 2, 4), dtype=np.float32),
                                        "caption_embeddings": rng.standard_normal((2, 3, 4), dtype=np.float32),
                                        "lengths": np.array([3, 2], dtype=np.int64)}
        try:
            self.run(feeds)
        except OSError as exc:
            if not kernel_cache_fault(exc):
                raise
            if self.warn is not None:
                self.warn(f"numba's kernel cache cannot be written ({exc.strerror or exc}); the fused scorer "
                          "compiles without it (and again at every start)")
            disable_kernel_cache()
            self.run(feeds)

    @classmethod
    def from_graph(cls, path: str | Path, threads: int = 0) -> FusedNaafScorer:
        """Read NAAF's frozen constants from an exported scorer graph's metadata."""
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ItmrtError(f"cannot read the scorer graph {path}: {exc}; export the bundle again") from None
        meta = {p.key: p.value for p in model.metadata_props}
        if meta.get("family") != "naaf":
            raise ItmrtError(
                f"the fused scorer is for NAAF bundles; {path} is a {meta.get('family')!r} scorer - use scorer='graph'"
            )
        try:
            values = [float(meta[key]) for key in CONSTANT_KEYS]
        except (KeyError, ValueError):
            raise ItmrtError(
                f"the scorer graph {path} lacks NAAF's constants in its metadata; export the bundle again"
            ) from None
        return cls(values[0], values[1], values[2], threads=threads)

    def warm_kernels(self) -> None:
        """Compile the numba kernels, or load them from numba's cache, now (``itmrt infer`` times it apart from
        scoring); a no-op once they are (any first use compiles them: :meth:`_compile_kernels`)."""
        _ = self.kernels

    # -- building blocks ------------------------------------------------------

    def similarities(self, regions: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """``regions [R, d] @ tokens [T, d]^T`` as one float32 GEMM, written into a reused buffer.

        The result is a view of that buffer, valid until the next call. A fresh
        multi-MB output per tile would cost a page fault per 4 KB on first touch.
        """
        rows, cols = int(regions.shape[0]), int(tokens.shape[0])
        if self._sims_buffer.size < rows * cols:
            self._sims_buffer = np.empty(rows * cols, dtype=np.float32)
        out = self._sims_buffer[: rows * cols].reshape(rows, cols)
        binding = self._gemm.io_binding()
        binding.bind_cpu_input("a", np.ascontiguousarray(regions, dtype=np.float32))
        binding.bind_cpu_input("b", np.ascontiguousarray(tokens, dtype=np.float32))
        binding.bind_output("c", "cpu", 0, np.float32, [rows, cols], out.ctypes.data)
        self._gemm.run_with_iobinding(binding)
        return out

    def grams(self, images: np.ndarray) -> np.ndarray:
        """Per-image region Gram matrices ``V V^T``, ``[B, n, n]``."""
        return self._gram.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]

    def caption_tile(self, vectors: np.ndarray, first: np.ndarray, lengths: np.ndarray) -> CaptionTile:
        """A caption tile made ready for :meth:`score_block`: its layout, its tokens in that layout
        (at least CHUNK rows, zero rows after the real ones) and its intra-caption weights."""
        layout = position_major(first, lengths)
        width = max(len(layout.rows), self.kernels.CHUNK)
        tokens = np.zeros((width, vectors.shape[1]), dtype=np.float32)
        tokens[: len(layout.rows)] = vectors[layout.rows]
        # Position pair (k, l) concerns the captions longer than both: a prefix of min(counts[k], counts[l]).
        sizes = np.minimum.outer(layout.counts, layout.counts)
        pairs = np.zeros(sizes.size, dtype=np.int64)
        np.cumsum(sizes.reshape(-1)[:-1], out=pairs[1:])
        pairs = pairs.reshape(sizes.shape)
        intra = np.empty(int(sizes.sum()), dtype=np.float32)
        with self.kernels.KERNEL_CALLS:
            self.kernels.intra_weights(tokens, layout.offsets, pairs, layout.lengths, self.intra_factor, intra)
        return CaptionTile(layout, tokens, intra, pairs)

    def score_block(self, images: np.ndarray, tile: CaptionTile, grams: np.ndarray) -> np.ndarray:
        """Scores ``[Bi, Bc]`` of ``images [Bi, n, d]`` against a caption tile from :meth:`caption_tile`."""
        n_img, regions, depth = images.shape
        layout = tile.layout
        sims = self.similarities(images.reshape(n_img * regions, depth), tile.tokens)
        ordered = np.empty((n_img, len(layout.order)), dtype=np.float32)
        with self.kernels.KERNEL_CALLS:
            self.kernels.score_tile(sims.reshape(-1), sims.shape[1], layout.offsets, layout.counts, layout.lengths,
                                    tile.intra, tile.pairs, grams, self.threshold, self.lambda_softmax, ordered)
        out = np.empty_like(ordered)
        out[:, layout.order] = ordered
        return out

    # -- backend interface ------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The scorer graph's contract: ``image_embeddings [Bi, n, d]``, padded ``caption_embeddings [Bc, L, d]``,
        ``lengths``."""
        images = np.ascontiguousarray(feeds[IMAGE_EMBEDDINGS], dtype=np.float32)
        padded = np.asarray(feeds[CAPTION_EMBEDDINGS], dtype=np.float32)
        lengths = np.asarray(feeds[LENGTHS]).astype(np.int64)
        if padded.ndim != 3 or images.ndim != 3 or padded.shape[2] != images.shape[2]:
            raise ItmrtError(f"fused scorer: image {images.shape} and caption {padded.shape} embeddings do not match")
        if len(lengths) != padded.shape[0] or (lengths < 1).any() or (lengths > padded.shape[1]).any():
            raise ItmrtError("fused scorer: lengths must be between 1 and the padded caption length")
        first = np.arange(len(lengths), dtype=np.int64) * padded.shape[1]
        tile = self.caption_tile(padded.reshape(-1, padded.shape[2]), first, lengths)
        return [self.score_block(images, tile, self.grams(images))]

    # -- tiled driver -------------------------------------------------------------

    @staticmethod
    def tile_for(n_images: int, lengths: np.ndarray, regions: int, budget_bytes: int | None = None) -> tuple[int, int]:
        """The (images, captions) tile :meth:`score_tiles` uses: its similarity tile within ``budget_bytes``
        (default, and in place of the graph scorer's default, :data:`FUSED_BUDGET_BYTES`)."""
        per_pair = max(1, int(math.ceil(float(np.mean(lengths)))) * regions * 4)
        budget = FUSED_BUDGET_BYTES if budget_bytes is None or budget_bytes == DEFAULT_BUDGET_BYTES else budget_bytes
        return tile_shape(n_images, len(lengths), per_pair, budget)

    def score_tiles(
        self,
        images: np.ndarray,
        captions: CaptionEmbeddings,
        top_k: int = 10,
        keep_scores: bool = False,
        budget_bytes: int | None = None,
        tile: tuple[int, int] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ScoreResult:
        """Every image against every caption, tile by tile, with streaming top-k (as :func:`score_tiled`).

        ``budget_bytes`` bounds the similarity tile (default :data:`FUSED_BUDGET_BYTES`).
        """
        from itmrt.runtime import region_kernels  # numba's, as the scorer's own kernels

        if not captions.token_level or captions.offsets is None:
            raise ItmrtError("the fused scorer needs token-level caption embeddings (a NAAF bundle)")
        n_img, n_cap = int(images.shape[0]), len(captions)
        if n_img == 0 or n_cap == 0:
            raise ItmrtError("nothing to score: no images or no captions")
        regions = int(images.shape[1])
        lengths = captions.lengths.astype(np.int64)
        offsets = captions.offsets.astype(np.int64)
        if tile is None:
            bi, bc = self.tile_for(n_img, lengths, regions, budget_bytes)
        else:
            bi, bc = max(1, min(tile[0], n_img)), max(1, min(tile[1], n_cap))
        t2i, i2t = StreamingTopK(n_cap, min(top_k, n_img)), StreamingTopK(n_img, min(top_k, n_cap))
        full = np.empty((n_img, n_cap), dtype=np.float32) if keep_scores else None
        cache_grams = n_img * regions * regions * 4 <= GRAM_CACHE_BYTES
        gram_cache = np.empty((n_img, regions, regions), dtype=np.float32) if cache_grams else None
        # Top-k merges cost per call more than per score: blocks are gathered into a strip of
        # up to STRIP_BYTES (whole image tiles) and merged once per strip.
        strip_rows = max(bi, STRIP_BYTES // (4 * bc) // bi * bi)
        strip = np.empty((min(strip_rows, n_img), bc), dtype=np.float32)
        tiles = 0
        for c0 in range(0, n_cap, bc):
            c1 = min(c0 + bc, n_cap)
            cap_ids = np.arange(c0, c1)
            caption_tile = self.caption_tile(captions.vectors, offsets[c0:c1], lengths[c0:c1])
            for s0 in range(0, n_img, strip_rows):
                s1 = min(s0 + strip_rows, n_img)
                for i0 in range(s0, s1, bi):
                    i1 = min(i0 + bi, s1)
                    block_images = region_kernels.to_float32(images[i0:i1])
                    if gram_cache is None:
                        grams = self.grams(block_images)
                    else:
                        if c0 == 0:
                            gram_cache[i0:i1] = self.grams(block_images)
                        grams = gram_cache[i0:i1]
                    strip[i0 - s0 : i1 - s0, : c1 - c0] = self.score_block(block_images, caption_tile, grams)
                    tiles += 1
                scores = strip[: s1 - s0, : c1 - c0]
                i2t.update(slice(s0, s1), scores, cap_ids)
                t2i.update(cap_ids, scores.T, np.arange(s0, s1))
                if full is not None:
                    full[s0:s1, c0:c1] = scores
            if progress:
                progress(c1 - c0)
        return ScoreResult(t2i.result(), i2t.result(), full, (bi, bc), tiles)
