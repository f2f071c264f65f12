"""The numba kernels of the region index's residual stage (:mod:`itmrt.scale.residual_stage`).

Compact storage packs each region's residual codes a few dimensions to a byte
(4 at 2 bits). The residual stage multiplies the words with the regions'
codes or levels as 8-bit integers (ONNX Runtime's integer GEMM), so each
block's rows are first written out one byte a dimension:

- :func:`unpack_codes`: the codes themselves, slot by slot (where a
  dimension's levels are taken as evenly spaced: 1 and 2 bits);
- :func:`gather_levels`: each packed byte's 8-bit levels from a table of
  every byte value at every byte position (``[width * 256]`` entries of
  ``per`` bytes, 256 KB at d 1024 and 4 bits, which stays in cache). numpy's
  gather of the same table converts every index first and took 4-5x as long
  (docs/region-index.md, 2026-12-06, session 4).

The GEMM's products are then scaled, offset, added to each region's centroid
similarity and reduced to each word's best region of each image in one pass
(:func:`best_over_regions`) instead of numpy's multiply, gather-add, maximum
and transpose, each writing a temporary: 0.4 ms against 4.7 for 1,000 images
alone, about 1 ms of the stage's 27 on one thread (session 14).

Importing this module imports numba (the ``cpu`` extra); without it the stage
gathers float levels in numpy and multiplies them in float32.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, boundscheck=False)
def unpack_codes(packed, bits, out):  # type: ignore[no-untyped-def]
    """``out[q, slot * width + p]``: the ``bits``-bit (1 or 2) code at slot ``slot`` of byte ``p`` of row ``q``
    (the dimension ``p * (8 // bits) + slot``), for rows ``packed [count, width]`` uint8: slot after slot, so each
    inner loop is one shift and mask over a row's bytes. The slots' count and the mask are literals in each
    branch: with them read from ``bits`` LLVM did not vectorise the loop (6x slower, session 15)."""
    count, width = packed.shape
    for q in range(count):
        if bits == 1:
            for slot in range(8):
                for p in range(width):
                    out[q, slot * width + p] = (packed[q, p] >> slot) & 1
        else:
            for slot in range(4):
                for p in range(width):
                    out[q, slot * width + p] = (packed[q, p] >> (2 * slot)) & 3


@numba.njit(cache=True, nogil=True, boundscheck=False)
def gather_levels(table, packed, out):  # type: ignore[no-untyped-def]
    """``out[q, p] = table[p * 256 + packed[q, p]]``: each packed byte's levels (an entry of ``per`` 8-bit levels,
    viewed as one unsigned integer of that width) for rows ``packed [count, width]`` uint8."""
    count, width = packed.shape
    for q in range(count):
        for p in range(width):
            out[q, p] = table[p * 256 + np.intp(packed[q, p])]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def best_over_regions(products, scale, offset, codes, by_centroid, regions, out, first):  # type: ignore[no-untyped-def]
    """``out[w, first + i]``: word ``w``'s largest ``products[i * regions + r, w] * scale[w] + offset[w] +
    by_centroid[codes[i * regions + r], w]`` over image ``i``'s regions ``r`` (``products [images * regions, m]``
    the words' integer products with the regions' codes or levels, ``by_centroid [C, m]`` their similarities to
    the centroids)."""
    rows, words = products.shape
    best = np.empty(words, dtype=np.float32)
    for image in range(rows // regions):
        for w in range(words):
            best[w] = -np.inf
        for r in range(regions):
            row = image * regions + r
            centroid = codes[row]
            for w in range(words):
                value = products[row, w] * scale[w] + by_centroid[centroid, w]
                if value > best[w]:
                    best[w] = value
        for w in range(words):
            out[w, first + image] = best[w] + offset[w]
