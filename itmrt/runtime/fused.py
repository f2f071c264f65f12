"""NAAF's score on the CPU as one GEMM per tile plus ONE fused pass over the similarity tile.

The exported scorer graph runs MODELS.md section 2 as some twenty elementwise
operators, each reading and writing the whole ``[Bi, Bc, L, n]`` similarity
tile. Here a tile is scored in two steps:

1. one large float32 GEMM: the tile's caption tokens ``[T, d]`` against its
   images' regions ``[Bi * n, d]`` (ONNX Runtime's MLAS ``Gemm``, so
   ``threads`` means the same as for the graph scorer);
2. one numba pass per (image, caption) block of ``m x n`` similarities
   (a few KB, in L1): the block is copied into a contiguous buffer together
   with its row maxima and the relevance column norms; the relevance logits
   and the positive branch's max-shifted arguments are formed and
   exponentiated over the whole block at once; then per word the propagated
   negative mask, the relevance softmax and the positive branch (only over
   the regions above the threshold, with ``u . vhat = sum_j w s`` and
   ``||vhat||^2 = w^T G w`` from the image's 36 x 36 Gram matrix).

Everything a caption needs on its own (the intra-caption softmax ``W``) is
computed once per caption, the Gram matrices once per image. Captions are
never padded: a caption's tokens are consecutive rows of the GEMM output.

numba is optional (``pip install itmrt[cpu]``) and imported only when a fused
scorer is built; :func:`fused_available` tells whether it can be.
"""

from __future__ import annotations

import importlib.util
import os
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.tiled import DEFAULT_BUDGET_BYTES, ScoreResult, StreamingTopK, tile_shape

FUSED_BUDGET_BYTES = 8 << 20
"""Default similarity-tile size (measured on the 2-core dev CPU: 8 MB beat 2 and 4 MB by ~15%)."""
GRAM_CACHE_BYTES = 256 << 20
"""Keep every image's Gram matrix across caption tiles while they take at most this much memory."""

CONSTANT_KEYS = ("naaf_threshold", "naaf_lambda", "naaf_intra_factor")
"""Metadata keys of NAAF's frozen constants in the scorer graph (``itmrt.export.graphs_scorer``'s
names, repeated here because the export side imports torch and the runtime must not)."""

_kernels: dict[str, Any] = {}

# Floating-point contract of the kernels: reassociation lets the compiler vectorise the
# short sums over 36 regions (a different but fixed summation order, float32 rounding
# ~1e-7); no approximate functions, reciprocals or flush-to-zero.
_FASTMATH = {"reassoc", "nsz", "contract"}
CHUNK = 64
"""Tokens scored side by side in the vector lanes of the fused pass (a compile-time constant: no remainder loops)."""
_EXP_LOW = np.float32(-87.0)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_C2, _C3, _C4, _C5, _C6 = (np.float32(1 / 2), np.float32(1 / 6), np.float32(1 / 24), np.float32(1 / 120), np.float32(1 / 720))


def fused_available() -> bool:
    """Whether numba can be imported (the fused scorer's only extra dependency)."""
    return importlib.util.find_spec("numba") is not None


def _compile() -> dict[str, Any]:
    """The numba kernels, compiled (or loaded from numba's cache) on first use."""
    if _kernels:
        return _kernels
    try:
        import numba
    except ImportError:
        raise ItmrtError("the fused CPU scorer needs numba: pip install 'itmrt[cpu]' (or choose scorer='graph')") from None
    from numba import prange

    # Each numba pass sits between two ONNX Runtime GEMMs. OpenMP's worker threads spin after a parallel
    # region and take the cores the next GEMM needs (measured: 54K -> 70K pairs/s with 2 threads).
    # numba's own workqueue layer sleeps instead. It does not allow parallel calls from several Python
    # threads at once; one Runtime is used from one thread. An explicit NUMBA_THREADING_LAYER wins.
    if "NUMBA_THREADING_LAYER" not in os.environ:
        setattr(numba.config, "THREADING_LAYER", "workqueue")  # numba.config has no type information

    f32 = np.float32
    eps = f32(1e-8)
    leaky = f32(0.1)

    @numba.njit(cache=True, fastmath=_FASTMATH, parallel=True)
    def intra_weights(tokens, starts, factor, out, out_starts):  # type: ignore[no-untyped-def]
        """Per caption, ``softmax_over_l(factor * u_k . u_l)`` over its own words, row-major into ``out``."""
        d = tokens.shape[1]
        for c in prange(starts.shape[0] - 1):
            s0 = starts[c]
            m = starts[c + 1] - s0
            base = out_starts[c]
            for k in range(m):
                row = base + k * m
                top = f32(-np.inf)
                for l in range(m):
                    acc = f32(0.0)
                    for x in range(d):
                        acc += tokens[s0 + k, x] * tokens[s0 + l, x]
                    acc = factor * acc
                    out[row + l] = acc
                    if acc > top:
                        top = acc
                total = f32(0.0)
                for l in range(m):
                    e = np.exp(out[row + l] - top)
                    out[row + l] = e
                    total += e
                for l in range(m):
                    out[row + l] = out[row + l] / total

    @numba.njit(cache=True, fastmath=_FASTMATH)
    def exp_into(x, out, count):  # type: ignore[no-untyped-def]
        """``out[:count] = exp(x[:count])`` for arguments <= 0 (shifted logits), in plain arithmetic the compiler vectorises.

        Cody-Waite reduction ``x = k ln2 + r`` and a degree-6 polynomial for
        ``exp(r)`` (relative error ~2e-7, float32's rounding); ``2^k`` is built
        from its exponent bits through an int32 view of ``out``.
        """
        bits = out.view(np.int32)
        for j in range(count):
            v = max(x[j], _EXP_LOW)
            k = np.floor(v * _LOG2E + f32(0.5))
            r = (v - k * _LN2_HI) - k * _LN2_LO
            x[j] = f32(1.0) + r * (f32(1.0) + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * _C6)))))
            bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
        for j in range(count):
            out[j] = out[j] * x[j]

    @numba.njit(cache=True, fastmath=_FASTMATH, parallel=True)
    def score_tile(sims, width, starts, intra, intra_starts, grams, threshold, lam, out):  # type: ignore[no-untyped-def]
        """Scores ``out [Bi, Bc]`` from ``sims``, flat ``[Bi * n, width]``: image i's regions are rows
        ``i*n .. i*n+n-1``, caption c's tokens columns ``starts[c] .. starts[c+1]-1``
        (``width >= CHUNK``; columns past ``starts[-1]`` are padding).

        Every per-word step of MODELS.md section 2 (maxima, both softmaxes over the regions, the
        positive branch's sums and ``w^T G w``) is independent across words, so it runs on
        CHUNK tokens at once - tokens in the vector lanes, regions in the loop - with no
        horizontal reductions and no remainder loops. Only the relevance column norms (a sum
        over each caption's words) and the intra-caption propagation look across a caption.
        Indexing note: every inner loop indexes a slice with its own range variable, so the
        compiler can see the index is non-negative (no wraparound select) and the loads are
        consecutive - the condition for vectorising them.
        """
        n_img = out.shape[0]
        n_cap = out.shape[1]
        n = grams.shape[1]
        used = starts[n_cap]
        for i in prange(n_img):
            base = i * n * width
            gram = grams[i]
            # Relevance: lam / (column norm of LeakyReLU(s) over the caption's words), per token.
            scale = np.empty((n, width), dtype=f32)
            squares = np.empty(width, dtype=f32)
            for j in range(n):
                row = sims[base + j * width : base + (j + 1) * width]
                for t in range(width):
                    s = row[t]
                    clipped = s if s > 0 else leaky * s
                    squares[t] = clipped * clipped
                for c in range(n_cap):
                    segment = squares[starts[c] : starts[c + 1]]
                    acc = f32(0.0)
                    for t in range(segment.shape[0]):
                        acc += segment[t]
                    scale[j, starts[c] : starts[c + 1]] = lam / (np.sqrt(acc) + eps)
                scale[j, used:] = f32(0.0)
            r_tok = np.empty(width, dtype=f32)
            term_tok = np.empty(width, dtype=f32)
            logits = np.empty((n, CHUNK), dtype=f32)
            logits_e = np.empty((n, CHUNK), dtype=f32)
            weights = np.empty((n, CHUNK), dtype=f32)
            weights_e = np.empty((n, CHUNK), dtype=f32)
            lanes = np.empty((10, CHUNK), dtype=f32)  # per-token accumulators, one row each
            top, best, e_sum, e_dot, p_sum, p_dot, acc_t, quad, arg, arg_e = (
                lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7], lanes[8], lanes[9])
            for chunk in range((width + CHUNK - 1) // CHUNK):
                t0 = min(chunk * CHUNK, width - CHUNK)  # the last chunk overlaps the one before: same values again
                for t in range(CHUNK):
                    top[t] = f32(-np.inf)
                    best[t] = f32(-np.inf)
                # Relevance logits and each word's best similarity.
                for j in range(n):
                    row = sims[base + j * width + t0 : base + j * width + t0 + CHUNK]
                    row_scale = scale[j, t0 : t0 + CHUNK]
                    for t in range(CHUNK):
                        s = row[t]
                        logit = (s if s > 0 else leaky * s) * row_scale[t]
                        logits[j, t] = logit
                        top[t] = max(top[t], logit)
                        best[t] = max(best[t], s)
                # Both softmaxes' shifted arguments; positive branch: lam * ((s - t) - r) = lam * (s - max s).
                for j in range(n):
                    row = sims[base + j * width + t0 : base + j * width + t0 + CHUNK]
                    for t in range(CHUNK):
                        logits[j, t] = logits[j, t] - top[t]
                        weights[j, t] = lam * (row[t] - best[t])
                exp_into(logits.reshape(n * CHUNK), logits_e.reshape(n * CHUNK), n * CHUNK)
                exp_into(weights.reshape(n * CHUNK), weights_e.reshape(n * CHUNK), n * CHUNK)
                for t in range(CHUNK):
                    e_sum[t] = f32(0.0)
                    e_dot[t] = f32(0.0)
                    p_sum[t] = f32(0.0)
                    p_dot[t] = f32(0.0)
                    quad[t] = f32(0.0)
                for j in range(n):
                    row = sims[base + j * width + t0 : base + j * width + t0 + CHUNK]
                    for t in range(CHUNK):
                        s = row[t]
                        e = logits_e[j, t]
                        e_sum[t] += e
                        e_dot[t] += e * s
                        p = weights_e[j, t] if s - threshold > 0 else f32(0.0)
                        weights[j, t] = p
                        p_sum[t] += p
                        p_dot[t] += p * s
                # quad = w^T G w = 2 sum_j w_j (G_jj w_j / 2 + sum_{l<j} G_jl w_l), four l per pass over the lanes.
                for j in range(n):
                    diagonal = f32(0.5) * gram[j, j]
                    for t in range(CHUNK):
                        acc_t[t] = diagonal * weights[j, t]
                    for block in range(j // 4):
                        l = 4 * block
                        g0 = gram[j, l]
                        g1 = gram[j, l + 1]
                        g2 = gram[j, l + 2]
                        g3 = gram[j, l + 3]
                        w0 = weights[l]
                        w1 = weights[l + 1]
                        w2 = weights[l + 2]
                        w3 = weights[l + 3]
                        for t in range(CHUNK):
                            acc_t[t] += (g0 * w0[t] + g1 * w1[t]) + (g2 * w2[t] + g3 * w3[t])
                    for l in range(4 * (j // 4), j):
                        g0 = gram[j, l]
                        w0 = weights[l]
                        for t in range(CHUNK):
                            acc_t[t] += g0 * w0[t]
                    wj = weights[j]
                    for t in range(CHUNK):
                        quad[t] += wj[t] * acc_t[t]
                # Per word: relevance term, and the positive branch where the word has a region above t.
                for t in range(CHUNK):
                    arg[t] = -lam * max(best[t] - threshold, f32(0.0))
                exp_into(arg, arg_e, CHUNK)
                r_out = r_tok[t0 : t0 + CHUNK]
                term_out = term_tok[t0 : t0 + CHUNK]
                for t in range(CHUNK):
                    r = best[t] - threshold
                    denominator = p_sum[t] + eps * arg_e[t]
                    norm = np.sqrt(max(f32(2.0) * quad[t], f32(0.0))) / denominator
                    positive = (p_dot[t] / denominator) / max(norm, eps)
                    r_out[t] = r
                    term_out[t] = e_dot[t] / e_sum[t] + (positive if r > 0 else f32(0.0))
            # Per caption: the negative branch (mask from the propagated r, value from r) and the mean.
            for c in range(n_cap):
                s0 = starts[c]
                m = starts[c + 1] - s0
                w0 = intra[intra_starts[c] : intra_starts[c + 1]]
                r_cap = r_tok[s0 : s0 + m]
                term_cap = term_tok[s0 : s0 + m]
                total = f32(0.0)
                for k in range(m):
                    q = f32(0.0)
                    for l in range(m):
                        q += w0[k * m + l] * r_cap[l]
                    total += (r_cap[k] if q < 0 else f32(0.0)) + term_cap[k]
                out[i, c] = total / f32(m)

    @numba.njit(cache=True, fastmath=_FASTMATH, parallel=True)
    def grams(images, out):  # type: ignore[no-untyped-def]
        """``out[b] = images[b] images[b]^T`` (symmetric: each pair of regions once)."""
        n = images.shape[1]
        for b in prange(images.shape[0]):
            for j in range(n):
                for jj in range(j + 1):
                    acc = f32(0.0)
                    for x in range(images.shape[2]):
                        acc += images[b, j, x] * images[b, jj, x]
                    out[b, j, jj] = acc
                    out[b, jj, j] = acc

    _kernels.update(grams=grams, intra_weights=intra_weights, score_tile=score_tile, exp_into=exp_into, numba=numba)
    return _kernels


def _gemm_session(threads: int) -> Any:
    """An ONNX Runtime session computing ``A B^T`` (MLAS sgemm) on ``threads`` threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "b"], ["c"], transB=1)],
        "similarity_gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["rows", "depth"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["cols", "depth"])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["rows", "cols"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    # The numba pass runs right after each GEMM: idle ORT threads must not spin on its cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class FusedNaafScorer:
    """NAAF's test-time score (MODELS.md section 2) on the CPU: one GEMM + one numba pass per tile.

    Implements the runtime's backend interface (``run`` takes the scorer
    graph's feeds), so it can stand in for the exported scorer graph; the
    tiled driver :meth:`score_tiles` additionally skips caption padding and
    reuses Gram matrices and intra-caption weights across tiles.
    """

    input_names = ["image_embeddings", "caption_embeddings", "lengths"]
    output_names = ["scores"]

    def __init__(self, threshold: float, lambda_softmax: float, intra_factor: float, threads: int = 0) -> None:
        if threads < 0:
            raise ItmrtError(f"--threads must be 0 (automatic) or positive, not {threads}")
        self.threshold = np.float32(threshold)
        self.lambda_softmax = np.float32(lambda_softmax)
        self.intra_factor = np.float32(intra_factor)
        self.threads = threads
        self.name = "fused:naaf"
        self._k = _compile()
        if threads:
            self._k["numba"].set_num_threads(min(threads, self._k["numba"].config.NUMBA_NUM_THREADS))
        self._gemm = _gemm_session(threads)
        self._sims_buffer = np.empty(0, dtype=np.float32)

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
            raise ItmrtError(f"the fused scorer is for NAAF bundles; {path} is a {meta.get('family')!r} scorer - use scorer='graph'")
        try:
            values = [float(meta[key]) for key in CONSTANT_KEYS]
        except (KeyError, ValueError):
            raise ItmrtError(f"the scorer graph {path} lacks NAAF's constants in its metadata; export the bundle again") from None
        return cls(values[0], values[1], values[2], threads=threads)

    # -- building blocks ------------------------------------------------------

    def similarities(self, regions: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """``regions [R, d] @ tokens [T, d]^T`` as one float32 GEMM, written into a reused buffer.

        Regions by tokens, so that each region's similarities to consecutive
        tokens are contiguous: the fused pass puts tokens in the vector lanes.
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

    def intra_weights(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each caption's ``m x m`` intra-caption softmax, flattened, and where each one starts."""
        lengths = np.diff(starts)
        out_starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths * lengths, out=out_starts[1:])
        out = np.empty(int(out_starts[-1]), dtype=np.float32)
        self._k["intra_weights"](tokens, starts, self.intra_factor, out, out_starts)
        return out, out_starts

    @staticmethod
    def grams(images: np.ndarray) -> np.ndarray:
        """Per-image region Gram matrices ``V V^T``, ``[B, n, n]``."""
        out = np.empty((images.shape[0], images.shape[1], images.shape[1]), dtype=np.float32)
        # In numba rather than numpy: numpy's BLAS keeps its own thread pool, which fights numba's and ORT's.
        _compile()["grams"](np.ascontiguousarray(images, dtype=np.float32), out)
        return out

    def score_block(
        self,
        images: np.ndarray,
        tokens: np.ndarray,
        starts: np.ndarray,
        intra: tuple[np.ndarray, np.ndarray],
        grams: np.ndarray,
    ) -> np.ndarray:
        """Scores ``[Bi, Bc]`` of ``images [Bi, n, d]`` against captions whose tokens are ``tokens[starts[c]:starts[c+1]]``."""
        n_img, regions, depth = images.shape
        if tokens.shape[0] < CHUNK:  # the fused pass reads whole chunks of tokens: pad tiny tiles with zero tokens
            tokens = np.concatenate([tokens, np.zeros((CHUNK - tokens.shape[0], depth), dtype=np.float32)])
        sims = self.similarities(images.reshape(n_img * regions, depth), tokens)
        out = np.empty((n_img, len(starts) - 1), dtype=np.float32)
        self._k["score_tile"](sims.reshape(-1), sims.shape[1], starts, intra[0], intra[1], grams, self.threshold, self.lambda_softmax, out)
        return out

    # -- backend interface ------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The scorer graph's contract: ``image_embeddings [Bi, n, d]``, padded ``caption_embeddings [Bc, L, d]``, ``lengths``."""
        images = np.ascontiguousarray(feeds["image_embeddings"], dtype=np.float32)
        padded = np.asarray(feeds["caption_embeddings"], dtype=np.float32)
        lengths = np.asarray(feeds["lengths"]).astype(np.int64)
        if padded.ndim != 3 or images.ndim != 3 or padded.shape[2] != images.shape[2]:
            raise ItmrtError(f"fused scorer: image {images.shape} and caption {padded.shape} embeddings do not match")
        if len(lengths) != padded.shape[0] or (lengths < 1).any() or (lengths > padded.shape[1]).any():
            raise ItmrtError("fused scorer: lengths must be between 1 and the padded caption length")
        tokens = np.ascontiguousarray(np.concatenate([padded[c, :m] for c, m in enumerate(lengths)]))
        starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        intra = self.intra_weights(tokens, starts)
        return [self.score_block(images, tokens, starts, intra, self.grams(images))]

    # -- tiled driver -------------------------------------------------------------

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
        if not captions.token_level or captions.offsets is None:
            raise ItmrtError("the fused scorer needs token-level caption embeddings (a NAAF bundle)")
        n_img, n_cap = int(images.shape[0]), len(captions)
        if n_img == 0 or n_cap == 0:
            raise ItmrtError("nothing to score: no images or no captions")
        regions = int(images.shape[1])
        lengths = captions.lengths.astype(np.int64)
        offsets = captions.offsets.astype(np.int64)
        if tile is None:
            per_pair = max(1, int(math.ceil(lengths.mean())) * regions * 4)
            budget = FUSED_BUDGET_BYTES if budget_bytes is None or budget_bytes == DEFAULT_BUDGET_BYTES else budget_bytes
            bi, bc = tile_shape(n_img, n_cap, per_pair, budget)
        else:
            bi, bc = max(1, min(tile[0], n_img)), max(1, min(tile[1], n_cap))
        t2i, i2t = StreamingTopK(n_cap, min(top_k, n_img)), StreamingTopK(n_img, min(top_k, n_cap))
        full = np.empty((n_img, n_cap), dtype=np.float32) if keep_scores else None
        cache_grams = n_img * regions * regions * 4 <= GRAM_CACHE_BYTES
        gram_cache = np.empty((n_img, regions, regions), dtype=np.float32) if cache_grams else None
        tiles = 0
        for c0 in range(0, n_cap, bc):
            c1 = min(c0 + bc, n_cap)
            cap_ids = np.arange(c0, c1)
            if np.array_equal(offsets[c0 + 1 : c1 + 1] - offsets[c0:c1], lengths[c0:c1]):
                tokens = captions.vectors[offsets[c0] : offsets[c1]]  # consecutive rows: no copy
            else:
                tokens = np.concatenate([captions.vectors[offsets[k] : offsets[k] + lengths[k]] for k in cap_ids])
            tokens = np.ascontiguousarray(tokens, dtype=np.float32)
            starts = np.zeros(c1 - c0 + 1, dtype=np.int64)
            np.cumsum(lengths[c0:c1], out=starts[1:])
            intra = self.intra_weights(tokens, starts)
            for i0 in range(0, n_img, bi):
                i1 = min(i0 + bi, n_img)
                block_images = np.ascontiguousarray(images[i0:i1], dtype=np.float32)
                if gram_cache is None:
                    grams = self.grams(block_images)
                else:
                    if c0 == 0:
                        gram_cache[i0:i1] = self.grams(block_images)
                    grams = gram_cache[i0:i1]
                block = self.score_block(block_images, tokens, starts, intra, grams)
                i2t.update(slice(i0, i1), block, cap_ids)
                t2i.update(cap_ids, block.T, np.arange(i0, i1))
                if full is not None:
                    full[i0:i1, c0:c1] = block
                tiles += 1
            if progress:
                progress(c1 - c0)
        return ScoreResult(t2i.result(), i2t.result(), full, (bi, bc), tiles)
