"""Compact region storage: each region vector as its centroid plus a residual at 1, 2 or 4 bits per dimension.

A region ``v`` with nearest centroid ``c`` keeps ``c``'s id and, per
dimension ``k``, which of ``2^bits`` buckets its residual ``v_k - c_k`` falls
in. The bucket bounds are per-dimension quantiles of residuals measured on a
training sample (equal-mass buckets), and a bucket decodes to its middle
quantile. Decoding gives ``c + bucket values``, l2-normalised as the image
encoder's output is. At 36 regions x d 1024, 2 bits is 9,216 bytes of
residuals plus 72 bytes of centroid ids per image (float16: 73,728 bytes).

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


@dataclass
class ResidualCodec:
    """Per-dimension residual buckets: ``cutoffs [d, 2^bits - 1]`` and ``buckets [d, 2^bits]`` (values)."""

    cutoffs: np.ndarray
    buckets: np.ndarray

    @property
    def bits(self) -> int:
        return int(self.buckets.shape[1]).bit_length() - 1

    @classmethod
    def fit(cls, vectors: np.ndarray, centroids: np.ndarray, bits: int) -> ResidualCodec:
        """Buckets from the residuals of ``vectors [R, d]`` to their centroids ``[R, d]``."""
        levels = 1 << bits
        residuals = np.asarray(vectors, dtype=np.float32) - centroids
        cutoffs = np.quantile(residuals, np.arange(1, levels) / levels, axis=0).T.astype(np.float32)
        values = np.quantile(residuals, (2 * np.arange(levels) + 1) / (2 * levels), axis=0).T.astype(np.float32)
        return cls(np.ascontiguousarray(cutoffs), np.ascontiguousarray(values))

    @classmethod
    def from_buckets(cls, buckets: np.ndarray) -> ResidualCodec:
        """A decoder (bucket values only; cutoffs halfway between neighbouring values, for re-encoding)."""
        buckets = np.ascontiguousarray(buckets, dtype=np.float32)
        return cls((buckets[:, 1:] + buckets[:, :-1]) / 2, buckets)

    def packed_width(self, depth: int) -> int:
        return -(-depth * self.bits // 8)

    def encode(self, vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """``[R, packed_width]`` uint8: each dimension's bucket, ``8 / bits`` dimensions per byte."""
        residuals = np.asarray(vectors, dtype=np.float32) - centroids
        codes = np.zeros(residuals.shape, dtype=np.uint8)
        for level in range(self.cutoffs.shape[1]):
            codes += residuals > self.cutoffs[:, level]
        return pack(codes, self.bits)

    def decode(self, packed: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """``[R, d]`` float32 unit vectors from packed residual codes and their centroids ``[R, d]``."""
        depth = int(centroids.shape[-1])
        codes = unpack(packed, self.bits, depth)
        out = centroids + self.buckets[np.arange(depth), codes]
        return (out / (np.linalg.norm(out, axis=-1, keepdims=True) + 1e-8)).astype(np.float32)


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

    def __init__(self, centroids: np.ndarray, codes: np.ndarray, residuals: np.ndarray, buckets: np.ndarray) -> None:
        if codes.ndim != 2 or residuals.shape[:2] != codes.shape:
            raise ItmrtError(f"compact regions: codes {codes.shape} and residuals {residuals.shape} disagree; "
                             "re-index the gallery")
        self.centroids, self.codes, self.residuals = centroids, codes, residuals
        self.codec = ResidualCodec.from_buckets(buckets)
        self.shape = (int(codes.shape[0]), int(codes.shape[1]), int(centroids.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        codes = np.asarray(self.codes[key])
        residuals = np.asarray(self.residuals[key])
        flat = self.codec.decode(residuals.reshape(-1, residuals.shape[-1]),
                                 self.centroids[codes.reshape(-1).astype(np.intp)])
        return flat.reshape(*codes.shape, self.shape[2])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.residuals.nbytes)
