"""The numba kernels of the fused NAAF scorer (:mod:`itmrt.runtime.fused` drives them).

Layout they share. A caption tile's captions are sorted longest first and their
tokens laid out *position-major*: column ``offsets[k] + c`` holds token k of
caption c, for the ``counts[k]`` captions longer than k (a prefix, thanks to the
sort). No column is padding. The similarity GEMM gives ``sims [Bi * n, T]``,
image i's regions in rows ``i*n .. i*n+n-1``. Two things follow:

* per-word work (every step of docs/models.md section 2 that runs over one word's
  regions) takes CHUNK consecutive columns at once - tokens in the vector
  lanes, regions in the loop - with no horizontal reductions and no remainder
  loops;
* per-caption work (the relevance column norms, the intra-caption propagation,
  the mean over words) runs for all captions at once at each position k, over
  the contiguous columns ``offsets[k] .. offsets[k] + counts[k]`` - captions in
  the vector lanes.

Indexing note: inner loops index a slice with their own range variable, so the
compiler sees a non-negative index (no wraparound select) and consecutive loads,
the condition for vectorising them.

Compiled once per machine. The kernels are module-level functions with
``cache=True`` and no closure variables: numba keys a cache entry by the
function's bytecode, its closure's pickled contents, the signature and the CPU,
so a closure over other dispatchers would get a new key in every process. numba
looks for its cache, in order, under ``NUMBA_CACHE_DIR`` when that is set, in
``__pycache__`` beside this file when that folder can be written, else in the
per-user cache folder (``$XDG_CACHE_HOME/numba``, by default ``~/.cache/numba``)
- see ``numba/core/caching.py``. Importing this module imports numba: the
runtime imports it only when a fused scorer is built.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import prange

CHUNK = 64
"""Tokens scored side by side in the per-word passes (a compile-time constant: no remainder loops)."""

# Floating-point contract of the kernels: reassociation lets the compiler vectorise sums
# (a different but fixed summation order, float32 rounding ~1e-7); no approximate
# functions, reciprocals or flush-to-zero.
FASTMATH = {"reassoc", "nsz", "contract"}
_EXP_LOW = np.float32(-87.0)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_C2, _C3, _C4, _C5, _C6 = (
    np.float32(1 / 2), np.float32(1 / 6), np.float32(1 / 24), np.float32(1 / 120), np.float32(1 / 720)
)
f32 = np.float32
_EPS = np.float32(1e-8)
_LEAKY = np.float32(0.1)

# The kernels release the interpreter lock (nogil): a service's event loop answers while a worker scores.
# Released, two Python threads could enter the parallel kernels at once, which numba's workqueue layer
# does not allow (it aborts the process): callers hold KERNEL_CALLS around every call
# (itmrt/runtime/fused.py), which the interpreter lock used to do for them.
KERNEL_CALLS = threading.Lock()

# Each numba pass sits between two ONNX Runtime GEMMs. OpenMP's worker threads spin after a parallel
# region and take the cores the next GEMM needs (measured: 54K -> 70K pairs/s with 2 threads).
# numba's own workqueue layer sleeps instead. It does not allow parallel calls from several Python
# threads at once; one Runtime is used from one thread. The layer is chosen at the first parallel
# call, which comes after this module is imported; an explicit NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    setattr(numba.config, "THREADING_LAYER", "workqueue")  # noqa: B010 (numba.config has no type information)


def set_threads(threads: int) -> None:
    """Run the parallel kernels on ``threads`` threads (at most numba's pool size)."""
    numba.set_num_threads(min(threads, int(getattr(numba.config, "NUMBA_NUM_THREADS"))))  # noqa: B009 (untyped config)


def kernels() -> tuple[object, ...]:
    """The module's numba dispatchers (whose ``stats`` say what was compiled and what came from the cache)."""
    return (exp_shifted, intra_weights, score_tile)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def exp_shifted(values, shift, factor, out, poly):  # type: ignore[no-untyped-def]
    """``out[j, t] = exp(factor * (values[j, t] - shift[t]))`` for arguments <= 0, in plain arithmetic
    the compiler vectorises.

    Cody-Waite reduction ``x = k ln2 + r`` and a degree-6 polynomial for
    ``exp(r)`` (relative error ~2e-7, float32's rounding); ``2^k`` is built
    from its exponent bits through an int32 view of ``out``.
    """
    bits = out.view(np.int32)
    for j in range(values.shape[0]):
        v_row = values[j]
        b_row = bits[j]
        o_row = out[j]
        for t in range(CHUNK):
            v = factor * (v_row[t] - shift[t])
            v = v if v > _EXP_LOW else _EXP_LOW
            k = np.rint(v * _LOG2E)
            poly[t] = (v - k * _LN2_HI) - k * _LN2_LO
            b_row[t] = (np.int32(k) + np.int32(127)) << np.int32(23)
        # The polynomial in a second loop: fewer constants live at once, so no register spills
        # (measured: 4.0K -> 3.4K instructions per pair for the two exps).
        for t in range(CHUNK):
            r = poly[t]
            o_row[t] = o_row[t] * (f32(1.0) + r * (f32(1.0) + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * _C6))))))

@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def intra_weights(tokens, offsets, pairs, lengths, factor, out):  # type: ignore[no-untyped-def]
    """``out[pairs[k, l] + c] = softmax_l(factor * u_k . u_l)`` over caption c's own words.

    Ragged: the block of position pair (k, l) holds only the captions longer
    than both k and l (a prefix), so ``out`` has ``sum_c m_c^2`` entries.
    """
    d = tokens.shape[1]
    for c in prange(lengths.shape[0]):
        m = lengths[c]
        logits = np.empty(m, dtype=f32)
        for k in range(m):
            a = offsets[k] + c
            top = f32(-np.inf)
            for other in range(m):
                b = offsets[other] + c
                acc = f32(0.0)
                for x in range(d):
                    acc += tokens[a, x] * tokens[b, x]
                logits[other] = factor * acc
                top = max(top, logits[other])
            total = f32(0.0)
            for other in range(m):
                logits[other] = np.exp(logits[other] - top)
                total += logits[other]
            for other in range(m):
                out[pairs[k, other] + c] = logits[other] / total

@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def score_tile(sims, width, offsets, counts, lengths, intra, pairs, grams, threshold, lam, out):  # type: ignore[no-untyped-def]
    """Scores ``out [Bi, Bc]`` (captions in the tile's sorted order) from ``sims``, flat ``[Bi * n, width]``.

    ``width >= CHUNK``; columns past ``offsets[-1]`` are padding.
    """
    n_img = out.shape[0]
    n_cap = out.shape[1]
    n = grams.shape[1]
    positions = counts.shape[0]
    used = offsets[positions]
    for i in prange(n_img):
        base = i * n * width
        gram = grams[i]
        # Relevance: lam / (norm of LeakyReLU(s) over the caption's words), per region and token.
        scale = np.empty((n, width), dtype=f32)
        col = np.empty(n_cap, dtype=f32)
        for j in range(n):
            row = sims[base + j * width : base + (j + 1) * width]
            scale_row = scale[j]
            for c in range(n_cap):
                col[c] = f32(0.0)
            for k in range(positions):
                segment = row[offsets[k] : offsets[k] + counts[k]]
                for c in range(segment.shape[0]):
                    s = segment[c]
                    clipped = s if s > 0 else _LEAKY * s
                    col[c] += clipped * clipped
            for c in range(n_cap):
                col[c] = lam / (np.sqrt(col[c]) + _EPS)
            for k in range(positions):
                target = scale_row[offsets[k] : offsets[k] + counts[k]]
                for c in range(target.shape[0]):
                    target[c] = col[c]
            for t in range(used, width):
                scale_row[t] = f32(0.0)
        r_tok = np.empty(width, dtype=f32)
        term_tok = np.empty(width, dtype=f32)
        chunk_s = np.empty((n, CHUNK), dtype=f32)
        logits = np.empty((n, CHUNK), dtype=f32)
        logits_e = np.empty((n, CHUNK), dtype=f32)
        weights = np.empty((n, CHUNK), dtype=f32)
        lanes = np.empty((12, CHUNK), dtype=f32)  # per-token accumulators, a row each
        top, best, e_sum, e_dot, p_sum, p_dot, acc, quad, zero, poly = (
            lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7], lanes[8], lanes[9])
        top_odd, best_odd = lanes[10], lanes[11]
        for t in range(CHUNK):
            zero[t] = f32(0.0)
        for chunk in range((width + CHUNK - 1) // CHUNK):
            t0 = min(chunk * CHUNK, width - CHUNK)  # the last chunk overlaps the one before: same values again
            for t in range(CHUNK):
                top[t] = f32(-np.inf)
                best[t] = f32(-np.inf)
            # Relevance logits and each word's best similarity. The running maxima alternate
            # between two rows: "a[t] = x if x > a[t] else a[t]" compiles to a masked store,
            # which is very slow on AMD cores (measured once: about a fifth of the pass's cycles).
            for j in range(n):
                row = sims[base + j * width + t0 : base + j * width + t0 + CHUNK]
                scale_row = scale[j, t0 : t0 + CHUNK]
                s_row = chunk_s[j]
                l_row = logits[j]
                top_in, top_out = (top, top_odd) if j % 2 == 0 else (top_odd, top)
                best_in, best_out = (best, best_odd) if j % 2 == 0 else (best_odd, best)
                for t in range(CHUNK):
                    s = row[t]
                    s_row[t] = s
                    logit = (s if s > 0 else _LEAKY * s) * scale_row[t]
                    l_row[t] = logit
                    held = top_in[t]
                    top_out[t] = logit if logit > held else held
                    held = best_in[t]
                    best_out[t] = s if s > held else held
            if n % 2 == 1:
                for t in range(CHUNK):
                    top[t] = top_odd[t]
                    best[t] = best_odd[t]
            # Both softmaxes over the regions, max-shifted; the positive branch's
            # lam * ((s - t) - r) is lam * (s - max s).
            exp_shifted(logits, top, f32(1.0), logits_e, poly)
            exp_shifted(chunk_s, best, lam, weights, poly)
            for t in range(CHUNK):
                e_sum[t] = f32(0.0)
                e_dot[t] = f32(0.0)
                p_sum[t] = f32(0.0)
                p_dot[t] = f32(0.0)
                quad[t] = f32(0.0)
            for j in range(n):
                s_row = chunk_s[j]
                e_row = logits_e[j]
                w_row = weights[j]
                for t in range(CHUNK):
                    s = s_row[t]
                    e = e_row[t]
                    e_sum[t] += e
                    e_dot[t] += e * s
                    p = w_row[t] if s - threshold > 0 else f32(0.0)  # only the regions above the threshold
                    w_row[t] = p
                    p_sum[t] += p
                    p_dot[t] += p * s
            # ||vhat||^2 = w^T G w = 2 sum_j w_j (G_jj w_j / 2 + sum_{l<j} G_jl w_l), four l per pass.
            for j in range(n):
                diagonal = f32(0.5) * gram[j, j]
                wj = weights[j]
                for t in range(CHUNK):
                    acc[t] = diagonal * wj[t]
                for block in range(j // 4):
                    other = 4 * block
                    g0, g1, g2, g3 = gram[j, other], gram[j, other + 1], gram[j, other + 2], gram[j, other + 3]
                    w0, w1, w2, w3 = weights[other], weights[other + 1], weights[other + 2], weights[other + 3]
                    for t in range(CHUNK):
                        acc[t] += (g0 * w0[t] + g1 * w1[t]) + (g2 * w2[t] + g3 * w3[t])
                for other in range(4 * (j // 4), j):
                    g0 = gram[j, other]
                    w0 = weights[other]
                    for t in range(CHUNK):
                        acc[t] += g0 * w0[t]
                for t in range(CHUNK):
                    quad[t] += wj[t] * acc[t]
            # Per word: the relevance term, plus the positive branch where a region is above t.
            # The weights were shifted by exp(-lam r): so is the 1e-8 of the L1 normalisation.
            for t in range(CHUNK):
                top[t] = -max(best[t] - threshold, f32(0.0))
            exp_shifted(top.reshape((1, CHUNK)), zero, lam, acc.reshape((1, CHUNK)), poly)  # acc = exp(-lam r)
            r_out = r_tok[t0 : t0 + CHUNK]
            term_out = term_tok[t0 : t0 + CHUNK]
            for t in range(CHUNK):
                r = best[t] - threshold
                denominator = p_sum[t] + _EPS * acc[t]
                norm = np.sqrt(max(f32(2.0) * quad[t], f32(0.0))) / denominator
                positive = (p_dot[t] / denominator) / max(norm, _EPS)
                r_out[t] = r
                term_out[t] = e_dot[t] / e_sum[t] + (positive if r > 0 else f32(0.0))
        # Per caption, all captions at once per position: the negative branch (mask from the
        # propagated q = sum_l W_kl r_l, value from r_k) and the mean over the words.
        q = np.empty(n_cap, dtype=f32)
        total = np.zeros(n_cap, dtype=f32)
        for k in range(positions):
            live = counts[k]
            for c in range(live):
                q[c] = f32(0.0)
            for other in range(positions):
                both = min(live, counts[other])
                w_row = intra[pairs[k, other] : pairs[k, other] + both]
                r_row = r_tok[offsets[other] : offsets[other] + both]
                for c in range(both):
                    q[c] += w_row[c] * r_row[c]
            r_row = r_tok[offsets[k] : offsets[k] + live]
            t_row = term_tok[offsets[k] : offsets[k] + live]
            for c in range(live):
                total[c] += (r_row[c] if q[c] < 0 else f32(0.0)) + t_row[c]
        for c in range(n_cap):
            out[i, c] = total[c] / f32(lengths[c])
