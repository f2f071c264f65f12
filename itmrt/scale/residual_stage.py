"""The region index's residual stage under compact storage: each word's best region of each candidate image,
read from the regions' centroids and residual codes without decoding the vectors (PLAID's residual stage).

Word ``i``'s similarity to a region with centroid ``c`` and residual levels
``l`` is taken as ``u_i . c + u_i . l``: the first is read from the caption's
probe (``U C^T``, already computed), the second is one product of the words
with the regions' levels. The decoded vector ``c + l`` is not re-normalised
(its norm is within a few percent of 1: a region is a unit vector and ``l`` its
quantised residual), which the exact rerank does: this is an estimate, used to
choose which candidates are reranked.

How the product is made, fastest first:

- **Codes as integers** (numba, every dimension at 1 or 2 bits: the default
  compact storage). A dimension's Lloyd-Max levels are fitted as
  ``intercept + slope * code`` (:meth:`ResidualCodec.affine_levels`: exact at 1
  bit; at 2 bits within a few percent, as Lloyd-Max levels of a bell-shaped
  residual are nearly evenly spaced). Then ``u . l = u . intercept +
  (u * slope) . code``: the packed codes are only shifted out to one byte each
  (:func:`itmrt.scale.residual_kernels.unpack_codes`) and multiplied with the
  words quantised to 8 bits by ONNX Runtime's integer GEMM. Writing out codes
  took 0.65 ms for 1,000 images of 36 x 1024, looking each byte's levels up
  in a table 5.2 ms (session 15, docs/region-index.md).
- **Levels as integers** (numba, every dimension at 4 bits, where evenly
  spaced levels do not fit): each packed byte's levels looked up as 8-bit
  integers (:func:`itmrt.scale.residual_kernels.gather_levels`) and multiplied
  with the words quantised to 7 bits (which keeps AVX2's pairwise 16-bit sums
  of level x word from saturating).
- **numpy** (no numba): the float levels gathered and multiplied in float32.

Compact storage with mixed bits decodes the vectors instead
(:func:`itmrt.scale.region_search.stored_best_similarities`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from itmrt.limits import usable_cores
from itmrt.runtime.compact_regions import CompactRegions, ResidualCodec
from itmrt.runtime.fused import call_compiled
from itmrt.scale.positional import PositionalRows, read_rows
from itmrt.scale.regions import residual_kernels
from itmrt.scale.threads import in_parallel

if TYPE_CHECKING:
    from itmrt.scale.region_search import CaptionProbe

RESIDUAL_BLOCK = 32
"""Images per block of the residual stage: a block's 1,152 regions of written-out codes (1.2 MB at d 1024)
stay in a core's cache between their writing and the GEMM's read of them (1,000 images on one thread: the
stage's parts took 19 ms in blocks of 32 against 23 in blocks of 128, session 15)."""


@dataclass
class IntegerWords:
    """A caption's words made ready for the integer product with a block's written-out rows (``[rows,
    columns]`` unsigned 8-bit, ``zero`` subtracted): ``words [columns, m]`` int8 whose column order is the rows'
    (``u . l = offset + scale * (rows - zero) . words``); ``expand(packed, out)`` writes a block's rows."""

    words: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    zero: int
    columns: int
    expand: Callable[[np.ndarray, np.ndarray], None]


def integer_words(tokens: np.ndarray, codec: ResidualCodec, kernels: Any) -> IntegerWords | None:
    """The words ``tokens [m, d]`` for the integer product with ``codec``'s residuals (codes where the levels
    fit a line, else 8-bit levels; see the module docstring), or None where neither applies."""
    depth, bits = tokens.shape[1], codec.uniform_bits
    affine = codec.affine_levels()
    if affine is not None and bits is not None:
        intercept, slope = affine
        per = 8 // bits
        width = -(-depth // per)
        dims = (np.arange(width)[None, :] * per + np.arange(per)[:, None]).reshape(-1)  # column j's dimension
        used = dims < depth  # the last byte's spare slots: weight 0
        weighted = np.zeros((len(tokens), width * per), dtype=np.float32)
        weighted[:, used] = tokens[:, dims[used]] * slope[dims[used]]
        offset = (tokens * intercept).sum(axis=1, dtype=np.float32)  # no BLAS call: its threads would spin

        def unpack(packed: np.ndarray, out: np.ndarray) -> None:
            call_compiled(kernels.unpack_codes, packed, bits, out)

        return _quantised(weighted, offset, 127, 0, unpack)
    integers = codec.integer_levels()
    if integers is None:
        return None
    entries, scales = integers
    weighted = np.zeros((len(tokens), len(scales)), dtype=np.float32)
    weighted[:, :depth] = tokens * scales[:depth]

    def gather(packed: np.ndarray, out: np.ndarray) -> None:
        call_compiled(kernels.gather_levels, entries, packed, out.view(entries.dtype))

    return _quantised(weighted, np.zeros(len(tokens), dtype=np.float32), 63, 128, gather)


def _quantised(weighted: np.ndarray, offset: np.ndarray, top: int, zero: int,
               expand: Callable[[np.ndarray, np.ndarray], None]) -> IntegerWords:
    """``weighted [m, columns]`` rounded to integers of at most ``top`` in magnitude, one scale per word."""
    scale = (np.maximum(np.abs(weighted).max(axis=1), 1e-30) / top).astype(np.float32)
    words = np.ascontiguousarray(np.rint(weighted / scale[:, None]).astype(np.int8).T)
    return IntegerWords(words, scale, offset, zero, weighted.shape[1], expand)


def residual_best_similarities(probe: CaptionProbe, stored: CompactRegions, rows: np.ndarray,
                               product: Callable[[np.ndarray, np.ndarray], np.ndarray], threads: int = 0,
                               block: int = RESIDUAL_BLOCK) -> np.ndarray:
    """``[m, len(rows)]``: each word's largest estimated similarity over each image's regions (module
    docstring), for compact storage whose dimensions all have 1, 2 or 4 bits. ``product``: the float GEMM of
    the numpy path.

    The blocks are split over ``threads`` threads (default: the usable cores), each with its own one-thread
    integer GEMM: one GEMM's threads did not help, the stage took 23 ms for 1,000 images of 36 x 1024 at 2 bits on
    one thread and on two (docs/region-index.md, session 13)."""
    table = stored.codec.byte_levels()
    assert table is not None
    width, regions = table.shape[0] // 256, stored.shape[1]
    by_centroid = probe.centroid_sims
    out = np.empty((len(probe.tokens), len(rows)), dtype=np.float32)
    kernels = residual_kernels()
    ready = integer_words(probe.tokens, stored.codec, kernels) if kernels is not None else None
    parts = max(1, min(int(threads or usable_cores()), -(-len(rows) // block)))
    gemm = _integer_gemm(1 if parts > 1 else threads) if ready is not None else None

    # one buffer of rows and one of written-out codes or levels a thread, reused from block to block: fresh
    # arrays for each block took a shard's 1,000 images 24-30 ms on one thread, against 18-21 (session 14)
    def run(first: int, last: int) -> None:
        many = min(block, last - first)
        reads = np.empty((many, regions, width), dtype=np.uint8) if isinstance(stored.residuals, PositionalRows) \
            else None
        written = np.empty(many * regions * ready.columns, dtype=np.uint8) if ready is not None else None
        for start in range(first, last, block):
            part = rows[start : min(start + block, last)]
            packed = read_rows(stored.residuals, part, reads).reshape(-1, width)
            codes = np.asarray(stored.codes[part], dtype=np.intp).ravel()
            if ready is not None and written is not None and gemm is not None:
                expanded = written[: len(packed) * ready.columns].reshape(len(packed), ready.columns)
                ready.expand(packed, expanded)
                products = gemm(expanded, ready.words, ready.zero)
                call_compiled(kernels.best_over_regions, products, ready.scale, ready.offset, codes, by_centroid,
                              regions, out, start)
                continue
            out[:, start : start + len(part)] = _numpy_best(probe.tokens, table, packed, codes, by_centroid,
                                                            regions, product)

    in_parallel(run, len(rows), parts)
    return out


def _numpy_best(tokens: np.ndarray, table: np.ndarray, packed: np.ndarray, codes: np.ndarray,
                by_centroid: np.ndarray, regions: int, product: Callable[[np.ndarray, np.ndarray], np.ndarray],
                ) -> np.ndarray:
    """The stage's step for one block without numba: float levels gathered, one float32 product."""
    width = packed.shape[1]
    index = np.uint16 if table.shape[0] <= 1 << 16 else np.intp  # a smaller index array: a faster gather
    flat = packed.astype(index) + (np.arange(width) * 256).astype(index)
    levels = np.take(table, flat, axis=0).reshape(len(packed), -1)[:, : tokens.shape[1]]
    sims = product(tokens, levels)
    sims += by_centroid[codes].T
    return sims.reshape(len(sims), -1, regions).max(axis=2)


@functools.lru_cache(maxsize=8)
def _integer_gemm(threads: int) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
    """``(a - zero) b`` for ``a [n, k]`` uint8 and ``b [k, m]`` int8, as float32 (ONNX Runtime's
    MatMulInteger)."""
    from onnx import TensorProto, helper

    from itmrt.runtime.fused import _session

    session = _session([helper.make_node("MatMulInteger", ["a", "b", "zero"], ["c"])],
                       [helper.make_tensor_value_info("a", TensorProto.UINT8, ["rows", "depth"]),
                        helper.make_tensor_value_info("b", TensorProto.INT8, ["depth", "cols"]),
                        helper.make_tensor_value_info("zero", TensorProto.UINT8, [])],
                       helper.make_tensor_value_info("c", TensorProto.INT32, ["rows", "cols"]), threads)
    zeros = {value: np.array(value, dtype=np.uint8) for value in (0, 128)}

    def product(a: np.ndarray, b: np.ndarray, zero: int) -> np.ndarray:
        return np.asarray(session.run(None, {"a": a, "b": b, "zero": zeros[zero]})[0]).astype(np.float32)

    return product
