"""NAAF's per-word steps of the one-caption scorer as one compiled kernel that releases the interpreter lock.

:func:`itmrt.runtime.one_caption.naaf_block` runs these steps as a few dozen numpy
operations per block of images. Each holds the interpreter lock between (and
some inside) its inner loops, so a second worker thread gained little on them
(measured: 7.1 -> 6.2 ms per 1000 images, one caption, one to two threads,
while the similarity GEMM halved). Here one call does the whole block with the
lock released (``nogil``): the similarity GEMM (ONNX Runtime) and this kernel
both run outside it, and two workers scale over two cores.

Layout: a caption's words are taken 16 at a time (:data:`LANES`, two AVX2
vectors), copied with the regions' values into small per-image buffers that
stay in the core's L1 cache, the last group padded with zeros (padding lanes
are computed and dropped: every loop has a compile-time trip count, so the
compiler vectorises it with no remainder loop). Per image and group:

1. the best region per word and the step-4 weights ``exp(lam (s - best))`` over
   the regions above the threshold, their sum and their dot with ``s``;
2. ``||vhat||^2 = w^T G w`` from the image's cached Gram matrix, over the lower
   triangle (``G`` is symmetric): ``2 sum_j w_j (G_jj w_j / 2 + sum_{k<j} G_jk w_k)``;
3. the relevance softmax over the regions of ``lam * LeakyReLU(s) / ||LeakyReLU(s)||``
   (the norm over each caption's words, computed first for the whole image);
   unshifted for ``lam <= 40`` as in numpy (``|logit| <= lam``), max-shifted above;
4. then per caption: the negative branch's propagated decision and the mean.

``exp`` is a Cody-Waite reduction and a degree-6 polynomial in plain arithmetic
(relative error about 2e-7, float32's rounding), as in
:mod:`itmrt.runtime.fused_kernels`: numba's ``np.exp`` is a scalar library call
per value unless Intel's SVML is installed. The fused kernels' own
:func:`~itmrt.runtime.fused_kernels.exp_shifted` is the same arithmetic, but
called here it is not inlined: the kernel took 4.0 against 2.7 ms per 1024
images x 15 words (best of 40, interleaved, load 7.8). Sums run in a fixed order that
differs from numpy's (rounding ~1e-7 on scores).

Importing this module imports numba (the ``cpu`` extra) and loads the kernel
from numba's cache (compiled once per machine, about 10 s): the runtime does so
when it is warmed up (:meth:`itmrt.runtime.api.Runtime.warmup`, which a service
runs before it reports ready), never in a one-shot command.
"""

from __future__ import annotations

import numba
import numpy as np

LANES = 64
"""Images scored side by side (a compile-time constant: eight AVX2 vectors, no remainder loops)."""

FASTMATH = {"reassoc", "nsz", "contract"}  # no approximate functions, reciprocals or flush-to-zero
f32 = np.float32
_EPS = np.float32(1e-8)
_LEAKY = np.float32(0.1)
_SHIFT_LIMIT = np.float32(40.0)
_EXP_LOW = np.float32(-87.0)
_EXP_HIGH = np.float32(88.0)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_C2, _C3, _C4, _C5, _C6 = (
    np.float32(1 / 2), np.float32(1 / 6), np.float32(1 / 24), np.float32(1 / 120), np.float32(1 / 720)
)


def kernels() -> tuple[object, ...]:
    """The module's numba dispatchers (whose ``stats`` say what was compiled and what came from the cache)."""
    return (naaf_block,)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _exp_lanes(x, out, bits, poly):  # type: ignore[no-untyped-def]
    """``out[l] = exp(x[l])`` for the LANES values of ``x`` (clamped to [-87, 88])."""
    for lane in range(LANES):
        v = min(max(x[lane], _EXP_LOW), _EXP_HIGH)
        k = np.rint(v * _LOG2E)
        poly[lane] = (v - k * _LN2_HI) - k * _LN2_LO
        bits[lane] = (np.int32(k) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for lane in range(LANES):
        r = poly[lane]
        out[lane] = scale[lane] * (f32(1.0) + r * (f32(1.0) + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * _C6))))))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _gather_grams(grams, first, gt):  # type: ignore[no-untyped-def]
    """The Gram matrices' lower triangles ``gt [n, n, L]`` of images ``first .. first + LANES`` (past the
    block's end: its last image again, scored and dropped)."""
    n_img, n = grams.shape[0], grams.shape[1]
    for lane in range(LANES):
        gram = grams[min(first + lane, n_img - 1)]
        for j in range(n):
            for k in range(j + 1):
                gt[j, k, lane] = gram[j, k]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _gather_words(sims, first, start, m, s):  # type: ignore[no-untyped-def]
    """The similarities ``s [:m, n, L]`` of columns ``start .. start + m`` (one caption's words) of the same
    images."""
    n_img, n = sims.shape[0], sims.shape[1]
    for lane in range(LANES):
        values = sims[min(first + lane, n_img - 1)]
        for j in range(n):
            row = values[j, start : start + m]
            for t in range(m):
                s[t, j, lane] = row[t]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, boundscheck=False)
def naaf_block(sims, grams, starts, lengths, intra, intra_starts, threshold, lam, out):  # type: ignore[no-untyped-def]
    """NAAF scores ``out [B, C]`` from similarities ``sims [B, n, T]`` (float32, contiguous) and Gram matrices
    ``grams [B, n, n]``; caption c holds columns ``starts[c] .. starts[c] + lengths[c]`` and its intra-caption
    softmax ``[m, m]`` row-major at ``intra[intra_starts[c]:]``. One caption at a time, so the buffers stay in
    the core's cache: its words' similarities ``[m, n, L]`` and the images' Gram matrices ``[n, n, L]``."""
    n_img, n = sims.shape[0], sims.shape[1]
    longest = lengths.max()
    shifted = lam > _SHIFT_LIMIT
    s = np.empty((longest, n, LANES), dtype=f32)
    gt = np.empty((n, n, LANES), dtype=f32)
    factor = np.empty((n, LANES), dtype=f32)  # lam / ||LeakyReLU(s)|| over the caption's words
    w = np.empty((n, LANES), dtype=f32)
    r_word = np.empty((longest, LANES), dtype=f32)
    term = np.empty((longest, LANES), dtype=f32)
    lanes = np.empty((16, LANES), dtype=f32)
    best, best_odd, top, top_odd, den, dot, quad, acc, e_sum, e_dot, x, e, poly, total = (
        lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7], lanes[8], lanes[9],
        lanes[10], lanes[11], lanes[12], lanes[13])
    bits = np.empty(LANES, dtype=np.int32)
    for first in range(0, n_img, LANES):
        _gather_grams(grams, first, gt)
        for c in range(starts.shape[0]):
            m = lengths[c]
            _gather_words(sims, first, starts[c], m, s)
            for j in range(n):
                for lane in range(LANES):
                    acc[lane] = f32(0.0)
                for t in range(m):
                    row = s[t, j]
                    for lane in range(LANES):
                        v = row[lane]
                        v = v if v > 0 else _LEAKY * v
                        acc[lane] += v * v
                target = factor[j]
                for lane in range(LANES):
                    target[lane] = lam / (np.sqrt(acc[lane]) + _EPS)
            for t in range(m):
                _naaf_word(s[t], factor, gt, threshold, lam, shifted, w, r_word[t], term[t],
                           best, best_odd, top, top_odd, den, dot, quad, acc, e_sum, e_dot, x, e, poly, bits)
            # The negative branch (its decision propagated over the caption's words) and the mean.
            base = intra_starts[c]
            for lane in range(LANES):
                total[lane] = f32(0.0)
            for k in range(m):
                for lane in range(LANES):
                    acc[lane] = f32(0.0)
                for other in range(m):
                    weight = intra[base + k * m + other]
                    r_row = r_word[other]
                    for lane in range(LANES):
                        acc[lane] += weight * r_row[lane]
                r_row = r_word[k]
                t_row = term[k]
                for lane in range(LANES):
                    total[lane] += t_row[lane] + (r_row[lane] if acc[lane] < 0 else f32(0.0))
            for lane in range(min(LANES, n_img - first)):
                out[first + lane, c] = total[lane] / f32(m)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _naaf_word(s, factor, gt, threshold, lam, shifted, w, r_out, term_out,  # type: ignore[no-untyped-def]
               best, best_odd, top, top_odd, den, dot, quad, acc, e_sum, e_dot, x, e, poly, bits):
    """One word's per-word terms for LANES images: ``r_out = best - threshold`` and ``term_out`` = the
    aggregated-feature term (where a region is above the threshold) plus the relevance term.

    ``s [n, L]`` its similarities, ``factor [n, L]`` its caption's relevance factors, ``gt`` the images' Gram
    matrices (lower triangles); the rest are LANES-sized buffers."""
    n = s.shape[0]
    # The best region, and (lam > 40) the largest relevance logit. The running maxima alternate between two
    # rows: "a[l] = v if v > a[l] else a[l]" would compile to a masked store, slow on AMD cores.
    for lane in range(LANES):
        best[lane] = f32(-np.inf)
        top[lane] = f32(-np.inf) if shifted else f32(0.0)
    for j in range(n):
        row = s[j]
        f_row = factor[j]
        best_in, best_out = (best, best_odd) if j % 2 == 0 else (best_odd, best)
        for lane in range(LANES):
            v = row[lane]
            held = best_in[lane]
            best_out[lane] = v if v > held else held
        if shifted:
            top_in, top_out = (top, top_odd) if j % 2 == 0 else (top_odd, top)
            for lane in range(LANES):
                v = row[lane]
                logit = (v if v > 0 else _LEAKY * v) * f_row[lane]
                held = top_in[lane]
                top_out[lane] = logit if logit > held else held
    if n % 2 == 1:
        for lane in range(LANES):
            best[lane] = best_odd[lane]
            if shifted:
                top[lane] = top_odd[lane]
    for lane in range(LANES):
        den[lane] = f32(0.0)
        dot[lane] = f32(0.0)
        e_sum[lane] = f32(0.0)
        e_dot[lane] = f32(0.0)
    for j in range(n):
        row = s[j]
        w_row = w[j]
        # Step 4: the weights over the regions above the threshold (max-shifted), their sum and dot with s.
        for lane in range(LANES):
            x[lane] = lam * (row[lane] - best[lane])
        _exp_lanes(x, w_row, bits, poly)
        for lane in range(LANES):
            v = row[lane]
            p = w_row[lane] if v > threshold else f32(0.0)
            w_row[lane] = p
            den[lane] += p
            dot[lane] += p * v
        # Step 5: the relevance softmax over the regions.
        f_row = factor[j]
        for lane in range(LANES):
            v = row[lane]
            x[lane] = (v if v > 0 else _LEAKY * v) * f_row[lane] - top[lane]
        _exp_lanes(x, e, bits, poly)
        for lane in range(LANES):
            e_sum[lane] += e[lane]
            e_dot[lane] += e[lane] * row[lane]
    for lane in range(LANES):
        quad[lane] = f32(0.0)
    _quadratic_form(gt, w, acc, quad)
    # The weights were shifted by exp(-lam r): so is the 1e-8 of their normalisation.
    for lane in range(LANES):
        x[lane] = -lam * max(best[lane] - threshold, f32(0.0))
    _exp_lanes(x, acc, bits, poly)
    for lane in range(LANES):
        r = best[lane] - threshold
        denominator = den[lane] + _EPS * acc[lane] if r > 0 else f32(1.0)
        norm_sq = (f32(2.0) * quad[lane]) / (denominator * denominator)
        aggregated = (dot[lane] / denominator) / np.sqrt(max(norm_sq, _EPS * _EPS))
        r_out[lane] = r
        term_out[lane] = (aggregated if r > 0 else f32(0.0)) + e_dot[lane] / e_sum[lane]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _quadratic_form(gt, w, acc, quad):  # type: ignore[no-untyped-def]
    """``quad += (w^T G w) / 2`` per lane from ``G``'s lower triangle ``gt [n, n, L]``, the weights ``w [n, L]``:
    ``sum_j w_j (G_jj w_j / 2 + sum_{k<j} G_jk w_k)``, four k per pass."""
    n = w.shape[0]
    for j in range(n):
        g = gt[j]
        wj = w[j]
        diagonal = g[j]
        for lane in range(LANES):
            acc[lane] = f32(0.5) * diagonal[lane] * wj[lane]
        for block in range(j // 4):
            k = 4 * block
            g0, g1, g2, g3 = g[k], g[k + 1], g[k + 2], g[k + 3]
            w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
            for lane in range(LANES):
                acc[lane] += (g0[lane] * w0[lane] + g1[lane] * w1[lane]) + (g2[lane] * w2[lane] + g3[lane] * w3[lane])
        for k in range(4 * (j // 4), j):
            g0 = g[k]
            w0 = w[k]
            for lane in range(LANES):
                acc[lane] += g0[lane] * w0[lane]
        for lane in range(LANES):
            quad[lane] += wj[lane] * acc[lane]
