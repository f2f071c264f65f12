"""Compiled kernels of compact storage's codec (:class:`itmrt.runtime.compact_regions.ResidualCodec`).

- :func:`encode_residuals` (a shard's build): one pass per region - its
  residual to its centroid, each dimension's level index by counting the
  cutoffs below it, the packed bits - with no ``[R, d]`` temporaries. numpy's
  :meth:`~itmrt.runtime.compact_regions.ResidualCodec.encode`, whose bytes it
  writes exactly, took 55.8 s of one core per 50,000-image shard, most of a 1M
  build (docs/region-index.md, 2026-12-06, session 5).
- :func:`decode_levels` (a rerank's or a scan's decode): each region's centroid
  plus the levels its packed bytes stand for, read per dimension without
  gathering the centroids or converting indices first, and normalised in the
  same pass; numpy's decode to float32 rounding (the norm is summed in another
  order).

Importing this module imports numba (the ``cpu`` extra); without it the codec
runs in numpy.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, boundscheck=False)
def encode_residuals(vectors, centroids, codes, cutoffs, counts, entries, out):  # type: ignore[no-untyped-def]
    """Pack each region's residual level codes into ``out [R, packed_width]`` (zeroed): region ``r`` is
    ``vectors[r] - centroids[codes[r]]``; dimension ``k``'s code counts its ``counts[k]`` cutoffs
    ``cutoffs[k]`` below the residual (as numpy's encode does, in float32); ``entries [E, 5]`` place code bits:
    ``(dimension, shift, mask, byte, bit)`` -> ``out[r, byte] |= ((code >> shift) & mask) << bit``
    (:meth:`~itmrt.runtime.compact_regions.ResidualCodec.packing`). Releases the GIL: blocks encode on threads."""
    rows, depth = vectors.shape
    level = np.zeros(depth, dtype=np.uint8)
    for r in range(rows):
        c = codes[r]
        for k in range(depth):
            value = vectors[r, k] - centroids[c, k]
            n = 0
            for j in range(counts[k]):
                if value > cutoffs[k, j]:
                    n += 1
            level[k] = n
        for e in range(entries.shape[0]):
            code = (level[entries[e, 0]] >> entries[e, 1]) & entries[e, 2]
            out[r, entries[e, 3]] |= np.uint8(code << entries[e, 4])


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def decode_levels(levels, bits, packed, codes, centroids, out):  # type: ignore[no-untyped-def]
    """Each region's unit vector ``out[r] = v / (||v|| + 1e-8)`` with ``v[k] = centroids[codes[r], k] +
    levels[k, code]``, ``code`` dimension ``k``'s ``bits`` (1, 2 or 4: every dimension the same) in byte
    ``k // (8 / bits)`` of ``packed[r]``, from bit ``bits * (k % (8 / bits))``. ``v`` is numpy's decode's sum
    exactly; the norm is summed in another order than numpy's (the unit vectors agree to float32 rounding).

    The levels are read per dimension (``[d, 2^bits]``: 16 KB at d 1024 and 2 bits, which stays in the first
    cache) rather than from a table of each byte value's levels (1 MB): a rerank decodes a few images between
    other work, and there nearly every read of the larger table missed the cache (a shard's 10 images: 1.2
    against 0.55 ms with cold caches, docs/region-index.md, 2026-12-06, session 6)."""
    rows, depth = out.shape
    width = packed.shape[1]
    per = 8 // bits
    mask = (1 << bits) - 1
    for r in range(rows):
        c = codes[r]
        done = 0
        if bits == 2:  # the default: with the slots' count and shifts literals LLVM vectorises the loop (a
            done = depth // 4  # rerank's 50 images: 1.0 against 2.0 ms; session 15); the same values
            for p in range(done):
                byte = np.intp(packed[r, p])
                for j in range(4):
                    out[r, 4 * p + j] = centroids[c, 4 * p + j] + levels[4 * p + j, (byte >> (2 * j)) & 3]
        for p in range(done, width):
            byte = np.intp(packed[r, p])
            for j in range(per):
                k = p * per + j
                if k < depth:
                    out[r, k] = centroids[c, k] + levels[k, (byte >> (bits * j)) & mask]
        total = np.float32(0.0)
        for k in range(depth):
            total += out[r, k] * out[r, k]
        scale = np.float32(1.0) / (np.sqrt(total) + np.float32(1e-8))
        for k in range(depth):
            out[r, k] *= scale
