"""Sign-bit sketches of every region: the region index's candidate scan for shards its centroids fit poorly.

Where a shard's regions cluster by what they show, a caption word's probed
centroids hold the regions that decide its answers. Where they do not (a
region is a concept plus something the centroids cannot see, recorded as a
poor ``fit``), a word's nearest regions are spread over every centroid and no
choice of lists finds them (docs/region-index.md, "Data no index can search").
Only a pass over every region does; this makes that pass cheap.

Each region ``v`` keeps ``bits`` sign bits ``sign(v . p_j)`` under a Gaussian
projection ``P = [p_1 .. p_bits]`` (a SimHash), 32 bytes at 256 bits; a
caption word ``u`` gets its own bits under the same ``P``. The fraction ``h /
bits`` of bits two vectors disagree on estimates their angle over pi, so
``cos(pi h / bits)`` estimates their cosine, most precisely for the near
pairs that decide a word's best region. A search computes, for every image
and word, the least distance over the image's regions (one XOR and bit count
per 64 bits, :mod:`itmrt.scale.sketch_kernels`), turns it into a similarity and
gives the estimate to the family's score in structure, as the centroid probe
would; the best images go on to the exact rerank.

Measured on the instance-copy data (20,000 images in 2 shards, 20 queries,
``benchmarks/region_index_reach.py --bit-sketches``), the share of exhaustive
scoring's top 10 in each shard's best 50 / 500 by this estimate: 128 bits
0.55 / 0.845, 256 bits 0.855 / 1.0, 512 bits 0.9 / 1.0; the centroids' probed
lists with exact similarities 0.355 / 0.6.

Exact storage then re-estimated a shard's best 1,000 from their float16
regions: 15 ms a 50,000-image shard on two threads, the largest stage of a
query. A second, longer sketch of every region (``fine`` bits, 512 by default
under exact storage) is read only for the scan's best few thousand images,
whose bits lie together in it, and narrows them to the few hundred worth that
read: on 100,000 instance-copy images (20 queries) the scan's best 2,000 a
shard, then the fine sketch's best 200, keep recall@10 0.995 and top-1 1.0, as
the scan's best 1,000 alone did, with a fifth of the float16 rows read
(docs/region-index.md, session 13).

Files (in the shard folder, hashed in its ``gallery.json`` like the rest of the
region index): ``region_projection.npy`` float32 ``[d, bits + fine]`` (the
scan's columns first), ``region_sketches.npy`` uint64 ``[bits / 64, regions,
images]`` and, where there is a fine sketch, ``region_fine_sketches.npy``
uint64 ``[images, regions, fine / 64]``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.optional import compiled_kernels

SKETCH_BITS = 256
"""Bits a region on a poorly fitting shard (``--region-sketch auto``): 1,152 bytes an image at 36 regions."""
FINE_BITS = 512
"""Bits of a region's fine sketch where sketches are stored under exact storage (``--region-sketch auto``, or
bits without ``:FINE``): 2,304 bytes an image. Compact storage takes none: its residual stage re-estimates from
a few bytes a region already."""
SKETCH_CHOICES = (64, 128, 192, 256, 320, 384, 448, 512)
ENCODE_BLOCK = 512
"""Images whose regions are projected at a time while sketches are built."""
_BYTE_BITS = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint16)


def sketch_kernels() -> Any:
    """:mod:`itmrt.scale.sketch_kernels` where numba is installed (the ``cpu`` extra), else None."""
    return compiled_kernels("itmrt.scale.sketch_kernels")


def check_sketch_bits(bits: int, fine: int | None = None) -> int:
    """``bits`` (a region's scan sketch) where it is one of :data:`SKETCH_CHOICES`, and so is ``fine`` (its fine
    sketch) unless 0 or None; else a one-line error."""
    for value in (bits, fine or bits):
        if value not in SKETCH_CHOICES:
            raise ItmrtError(f"--region-sketch takes auto, off, BITS or BITS:FINE, each a number of bits a region "
                             f"among {', '.join(map(str, SKETCH_CHOICES))} (FINE may be 0: none), not {value}")
    return bits


def sketch_projection(depth: int, bits: int, seed: int) -> np.ndarray:
    """A Gaussian projection ``[depth, bits]`` (float32), drawn from ``seed``; stored with the sketches, so a
    search never depends on a random stream."""
    return np.random.default_rng([seed, 0x5E7C]).standard_normal((depth, bits)).astype(np.float32)


def sign_bits(vectors: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``[n, bits / 64]`` uint64: each vector's signs under ``projection``, bit ``j`` of the row set where
    ``v . p_j >= 0`` (bit ``j % 64`` of word ``j // 64``)."""
    return pack_signs(np.asarray(vectors, dtype=np.float32) @ projection)


def pack_signs(products: np.ndarray) -> np.ndarray:
    """``[n, bits / 64]`` uint64 from ``products [n, bits]`` (vectors times the projection): bit ``j`` of a row
    set where its product ``j`` is at least 0."""
    packed = np.packbits(products >= 0, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def encode_sketches(embeddings: np.ndarray, projection: np.ndarray, bits: int | None = None) -> np.ndarray:
    """``[bits / 64, regions, images]`` uint64: every region's sign bits, images side by side (the layout the
    scan reads). ``bits`` (default: all of ``projection``'s columns): where fewer, the rest of the columns are the
    fine sketch: see :func:`encode_both`."""
    return encode_both(embeddings, projection, bits)[0]


def encode_both(embeddings: np.ndarray, projection: np.ndarray,
                bits: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(scan, fine)`` in one pass over the regions: the sign bits under ``projection``'s first ``bits`` columns
    in the scan's layout ``[bits / 64, regions, images]``, and under the rest (None where there is none) image by
    image ``[images, regions, rest / 64]`` (uint64 both)."""
    images, regions, depth = (int(x) for x in embeddings.shape)
    words = projection.shape[1] // 64
    scan_words = words if bits is None else bits // 64
    scan = np.empty((scan_words, regions, images), dtype=np.uint64)
    fine = np.empty((images, regions, words - scan_words), dtype=np.uint64) if words > scan_words else None
    for start in range(0, images, ENCODE_BLOCK):
        block = np.asarray(embeddings[start : start + ENCODE_BLOCK], dtype=np.float32)
        signs = sign_bits(block.reshape(-1, depth), projection).reshape(len(block), regions, words)
        scan[:, :, start : start + len(block)] = signs[:, :, :scan_words].transpose(2, 1, 0)
        if fine is not None:
            fine[start : start + len(block)] = signs[:, :, scan_words:]
    return scan, fine


def _caption_sketch(query: np.ndarray, words: int) -> np.ndarray:
    """A caption's sign bits ``[m, words]`` as the scan kernels take them (C-contiguous uint64), checked against
    the shard's sketch width."""
    query = np.ascontiguousarray(query, dtype=np.uint64)
    if query.ndim != 2 or query.shape[1] != words:
        raise ItmrtError(f"a caption's sketch has {query.shape[-1]} words, the shard's {words}")
    return query


def least_distances(sketches: np.ndarray, query: np.ndarray, threads: int = 1) -> np.ndarray:
    """``[m, images]`` uint16: each caption word's least Hamming distance to an image's regions (``query
    [m, words]`` from :func:`sign_bits`), over ``threads`` threads where numba is installed."""
    words, _, images = sketches.shape
    query = _caption_sketch(query, words)
    out = np.empty((len(query), images), dtype=np.uint16)
    kernels = sketch_kernels()
    if kernels is None:
        return _least_distances_numpy(sketches, query, out)
    from itmrt.runtime.fused import call_compiled
    from itmrt.scale.threads import in_parallel

    kernel = kernels.least_distances_256 if words == 4 else kernels.least_distances

    def run(first: int, last: int) -> None:
        call_compiled(kernel, sketches, query, first, last - first, out)

    in_parallel(run, images, max(1, min(int(threads or 1), images // kernels.BLOCK)))
    return out


def scan_naaf_estimates(sketches: np.ndarray, query: np.ndarray, table: np.ndarray, weights: np.ndarray,
                        threshold: float, threads: int = 1) -> np.ndarray | None:
    """``[images]`` float32: NAAF's estimate of every image straight from the scan of its 4-word (256-bit)
    sketches, each block's least distances turned into estimates while in cache
    (:func:`itmrt.scale.sketch_kernels.scan_naaf_estimates_256`: the values of :func:`least_distances` then
    ``naaf_estimates``); None where it does not apply (no numba, or sketches of another width)."""
    kernels = sketch_kernels()
    words, _, images = sketches.shape
    if kernels is None or words != 4:
        return None
    query = _caption_sketch(query, words)
    from itmrt.runtime.fused import call_compiled
    from itmrt.scale.threads import in_parallel

    out = np.empty(images, dtype=np.float32)

    def run(first: int, last: int) -> None:
        call_compiled(kernels.scan_naaf_estimates_256, sketches, query, table, weights, np.float32(threshold),
                      first, last - first, out)

    in_parallel(run, images, max(1, min(int(threads or 1), images // kernels.BLOCK)))
    return out


def least_distances_of_rows(fine: np.ndarray, rows: np.ndarray, query: np.ndarray, threads: int = 1) -> np.ndarray:
    """``[m, len(rows)]`` uint16: :func:`least_distances` of the images ``rows`` (sorted: a forward read) of a fine
    sketch ``fine [images, regions, words]`` (image-major), ``query [m, words]``."""
    words = fine.shape[2]
    query = np.ascontiguousarray(query, dtype=np.uint64)
    if query.ndim != 2 or query.shape[1] != words:
        raise ItmrtError(f"a caption's fine sketch has {query.shape[-1]} words, the shard's {words}")
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty((len(query), len(rows)), dtype=np.uint16)
    kernels = sketch_kernels()
    if kernels is None:
        return _least_distances_numpy(np.ascontiguousarray(np.asarray(fine[rows]).transpose(2, 1, 0)), query, out)
    from itmrt.runtime.fused import call_compiled
    from itmrt.scale.threads import in_parallel

    def run(first: int, last: int) -> None:
        call_compiled(kernels.least_distances_of_rows, fine, rows, query, first, last - first, out)

    in_parallel(run, len(rows), max(1, min(int(threads or 1), len(rows) // kernels.BLOCK)))
    return out


def _least_distances_numpy(sketches: np.ndarray, query: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:func:`least_distances` without numba: bit counts by a byte table, a block of images at a time."""
    words, regions, images = sketches.shape
    step = 1024
    for start in range(0, images, step):
        block = np.asarray(sketches[:, :, start : start + step])  # [words, regions, n]
        for t, bits in enumerate(query):
            differ = (block ^ bits[:, None, None]).view(np.uint8).reshape(words, regions, -1, 8)
            distance = _BYTE_BITS[differ].sum(axis=(0, 3), dtype=np.uint16)  # [regions, n]
            out[t, start : start + block.shape[2]] = distance.min(axis=0)
    return out


def sketch_similarities(distances: np.ndarray, bits: int) -> np.ndarray:
    """Estimated cosines ``cos(pi h / bits)`` (float32) from Hamming distances ``h``."""
    return similarity_table(bits)[distances]


@functools.cache
def similarity_table(bits: int) -> np.ndarray:
    """``[bits + 1]`` float32: ``cos(pi h / bits)`` for every Hamming distance ``h`` (read-only)."""
    table = np.cos(np.pi * np.arange(bits + 1, dtype=np.float64) / bits).astype(np.float32)
    table.setflags(write=False)
    return table
