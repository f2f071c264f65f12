"""The numba kernels of compact storage: the residual stage's level gather
(:func:`itmrt.scale.region_search.residual_best_similarities`) and the build's residual encoding.

Compact storage packs each region's residual codes a few dimensions to a byte
(4 at 2 bits). The residual stage needs each word's product with every
candidate region's residual levels; it multiplies the words with the levels as
8-bit integers (ONNX Runtime's integer GEMM), so the levels are first written
out, a byte's dimensions at a time, from a table of each byte value's 8-bit
levels at each byte position (``[width * 256]`` entries of ``per`` bytes: 256 KB
at d 1024 and 2 bits, which stays in cache). numpy's gather of the same table
converts every index first and took 4-5x as long (docs/region-index.md,
2026-12-06, session 4).

Encoding a shard's residuals at build time (:func:`encode_residuals`) is one
pass per region: residual, level index by counting the cutoffs below it, packed
bits, with no ``[R, d]`` temporaries; numpy's encode
(:meth:`itmrt.runtime.compact_regions.ResidualCodec.encode`, which it equals
byte for byte) took 55.8 s of one core per 50,000-image shard, most of a 1M
build's time (docs/region-index.md, 2026-12-06, session 5).

Importing this module imports numba (the ``cpu`` extra); without it the stage
gathers float levels in numpy and multiplies them in float32, and the build
encodes in numpy.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, boundscheck=False)
def gather_levels(table, packed, out):  # type: ignore[no-untyped-def]
    """``out[q, p] = table[p * 256 + packed[q, p]]``: each packed byte's levels (an entry of ``per`` 8-bit levels,
    viewed as one unsigned integer of that width) for rows ``packed [count, width]`` uint8."""
    count, width = packed.shape
    for q in range(count):
        for p in range(width):
            out[q, p] = table[p * 256 + np.intp(packed[q, p])]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def encode_residuals(vectors, centroids, codes, cutoffs, counts, entries, out):  # type: ignore[no-untyped-def]
    """Pack each region's residual level codes into ``out [R, packed_width]`` (zeroed): region ``r`` is
    ``vectors[r] - centroids[codes[r]]``; dimension ``k``'s code counts its ``counts[k]`` cutoffs
    ``cutoffs[k]`` below the residual (as numpy's encode does, in float32); ``entries [E, 5]`` place code bits:
    ``(dimension, shift, mask, byte, bit)`` -> ``out[r, byte] |= ((code >> shift) & mask) << bit``
    (:meth:`itmrt.runtime.compact_regions.ResidualCodec.packing`). Releases the GIL: blocks encode on threads."""
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
