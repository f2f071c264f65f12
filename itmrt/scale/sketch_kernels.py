"""The numba kernel of the region index's sketch scan (:mod:`itmrt.scale.sketches`).

A shard's sketches are stored ``[words, regions, images]`` (``words`` 64-bit
words of sign bits a region), so that for one region position and one 64-bit
word the images lie side by side: the kernel XORs a block of images' words
with each caption word's, counts the set bits (LLVM turns the bit-twiddling
count below into ``popcnt``, or ``vpopcntq`` where the CPU has it) and adds them
into 16-bit sums, one lane an image, across all the caption's words; then each
image keeps its least sum over its regions. Each stored word is read once per
call from memory and reused for every caption word from the core's cache.

Orders of the same loops measured on 100,000 images x 36 regions x 256 bits and
14 words, one thread (a 2-core AMD EPYC with AVX-512, the other core busy): a
region's words innermost, one image at a time, 152.6 ms; images innermost and
every caption word in the block, 33.0 ms. On 50,000 images, quiet, one / two
threads: blocks of 64 images 14.1 / 6.9 ms, of 128 16.6 / 8.4, of 32 26.5 /
12.9; sums in 64-bit lanes 21.5 / 11.0 (docs/region-index.md). At 256 bits (4 words, the default) a kernel of
its own keeps a region's words in registers and sums their counts there, two caption words at a time: 9.3 ms
on one thread where the general kernel took 14.1 (session 13). For NAAF the 256-bit scan and the estimate
run as one kernel (:func:`scan_naaf_estimates_256`): each block's distances become estimates in cache.

Importing this module imports numba (the ``cpu`` extra); without it the scan
runs in numpy (:func:`itmrt.scale.sketches.least_distances`).
"""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 64
"""Images a block: ``words x regions x BLOCK`` stored words (72 KB at 256 bits) and two ``[m, BLOCK]`` sums."""


@numba.njit(inline="always")
def _bit_count(x):  # type: ignore[no-untyped-def]
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def least_distances(sketches, query, first, count, out):  # type: ignore[no-untyped-def]
    """``out[t, i]``: the least Hamming distance between caption word ``t``'s bits ``query [m, words]`` and the
    bits of image ``i``'s regions ``sketches [words, regions, images]`` (uint64), for images
    ``first .. first + count``; ``out [m, images]`` uint16."""
    words, regions, _ = sketches.shape
    m = query.shape[0]
    sums = np.empty((m, BLOCK), np.uint16)
    least = np.empty((m, BLOCK), np.uint16)
    for start in range(first, first + count, BLOCK):
        size = min(BLOCK, first + count - start)
        least[:, :] = 65535
        for r in range(regions):
            sums[:, :] = 0
            for k in range(words):
                row = sketches[k, r, start : start + size]
                for t in range(m):
                    bits = query[t, k]
                    for i in range(size):
                        sums[t, i] += np.uint16(_bit_count(row[i] ^ bits))
            for t in range(m):
                for i in range(size):
                    least[t, i] = min(least[t, i], sums[t, i])
        out[:, start : start + size] = least[:, :size]


@numba.njit(inline="always")
def _least_256_block(sketches, query, start, size, least):  # type: ignore[no-untyped-def]
    """``least[t, i]`` (``[m + 1, BLOCK]`` uint32, the last row spare): the least distance of caption word ``t`` to
    the regions of image ``start + i``, for the ``size`` images of one block of 4-word sketches."""
    _, regions, _ = sketches.shape
    m = query.shape[0]
    least[:, :] = 65535
    for k in range(regions):
        a0, a1 = sketches[0, k, start : start + size], sketches[1, k, start : start + size]
        a2, a3 = sketches[2, k, start : start + size], sketches[3, k, start : start + size]
        for t in range(0, m, 2):
            u = min(t + 1, m - 1)  # an odd word count: the last pair's second word writes the spare row
            q0, q1, q2, q3 = query[t, 0], query[t, 1], query[t, 2], query[t, 3]
            p0, p1, p2, p3 = query[u, 0], query[u, 1], query[u, 2], query[u, 3]
            for i in range(size):
                x0, x1, x2, x3 = a0[i], a1[i], a2[i], a3[i]
                d = _bit_count(x0 ^ q0) + _bit_count(x1 ^ q1) + _bit_count(x2 ^ q2) + _bit_count(x3 ^ q3)
                e = _bit_count(x0 ^ p0) + _bit_count(x1 ^ p1) + _bit_count(x2 ^ p2) + _bit_count(x3 ^ p3)
                least[t, i] = min(least[t, i], np.uint32(d))
                least[t + 1, i] = min(least[t + 1, i], np.uint32(e))


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def least_distances_256(sketches, query, first, count, out):  # type: ignore[no-untyped-def]
    """:func:`least_distances` for sketches of 4 words (256 bits, the default): a region's 4 words are read into
    registers once for two caption words at a time and their counts summed there, with no sums array between
    the words. On 50,000 images x 36 regions and 14 words, one thread: 9.3 ms against the general kernel's 14.1
    (the AMD EPYC with AVX-512, 2026-12-07, session 13; with no sums array but one word at a time 10.1 ms)."""
    m = query.shape[0]
    least = np.empty((m + 1, BLOCK), np.uint32)
    for start in range(first, first + count, BLOCK):
        size = min(BLOCK, first + count - start)
        _least_256_block(sketches, query, start, size, least)
        for t in range(m):
            for i in range(size):
                out[t, start + i] = least[t, i]


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def least_distances_of_rows(sketches, rows, query, first, count, out):  # type: ignore[no-untyped-def]
    """:func:`least_distances` for the images ``rows[first .. first + count]`` of ``sketches [images, regions,
    words]`` (image-major: an image's bits lie together, so a few thousand chosen images are read as whole
    runs), into ``out[:, first .. first + count]``: each block of images is first copied into the scan's layout."""
    _, regions, words = sketches.shape
    m = query.shape[0]
    block = np.empty((words, regions, BLOCK), np.uint64)
    sums = np.empty((m, BLOCK), np.uint16)
    least = np.empty((m, BLOCK), np.uint16)
    for start in range(first, first + count, BLOCK):
        size = min(BLOCK, first + count - start)
        for i in range(size):
            image = rows[start + i]
            for r in range(regions):
                for k in range(words):
                    block[k, r, i] = sketches[image, r, k]
        least[:, :] = 65535
        for r in range(regions):
            sums[:, :] = 0
            for k in range(words):
                for t in range(m):
                    bits = query[t, k]
                    for i in range(size):
                        sums[t, i] += np.uint16(_bit_count(block[k, r, i] ^ bits))
            for t in range(m):
                for i in range(size):
                    least[t, i] = min(least[t, i], sums[t, i])
        out[:, start : start + size] = least[:, :size]


@numba.njit(inline="always")
def _naaf_scratch(m):  # type: ignore[no-untyped-def]
    """:func:`_naaf_block`'s scratch for ``m`` words: ``s``, ``r`` ``[m, BLOCK]``, ``q`` and ``total`` ``[BLOCK]``."""
    return (np.empty((m, BLOCK), np.float32), np.empty((m, BLOCK), np.float32), np.empty(BLOCK, np.float32),
            np.empty(BLOCK, np.float32))


@numba.njit(inline="always")
def _naaf_block(distances, column, size, table, weights, threshold, s, r, q, total, out, at):  # type: ignore[no-untyped-def]
    """NAAF's estimate (:func:`naaf_estimates`) of ``size`` images whose least distances are ``distances[:,
    column : column + size]``, into ``out[at : at + size]``; ``s``, ``r`` ``[m, BLOCK]``, ``q`` and ``total``
    ``[BLOCK]`` are the caller's scratch."""
    m = s.shape[0]
    for t in range(m):
        for i in range(size):
            s[t, i] = table[distances[t, column + i]]
            r[t, i] = s[t, i] - threshold
    total[:size] = 0
    for t in range(m):
        q[:size] = 0
        for u in range(m):
            w = weights[t, u]
            for i in range(size):
                q[i] += w * r[u, i]
        for i in range(size):
            value = s[t, i]
            if q[i] < 0:
                value += r[t, i]
            if r[t, i] > 0:
                value += s[t, i]
            total[i] += value
    for i in range(size):
        out[at + i] = total[i] / m


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def naaf_estimates(distances, table, weights, threshold, first, count, out):  # type: ignore[no-untyped-def]
    """NAAF's score estimate (:class:`itmrt.scale.region_search.ScoreEstimate`) of images ``first .. first +
    count`` straight from their least distances ``distances [m, images]`` (uint16): each word's similarity
    ``s = table[distance]``, ``r = s - threshold``, the propagated decision ``q = weights r`` (``weights [m, m]``,
    the caption's intra-word softmax), and the mean over words of ``(r where q < 0) + (s where r > 0) + s``,
    into ``out [images]`` (float32). One pass, images side by side, instead of numpy's six over ``[m, images]``."""
    m = distances.shape[0]
    s, r, q, total = _naaf_scratch(m)
    for start in range(first, first + count, BLOCK):
        size = min(BLOCK, first + count - start)
        _naaf_block(distances, start, size, table, weights, threshold, s, r, q, total, out, start)


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def scan_naaf_estimates_256(sketches, query, table, weights, threshold, first, count, out):  # type: ignore[no-untyped-def]
    """:func:`least_distances_256` and :func:`naaf_estimates` in one pass: each block's least distances are
    turned into its images' estimates while they are in the core's cache, and never written out. On two
    threads the scan waits on memory (115 MB of sketches a query at 100,000 images), so the estimate's
    arithmetic costs next to nothing there; separately it was a second pass of 1.6 ms a 50,000-image shard
    (session 16). The same values as the two kernels in turn."""
    m = query.shape[0]
    least = np.empty((m + 1, BLOCK), np.uint32)
    s, r, q, total = _naaf_scratch(m)
    for start in range(first, first + count, BLOCK):
        size = min(BLOCK, first + count - start)
        _least_256_block(sketches, query, start, size, least)
        _naaf_block(least, 0, size, table, weights, threshold, s, r, q, total, out, start)
