"""Compact region storage: each region vector as its centroid plus a residual of a few bits per dimension.

A region ``v`` with nearest centroid ``c`` keeps ``c``'s id and, per
dimension ``k``, which of ``2^b_k`` levels its residual ``v_k - c_k`` is
nearest. Decoding gives ``c + levels``, l2-normalised as the image encoder's
output is.

The levels are a Lloyd-Max quantiser per dimension, learned from a training
sample of residuals (levels the means of their cells, cells bounded halfway
between levels, a few iterations from equal-mass quantiles). The bits ``b_k``
(0 to :data:`MAX_BITS`) are allocated per dimension for an *average* budget
(``--residual-bits``, which may be fractional): greedily, each further bit to
the dimension whose measured distortion it lowers most. On the shipped NAAF
Lloyd-Max levels halved the score error of equal-mass buckets at the same
2 bits (``benchmarks/bench_region_index.py shipped``; docs/region-index.md).

Layout of a region's bytes: a dimension's code of ``b`` bits is split into
pieces of 4, 2 and 1 bits (3 = 2 + 1); the dimensions sharing a piece are
packed together, ``8 / width`` to a byte, piece after piece. With every
dimension at 1, 2 or 4 bits this is one piece: the layout of galleries written
before the allocation (equal-mass buckets, uniform bits), which decode as
before. At 36 regions x d 1024, 2.4 bits is 11,059 bytes of residuals plus 72
bytes of centroid ids per image (float16: 73,728 bytes).

:class:`CompactRegions` stands where a gallery's ``[images, regions, d]``
embeddings array stands: indexing it (an int, a slice or an array of rows)
decodes those images to float32, so the tiled scorers and the rerank read it
one tile at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.optional import compiled_kernels

MAX_BITS = 4
"""Most bits one dimension's residual gets."""
LLOYD_ITERATIONS = 12
PIECES = (4, 2, 1)
"""Widths a dimension's code is split into for packing."""
AFFINE_FIT_LIMIT = 0.1
"""Largest rms error of a line through the levels, as a share of their rms, for which the residual stage reads
codes through that line (:meth:`ResidualCodec.affine_levels`): 2-bit Lloyd-Max levels of bell-shaped residuals
err 0.05; the 2-bit code's own error is about 0.36 of the levels' rms, so 0.1 adds under a tenth to it."""


@dataclass
class ResidualCodec:
    """Per-dimension residual levels ``buckets [d, 2^max_bits]`` (a dimension's first ``2^bits[k]``; the rest
    NaN, so that a reader from before the allocation refuses a gallery whose layout it cannot decode - its check
    for finite buckets - while uniform 1, 2 or 4 bits stay readable by it) and each dimension's ``bits [d]``."""

    buckets: np.ndarray
    bits_per_dim: np.ndarray

    def __post_init__(self) -> None:
        self.buckets = np.ascontiguousarray(self.buckets, dtype=np.float32)
        self.bits_per_dim = np.asarray(self.bits_per_dim, dtype=np.uint8)
        depth = len(self.bits_per_dim)
        if self.buckets.ndim != 2 or self.buckets.shape[0] != depth or \
                (depth and (1 << int(self.bits_per_dim.max())) > self.buckets.shape[1]):
            raise ItmrtError(f"compact regions: residual levels {self.buckets.shape} do not fit the bits of "
                             f"{depth} dimensions; re-index the gallery")
        used = np.arange(self.buckets.shape[1]) < (1 << self.bits_per_dim.astype(np.int64))[:, None]
        if not np.isfinite(self.buckets[used]).all():
            raise ItmrtError("compact regions: residual levels are not finite; re-index the gallery")
        self.segments = _segments(self.bits_per_dim)

    @property
    def bits(self) -> float:
        """Average bits per dimension."""
        return float(self.bits_per_dim.mean()) if len(self.bits_per_dim) else 0.0

    @classmethod
    def fit(cls, vectors: np.ndarray, centroids: np.ndarray, bits: float) -> ResidualCodec:
        """Lloyd-Max levels and a bit allocation of ``bits`` per dimension on average, from the residuals of
        ``vectors [R, d]`` to their centroids ``[R, d]``."""
        residuals = np.asarray(vectors, dtype=np.float32) - centroids
        depth = residuals.shape[1]
        ordered = np.sort(residuals, axis=0)
        levels, errors = {}, np.empty((depth, MAX_BITS + 1), dtype=np.float64)
        errors[:, 0] = residuals.var(axis=0)
        for width in range(1, MAX_BITS + 1):
            levels[width], errors[:, width] = lloyd_max(ordered, 1 << width)
        allocation = allocate_bits(errors, int(round(bits * depth)))
        buckets = np.empty((depth, 1 << int(allocation.max(initial=0))), dtype=np.float32)
        for k, width in enumerate(allocation):
            own = levels[width][k] if width else residuals[:, k].mean(keepdims=True)
            buckets[k, : len(own)], buckets[k, len(own) :] = own, np.nan
        return cls(buckets, allocation)

    @classmethod
    def from_buckets(cls, buckets: np.ndarray, bits_per_dim: np.ndarray | None = None) -> ResidualCodec:
        """A stored codec; without ``bits_per_dim`` (galleries written before the allocation) every dimension
        has ``log2(levels)`` bits."""
        buckets = np.asarray(buckets, dtype=np.float32)
        if bits_per_dim is None:
            width = int(buckets.shape[1]).bit_length() - 1
            if buckets.ndim != 2 or 1 << width != buckets.shape[1] or width not in PIECES:
                raise ItmrtError(f"compact regions: residual buckets of shape {buckets.shape} are not 1, 2 or 4 "
                                 "bits; re-index the gallery")
            bits_per_dim = np.full(buckets.shape[0], width, dtype=np.uint8)
        return cls(buckets, bits_per_dim)

    def packed_width(self, depth: int) -> int:
        """Bytes per region (``depth``: the dimensions, as the codec was fitted)."""
        assert depth == len(self.bits_per_dim)
        return sum(-(-len(dims) * width // 8) for dims, _, width in self.segments)

    def encode(self, vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """``[R, packed_width]`` uint8: each dimension's nearest level, packed (see the module)."""
        residuals = np.asarray(vectors, dtype=np.float32) - centroids
        codes = np.zeros(residuals.shape, dtype=np.uint8)
        for width in range(1, MAX_BITS + 1):  # cells bounded halfway between levels
            dims = np.flatnonzero(self.bits_per_dim == width)
            if len(dims) == 0:
                continue
            levels = self.buckets[dims, : 1 << width]
            cutoffs = (levels[:, 1:] + levels[:, :-1]) / 2
            part = residuals[:, dims]
            found = np.zeros(part.shape, dtype=np.uint8)
            for cut in cutoffs.T:
                found += part > cut
            codes[:, dims] = found
        return np.concatenate([pack((codes[:, dims] >> shift) & ((1 << width) - 1), width)
                               for dims, shift, width in self.segments], axis=1) if self.segments else \
            np.zeros((len(codes), 0), dtype=np.uint8)

    def packing(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What :meth:`encode` computes, as tables for a compiled encoder
        (:func:`itmrt.runtime.compact_kernels.encode_residuals`): ``cutoffs [d, 2^max_bits - 1]`` float32 (each
        dimension's, halfway between its levels, computed as :meth:`encode` computes them), ``counts [d]`` (how
        many a dimension has) and ``entries [E, 5]`` int64: ``(dimension, shift, mask, byte, bit)`` for each
        piece of a dimension's code in the packed row."""
        depth = len(self.bits_per_dim)
        cutoffs = np.full((depth, max(1, self.buckets.shape[1] - 1)), np.inf, dtype=np.float32)
        for width in range(1, MAX_BITS + 1):
            dims = np.flatnonzero(self.bits_per_dim == width)
            levels = self.buckets[dims, : 1 << width]
            cutoffs[dims, : (1 << width) - 1] = (levels[:, 1:] + levels[:, :-1]) / 2
        counts = ((1 << self.bits_per_dim.astype(np.int64)) - 1).astype(np.int64)
        entries, at = [], 0
        for dims, shift, width in self.segments:
            per = 8 // width
            entries += [(int(dim), shift, (1 << width) - 1, at + i // per, (i % per) * width)
                        for i, dim in enumerate(dims.tolist())]
            at += -(-len(dims) * width // 8)
        return cutoffs, counts, np.array(entries, dtype=np.int64).reshape(-1, 5)

    def codes(self, packed: np.ndarray) -> np.ndarray:
        """``[R, d]`` level indices from packed rows ``[R, packed_width]``."""
        depth = len(self.bits_per_dim)
        codes = np.zeros((*packed.shape[:-1], depth), dtype=np.uint8)
        at = 0
        for dims, shift, width in self.segments:
            size = -(-len(dims) * width // 8)
            part = unpack(packed[..., at : at + size], width, len(dims))
            at += size
            if len(self.segments) == 1 and len(dims) == depth:  # every dimension at the same 1, 2 or 4 bits
                return part
            codes[..., dims] |= part << shift
        return codes

    def decode(self, packed: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """``[R, d]`` float32 unit vectors from packed residual codes and their centroids ``[R, d]``."""
        depth = int(centroids.shape[-1])
        table = self.byte_levels()
        if table is not None:  # one gather of each byte's levels: no unpacking (a rerank decodes a few images)
            width = table.shape[0] // 256
            flat = packed.reshape(-1, width).astype(np.intp) + 256 * np.arange(width)
            levels = np.take(table, flat, axis=0).reshape(*packed.shape[:-1], -1)[..., :depth]
        else:
            levels = self.buckets[np.arange(depth), self.codes(packed)]
        out = centroids + levels
        return (out / (np.linalg.norm(out, axis=-1, keepdims=True) + 1e-8)).astype(np.float32)

    def decode_coded(self, packed: np.ndarray, centroids: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """:meth:`decode` of ``packed [R, packed_width]`` against ``centroids[codes]`` (``centroids [C, d]``, all of
        them), without gathering the centroids first: compiled where numba is installed and every dimension has
        the same 1, 2 or 4 bits (:func:`itmrt.runtime.compact_kernels.decode_levels`: numpy's values to float32
        rounding; every read of a gallery decodes the same way), else numpy."""
        kernels, bits = compact_kernels(), self.uniform_bits
        index = np.asarray(codes, dtype=np.intp).reshape(-1)
        if kernels is None or bits is None or centroids.dtype != np.float32:
            return self.decode(packed, centroids[index])
        from itmrt.runtime.fused import call_compiled

        out = np.empty((len(index), int(centroids.shape[1])), dtype=np.float32)
        call_compiled(kernels.decode_levels, self.buckets, bits, np.ascontiguousarray(packed), index,
                      np.ascontiguousarray(centroids), out)
        return out

    @property
    def uniform_bits(self) -> int | None:
        """The bits of every dimension where all have the same 1, 2 or 4 (one packed piece), else None."""
        if len(self.segments) != 1 or len(self.segments[0][0]) != len(self.bits_per_dim):
            return None
        return int(self.segments[0][2])

    def byte_levels(self) -> np.ndarray | None:
        """Where every dimension has the same 1, 2 or 4 bits (:attr:`uniform_bits`): ``[width * 256, 8 / bits]``,
        the levels of the dimensions each byte value at each byte position stands for (None otherwise)."""
        bits = self.uniform_bits
        if bits is None:
            return None
        if getattr(self, "_byte_levels", None) is None:
            per, depth = 8 // bits, len(self.bits_per_dim)
            width = -(-depth // per)
            values = np.arange(256)
            codes = np.stack([(values >> (slot * bits)) & ((1 << bits) - 1) for slot in range(per)], axis=1)
            dims = np.minimum(np.arange(width * per), depth - 1).reshape(width, 1, per)
            self._byte_levels = np.ascontiguousarray(self.buckets[dims, codes[None]].reshape(width * 256, per))
        return self._byte_levels

    def affine_levels(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Where every dimension has the same 1 or 2 bits and the levels lie near a line: ``(intercept [d],
        slope [d])``, each dimension's levels fitted as ``intercept + slope * code`` by least squares. Exact at 1
        bit; at 2 bits Lloyd-Max levels of a bell-shaped residual are nearly evenly spaced: the fit's error was
        4.5-5.3% of the levels' rms on the benchmark's 100K galleries (docs/region-index.md, session 15), a few
        percent more error than the 2-bit code's own. Levels further from a line than :data:`AFFINE_FIT_LIMIT`
        (a skewed residual, say) give None. The residual stage reads codes through this line
        (:mod:`itmrt.scale.residual_stage`); decoding always uses the levels themselves."""
        bits = self.uniform_bits
        if bits not in (1, 2):
            return None
        if not hasattr(self, "_affine_levels"):
            levels = self.buckets[:, : 1 << bits].astype(np.float64)
            codes = np.arange(1 << bits) - ((1 << bits) - 1) / 2  # centred
            slope = (levels * codes).sum(axis=1) / np.square(codes).sum()
            intercept = levels.mean(axis=1) - slope * ((1 << bits) - 1) / 2
            error = levels - (intercept[:, None] + slope[:, None] * np.arange(1 << bits))
            fits = np.sqrt(np.square(error).mean()) <= AFFINE_FIT_LIMIT * np.sqrt(np.square(levels).mean())
            self._affine_levels = (intercept.astype(np.float32), slope.astype(np.float32)) if fits else None
        return self._affine_levels

    def integer_levels(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Where :meth:`byte_levels` applies: ``(table, scales)``, each byte's levels as 8-bit codes
        ``round(level / scale) + 128`` (``scale`` its dimension's largest level magnitude / 127), the ``per`` of
        one entry packed into one unsigned integer (``[width * 256]``), and the scales ``[width * per]``: the
        residual stage multiplies words with levels as integers (:mod:`itmrt.scale.residual_kernels`)."""
        table = self.byte_levels()
        if table is None:
            return None
        if getattr(self, "_integer_levels", None) is None:
            width, per = table.shape[0] // 256, table.shape[1]
            by_dim = table.reshape(width, 256, per)  # [byte position, byte value, dimension of the byte]
            scales = np.abs(by_dim).max(axis=1) / 127  # [width, per]
            codes = np.rint(by_dim / np.where(scales > 0, scales, 1)[:, None, :]).clip(-127, 127) + 128
            entries = np.ascontiguousarray(codes.astype(np.uint8).reshape(width * 256, per))
            self._integer_levels = (entries.view(np.dtype(f"uint{8 * per}")).reshape(-1),
                                    scales.reshape(-1).astype(np.float32))
        return self._integer_levels


def codes_fit(codes: np.ndarray, count: int) -> bool:
    """Whether ``codes`` are ids of ``count`` centroids: integers from 0 to ``count - 1`` (the compiled decoder
    and the residual stage index the centroids by them unchecked)."""
    return codes.dtype.kind in "iu" and (codes.size == 0 or 0 <= int(codes.min()) <= int(codes.max()) < count)


def compact_kernels() -> Any:
    """:mod:`itmrt.runtime.compact_kernels` where numba is installed (the ``cpu`` extra), else None."""
    return compiled_kernels("itmrt.runtime.compact_kernels")


def lloyd_max(ordered: np.ndarray, count: int, iterations: int = LLOYD_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """``count`` levels per dimension ``[d, count]`` and their mean squared error ``[d]`` from each dimension's
    sorted training values ``ordered [R, d]`` (cell means from prefix sums: one pass over the data per
    iteration is a search of the sorted column)."""
    rows, depth = ordered.shape
    sums = np.concatenate([np.zeros((1, depth)), np.cumsum(ordered, axis=0, dtype=np.float64)])
    squares = np.concatenate([np.zeros((1, depth)), np.cumsum(np.square(ordered, dtype=np.float64), axis=0)])
    levels = np.quantile(ordered, (2 * np.arange(count) + 1) / (2 * count), axis=0).T.astype(np.float64)
    columns = np.arange(depth)
    for _ in range(iterations + 1):
        cutoffs = (levels[:, 1:] + levels[:, :-1]) / 2
        edges = np.empty((depth, count + 1), dtype=np.int64)
        edges[:, 0], edges[:, -1] = 0, rows
        for k in range(depth):
            edges[k, 1:-1] = np.searchsorted(ordered[:, k], cutoffs[k])
        size = np.diff(edges, axis=1)
        total = sums[edges[:, 1:], columns[:, None]] - sums[edges[:, :-1], columns[:, None]]
        levels = np.where(size > 0, total / np.maximum(size, 1), levels)
        levels.sort(axis=1)
    cell_squares = squares[edges[:, 1:], columns[:, None]] - squares[edges[:, :-1], columns[:, None]]
    error = (cell_squares - 2 * levels * total + size * levels**2).sum(axis=1) / max(1, rows)
    return levels.astype(np.float32), np.maximum(error, 0.0)


def allocate_bits(errors: np.ndarray, total: int) -> np.ndarray:
    """Bits per dimension ``[d]`` summing to ``total`` (at most :data:`MAX_BITS` each) from each dimension's
    error at 0..MAX_BITS bits ``[d, MAX_BITS + 1]``: the ``total`` largest gains of one more bit (made
    non-increasing per dimension, so taking them greedily is taking a prefix of each dimension's)."""
    depth = len(errors)
    gains = np.minimum.accumulate(errors[:, :-1] - errors[:, 1:], axis=1)  # [d, MAX_BITS]
    total = max(0, min(total, depth * MAX_BITS))
    order = np.lexsort((np.tile(np.arange(MAX_BITS), depth), np.repeat(np.arange(depth), MAX_BITS),
                        -gains.ravel()))[:total]
    return np.bincount(order // MAX_BITS, minlength=depth).astype(np.uint8)


def _segments(bits_per_dim: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """``(dims, shift, width)`` pieces of the packed layout: each dimension's code split into widths 4, 2, 1."""
    pieces: dict[tuple[int, int], list[int]] = {}
    for k, bits in enumerate(bits_per_dim.tolist()):
        shift = 0
        for width in PIECES:
            while bits - shift >= width:
                pieces.setdefault((shift, width), []).append(k)
                shift += width
    return [(np.array(dims, dtype=np.intp), shift, width) for (shift, width), dims in sorted(pieces.items())]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``[R, d]`` codes below ``2^bits`` packed ``8 / bits`` to a byte (little end first)."""
    per = 8 // bits
    rows, depth = codes.shape
    width = -(-depth // per)
    padded = np.zeros((rows, width * per), dtype=np.uint8)
    padded[:, :depth] = codes
    parts = padded.reshape(rows, width, per)
    out = np.zeros((rows, width), dtype=np.uint8)
    for slot in range(per):
        out |= (parts[:, :, slot] << (slot * bits)).astype(np.uint8)
    return out


def unpack(packed: np.ndarray, bits: int, depth: int) -> np.ndarray:
    """The inverse of :func:`pack`: ``[R, depth]`` uint8 codes."""
    per, mask = 8 // bits, (1 << bits) - 1
    slots = [(packed >> (slot * bits)) & mask for slot in range(per)]
    return np.stack(slots, axis=-1).reshape(*packed.shape[:-1], -1)[..., :depth]


class CompactRegions:
    """A gallery's region embeddings decoded on demand from centroid ids and packed residuals."""

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, centroids: np.ndarray, codes: np.ndarray, residuals: np.ndarray, buckets: np.ndarray,
                 bits_per_dim: np.ndarray | None = None) -> None:
        if codes.ndim != 2 or residuals.shape[:2] != codes.shape:
            raise ItmrtError(f"compact regions: codes {codes.shape} and residuals {residuals.shape} disagree; "
                             "re-index the gallery")
        self.centroids, self.codes, self.residuals = centroids, codes, residuals
        self.codec = ResidualCodec.from_buckets(buckets, bits_per_dim)
        self.shape = (int(codes.shape[0]), int(codes.shape[1]), int(centroids.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        codes = np.asarray(self.codes[key])
        residuals = np.asarray(self.residuals[key])
        flat = self.codec.decode_coded(residuals.reshape(-1, residuals.shape[-1]), self.centroids, codes)
        return flat.reshape(*codes.shape, self.shape[2])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.residuals.nbytes)
