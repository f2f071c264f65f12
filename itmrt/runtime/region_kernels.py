"""Compiled kernels over stored regions: float16 read at memory speed, the similarity product with a caption's
words, each image's Gram matrix, and the attended vectors' norms without it.

The one-caption scorer's first step multiplies a block of regions ``[R, d]`` by
the call's words ``[T, d]``. From float32 storage ONNX Runtime's GEMM does it
well; from float16 storage the graph must cast first, and ONNX Runtime's CPU
cast cost about as much as the product itself, so float16 galleries were scored
slower than float32 ones although they are half the bytes (1000 images x 12
words: 29.2 ms from float16 against 16.1 from float32; this kernel 16.2 ms from
float16: ``python benchmarks/bench_region_kernels.py``, one thread).

:func:`similarities` does both in one pass. Four regions at a time are widened
into a buffer of the core's L1 cache (LLVM's ``fpext`` from half, which on an
x86 CPU with F16C is one ``vcvtph2ps`` per eight values), then multiplied by the
words three at a time: twelve running sums, each word vector loaded once for
four regions and each region vector once for three words. The caller pads the
words to a multiple of three with zero rows (their columns are computed and
dropped). Sums are reassociated (rounding about 1e-6 against the GEMM's order
on unit vectors).

:func:`gram_matrices` (:func:`gram_matrices_half` from float16) computes each
image's ``V V^T`` (the per-image constants of NAAF and SCAN t2i) with the same
tiles over the lower triangle only, mirrored: ONNX Runtime's batched MatMul
computed all ``n^2`` products of these 36 x 1024 x 36 problems at a fraction of
its GEMM rate, so a one-shot scan of a large gallery spent more on its Gram
matrices than on scoring (256 images: 6.2 against 16.5 ms from float16, 7.8
against 12.3 ms from float32, the same benchmark).

:func:`attended_norms` (:func:`attended_norms_half`) gives ``w^T G w`` without
the Gram matrix: each word's attended vector ``sum_j w_j v_j`` summed over the
regions it weighs, then its squared norm. NAAF weighs only the regions above
its threshold, so for a gallery scanned once this costs a fraction of the Gram
matrices (256 float16 images x 12 words with a tenth of the regions weighted:
2.0 against 5.6 ms; every region weighted: 7.5 against 6.2 ms, the same
benchmark).

Everywhere else float16 blocks are widened to float32 before a GEMM:
:func:`to_float32` took 28.1 ms for 1000 images where numpy's cast (no F16C in
its loop) took 63.8 ms (the same benchmark).

numba has no float16 arrays on the CPU: the regions come as their bits (a
``uint16`` view), and :func:`half_to_float` reinterprets each one in LLVM IR.
Importing this module imports numba (the ``cpu`` extra); the kernels compile
once per machine (a few seconds) and load from numba's cache after that.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

ROWS = 4
"""Regions multiplied together (their widened values fill four L1 lines per 16 dimensions)."""
WORDS = 3
"""Words multiplied together: ROWS x WORDS = 12 running sums, which with the loaded vectors fit AVX2's 16
registers."""
FASTMATH = {"reassoc", "nsz", "contract"}
LINE_VALUES = 32
"""float16 values in a 64-byte cache line."""


def kernels() -> tuple[object, ...]:
    """The module's numba dispatchers (whose ``stats`` say what was compiled and what came from the cache)."""
    return (similarities, widen, gram_matrices, gram_matrices_half, attended_norms, attended_norms_half)


@functools.cache
def available() -> bool:
    """Whether this CPU converts half floats in hardware (x86's F16C; ARM64 always does): without it LLVM would
    call a library routine per value, and the caller keeps ONNX Runtime's cast."""
    import platform

    from llvmlite import binding

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return "+f16c" in binding.get_host_cpu_features().flatten().split(",")


@intrinsic
def half_to_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 value of a float16 given as its 16 bits."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def prefetch(typingctx, array, index):  # type: ignore[no-untyped-def]
    """Ask the core to bring the cache line of ``array[index]`` (a 1-d array) in, without waiting for it (LLVM's
    ``llvm.prefetch``: a read, kept in every level). An index past the end is the caller's to avoid."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        kind = signature.args[0]
        data = context.make_array(kind)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, kind, data, [args[1]])
        byte, word = ir.IntType(8).as_pointer(), ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte, word, word, word]), "llvm.prefetch.p0i8")
        builder.call(function, [builder.bitcast(pointer, byte), word(0), word(3), word(1)])
        return context.get_dummy_value()

    return types.void(array, types.intp), codegen


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False, inline="always")
def _tile(x0, x1, x2, x3, y0, y1, y2):  # type: ignore[no-untyped-def]
    """The 4 x 3 dot products of ``x0 .. x3`` with ``y0 .. y2`` (float32 vectors of one length) as
    ``((x0.y0, x0.y1, x0.y2), ..., (x3.y0, x3.y1, x3.y2))``: twelve running sums, each vector loaded once per
    dimension."""
    a00 = a01 = a02 = a10 = a11 = a12 = np.float32(0.0)
    a20 = a21 = a22 = a30 = a31 = a32 = np.float32(0.0)
    for k in range(x0.shape[0]):
        w0, w1, w2 = y0[k], y1[k], y2[k]
        v0, v1, v2, v3 = x0[k], x1[k], x2[k], x3[k]
        a00 += v0 * w0
        a01 += v0 * w1
        a02 += v0 * w2
        a10 += v1 * w0
        a11 += v1 * w1
        a12 += v1 * w2
        a20 += v2 * w0
        a21 += v2 * w1
        a22 += v2 * w2
        a30 += v3 * w0
        a31 += v3 * w1
        a32 += v3 * w2
    return ((a00, a01, a02), (a10, a11, a12), (a20, a21, a22), (a30, a31, a32))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False)
def similarities(regions, words, out):  # type: ignore[no-untyped-def]
    """``out [R, T] = regions [R, d] (float16 bits, uint16) x words [Tp, d]^T`` (float32, ``Tp`` a multiple of
    :data:`WORDS` >= ``T``, the rows past ``T`` zeros). Contiguous arrays.

    While one group of regions is multiplied, the next group's lines are prefetched, a share before each word
    group's tile: the hardware's own prefetcher stops at the group's end, and each widening then waited for
    memory (10% of the kernel's time on 1000 images, ``python benchmarks/bench_region_kernels.py``)."""
    n_rows, depth = regions.shape
    padded, columns = words.shape[0], out.shape[1]
    x = np.empty((ROWS, depth), dtype=np.float32)
    flat = regions.reshape(-1)
    lines = -(-ROWS * depth // LINE_VALUES)  # 64-byte lines of one group of float16 regions
    per_tile = -(-lines // (padded // WORDS)) if padded else 0
    for first in range(0, n_rows, ROWS):
        for i in range(ROWS):
            if first + i < n_rows:
                row = regions[first + i]
                for k in range(depth):
                    x[i, k] = half_to_float(row[k])
            else:
                for k in range(depth):
                    x[i, k] = np.float32(0.0)
        x0, x1, x2, x3 = x[0], x[1], x[2], x[3]
        following = (first + ROWS) * depth
        for t in range(0, padded, WORDS):
            for line in range(t // WORDS * per_tile, min(lines, (t // WORDS + 1) * per_tile)):
                if following + line * LINE_VALUES < flat.size:
                    prefetch(flat, following + line * LINE_VALUES)
            y0, y1, y2 = words[t], words[t + 1], words[t + 2]
            sums = _tile(x0, x1, x2, x3, y0, y1, y2)
            for i in range(ROWS):
                if first + i < n_rows:
                    for j in range(WORDS):
                        if t + j < columns:
                            out[first + i, t + j] = sums[i][j]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False)
def widen(bits, out):  # type: ignore[no-untyped-def]
    """``out = float32(bits)`` value by value (float16 given as its bits), both flat and contiguous."""
    for i in range(bits.size):
        out[i] = half_to_float(bits[i])


def to_float32(array: np.ndarray) -> np.ndarray:
    """A float32 contiguous array of ``array`` (float16 widened by :func:`widen` where the CPU converts half
    floats in hardware; otherwise numpy casts it)."""
    if array.dtype != np.float16 or not available():
        return np.ascontiguousarray(array, dtype=np.float32)
    from itmrt.runtime.fused import call_compiled

    bits = np.ascontiguousarray(array).view(np.uint16)
    out = np.empty(array.shape, dtype=np.float32)
    call_compiled(widen, bits.reshape(-1), out.reshape(-1))
    return out


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False, inline="always")
def _gram(v, g):  # type: ignore[no-untyped-def]
    """``g [n, n] = v v^T`` for one image ``v [n, d]``: tiles of :data:`ROWS` x :data:`WORDS` regions on or below
    the diagonal, each product written to both halves (a pair two tiles cover gets the same sum from both)."""
    n = v.shape[0]
    for first in range(0, n, ROWS):
        x0, x1 = v[min(first, n - 1)], v[min(first + 1, n - 1)]
        x2, x3 = v[min(first + 2, n - 1)], v[min(first + 3, n - 1)]
        for t in range(0, min(first + ROWS, n), WORDS):
            y0, y1, y2 = v[t], v[min(t + 1, n - 1)], v[min(t + 2, n - 1)]
            sums = _tile(x0, x1, x2, x3, y0, y1, y2)
            for i in range(ROWS):
                for j in range(WORDS):
                    if first + i < n and t + j < n:
                        g[first + i, t + j] = sums[i][j]
                        g[t + j, first + i] = sums[i][j]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False)
def gram_matrices(images, out):  # type: ignore[no-untyped-def]
    """``out [B, n, n] = V V^T`` of each image ``V [n, d]`` of ``images [B, n, d]`` (float32, contiguous)."""
    for b in range(images.shape[0]):
        _gram(images[b], out[b])


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False)
def gram_matrices_half(images, out):  # type: ignore[no-untyped-def]
    """:func:`gram_matrices` of float16 images given as their bits (``uint16 [B, n, d]``), each widened into a
    buffer of the core's L2 first (a float32 copy of the block written to fresh memory cost a page fault every
    4 KB: as much as the products)."""
    n_img, n, depth = images.shape
    v = np.empty((n, depth), dtype=np.float32)
    for b in range(n_img):
        image = images[b]
        for j in range(n):
            for k in range(depth):
                v[j, k] = half_to_float(image[j, k])
        _gram(v, out[b])


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False, inline="always")
def _attended(v, weights, out, acc):  # type: ignore[no-untyped-def]
    """``out[t] = ||sum_j weights[j, t] v[j]||^2`` for one image (``v [n, d]`` float32, ``weights [n, T]``),
    the sum over the regions whose weight is not zero only."""
    n, depth = v.shape
    for t in range(weights.shape[1]):
        for k in range(depth):
            acc[k] = np.float32(0.0)
        used = False
        for j in range(n):
            weight = weights[j, t]
            if weight != 0:
                used = True
                row = v[j]
                for k in range(depth):
                    acc[k] += weight * row[k]
        total = np.float32(0.0)
        if used:
            for k in range(depth):
                total += acc[k] * acc[k]
        out[t] = total


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False)
def attended_norms(images, weights, out):  # type: ignore[no-untyped-def]
    """``out [B, T]``: each image's and word's ``||sum_j w_j v_j||^2`` from ``images [B, n, d]`` (float32) and
    ``weights [B, n, T]`` - the ``w^T G w`` of :func:`gram_matrices` without the Gram matrix (contiguous)."""
    acc = np.empty(images.shape[2], dtype=np.float32)
    for b in range(images.shape[0]):
        _attended(images[b], weights[b], out[b], acc)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False)
def attended_norms_half(images, weights, out):  # type: ignore[no-untyped-def]
    """:func:`attended_norms` of float16 images given as their bits (``uint16 [B, n, d]``): only the regions a
    word weighs are widened, into a buffer of the core's L2."""
    n_img, n, depth = images.shape
    v = np.empty((n, depth), dtype=np.float32)
    acc = np.empty(depth, dtype=np.float32)
    for b in range(n_img):
        image, w = images[b], weights[b]
        for j in range(n):
            weighed = False
            for t in range(w.shape[1]):
                if w[j, t] != 0:
                    weighed = True
            if weighed:
                for k in range(depth):
                    v[j, k] = half_to_float(image[j, k])
        _attended(v, w, out[b], acc)


def padded_words(words: np.ndarray) -> np.ndarray:
    """``words [T, d]`` with zero rows up to a multiple of :data:`WORDS`, float32 and contiguous."""
    count = -(-len(words) // WORDS) * WORDS
    padded = np.zeros((count, words.shape[1]), dtype=np.float32)
    padded[: len(words)] = words
    return padded
