"""The region index of one shard: its images' region vectors quantised against k-means centroids.

Mean pooling (the global shortlist, :mod:`itmrt.scale.index`) throws away the
one thing cross-attention reads: which word matches which region. The region
index keeps it at the level of centroids, as late-interaction text retrieval
(ColBERTv2/PLAID, WARP) does for token vectors:

- ``C`` centroids from spherical k-means (FAISS) over a sample of the shard's
  region vectors (``region_sample`` per centroid, at most);
- every region's nearest centroid (its *code*), ``[images, regions]``;
- inverted lists: for each centroid, the shard's images holding a region with
  that code (each image once per list).

The nearest centroid of 100K x 36 region vectors is found without a full
``regions x C x d`` product: the centroids are grouped by a second, coarse
k-means (about ``sqrt(C)`` groups); each region is compared with the coarse
centres and then only with the centroids of its ``COARSE_PROBE`` best groups
(``benchmarks/bench_region_index.py`` reports how often that is the true
nearest centroid).

Search (:mod:`itmrt.scale.region_search`) probes each caption token's
``nprobe`` nearest centroids, estimates every image's score from centroid
similarities, keeps the best ``K`` and reranks them exactly.

``compact`` storage (:mod:`itmrt.runtime.compact_regions`) also stores each
region's residual to its centroid (Lloyd-Max levels per dimension, a few bits
per dimension on average) and drops the float embeddings; the rerank scores
the decompressed vectors.

Files (plain names inside the shard folder, each with its sha256 in the shard's
``gallery.json`` under ``region_index``, with the parameters it was built and
is searched with):

- ``region_centroids.npy`` float32 ``[C, d]``;
- ``region_codes.npy`` uint16 or int32 ``[images, regions]``;
- ``region_lists.npy`` int32: ``C + 1`` offsets, then the lists' image rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.optional import require

CENTROIDS_FILE = "region_centroids.npy"
CODES_FILE = "region_codes.npy"
LISTS_FILE = "region_lists.npy"
RESIDUALS_FILE = "region_residuals.npy"
BUCKETS_FILE = "region_buckets.npy"
BITS_FILE = "region_bits.npy"
REGION_STORAGES = ("exact", "compact")
RESIDUAL_BITS = (1.0, 4.0)
"""The range of ``--residual-bits`` (average bits per dimension of compact storage; fractional allowed)."""
RESIDUAL_CODEC = "lloyd-max"
"""How compact storage quantises residuals (recorded per shard; galleries written before record none: equal-mass
buckets)."""
DEFAULT_NPROBE = 8
"""Centroids probed per caption token (``benchmarks/bench_region_index.py``: see docs/region-index.md)."""
DEFAULT_CANDIDATES = 50
"""Images per shard reranked exactly when a search names no K (``--shortlist``): recall@10 1.0 at 100K images
where K = 25 gave 0.975 (docs/region-index.md)."""
DEFAULT_REFINE = 1024
"""Images per shard whose probe estimate is refined from every region's centroid before the K best are kept
(100K images: 512, 1024 and 2048 all gave recall@10 1.0 at K 50; 2048 cost 9 ms more per query)."""
DEFAULT_EXACT_PASS = 0
"""Images per shard (the refined estimate's best) scored exactly, at least K, on a shard that fits its centroids
well. 0 by default: at 100K images (50K-image shards, 8192 centroids, fit 0.63) the refined estimate kept 0.95
and 1.0 of exhaustive's top 10 at K = 50 on two draws of 20 queries; poorly fitting shards get
:data:`POOR_FIT_EXACT_PASS` (docs/region-index.md)."""
DEFAULT_UNION = 0
"""Images per shard added to the region index's candidates from the global vectors (mean pooling) before the
rerank, on a shard that fits its centroids well (exact storage keeps the global vectors; compact does not)."""
POOR_FIT = 0.5
"""A shard whose regions' mean cosine to their centroids (its recorded ``fit``) is below this is searched with
the poor-fit defaults below: at 20K images (10K-image shards, fit 0.44 on the object data, 0.34 on the
instance-copy data) the centroid estimate alone kept 0.82 and 0.19 of exhaustive's top 10 at K 50, the poor-fit
defaults 0.995 and 0.775; at 100K (fit 0.63) it kept 0.95-1.0 (docs/region-index.md)."""
POOR_FIT_EXACT_PASS = 500
"""Images per poorly fitting shard scored exactly (the region index's best), unless a search says otherwise."""
POOR_FIT_UNION = 500
"""Images per poorly fitting shard added from the global vectors' best (where the shard stores them)."""
DEFAULT_SAMPLE = 8
"""k-means training vectors per centroid (a sample of the shard's regions)."""
KMEANS_ITERATIONS = 2
"""Lloyd iterations from centroids drawn from the sample (sampled k-means, refined twice: the region vectors of
100K images need a cheap assignment; ``benchmarks/bench_region_index.py`` reports the fit it reaches)."""
COARSE_ITERATIONS = 10
COARSE_PROBE = 6
"""Coarse groups whose centroids each region is compared with when its code is assigned."""
DIRECT_ASSIGN = 512
"""Up to this many centroids, every region is compared with every centroid."""
ASSIGN_CHUNK = 32768
"""Region vectors assigned per block."""


def faiss_module() -> Any:
    return require("faiss", "the region index")


def centroid_count(images: int, regions: int) -> int:
    """Default centroids for a shard: a power of two near ``8 sqrt(regions in all)`` (PLAID takes 16 sqrt for
    text tokens), at least 8 region vectors per centroid, at most 65536 (codes fit uint16)."""
    vectors = max(1, images * regions)
    wanted = 2 ** round(math.log2(max(1.0, 8 * math.sqrt(vectors))))
    return int(max(1, min(wanted, vectors // 8 or 1, 1 << 16)))


@dataclass(frozen=True)
class RegionParams:
    """How a shard's region index is built, and its search defaults (recorded in the shard's document)."""

    centroids: int
    nprobe: int = DEFAULT_NPROBE
    candidates: int = DEFAULT_CANDIDATES
    exact_pass: int = DEFAULT_EXACT_PASS
    storage: str = "exact"
    bits: float = 2
    sample: int = DEFAULT_SAMPLE
    seed: int = 0

    def check(self) -> RegionParams:
        for flag, value in (("--region-centroids", self.centroids), ("--nprobe", self.nprobe),
                            ("--candidates", self.candidates), ("--region-sample", self.sample)):
            if value < 1:
                raise ItmrtError(f"{flag} must be at least 1, not {value}")
        if self.exact_pass < 0:
            raise ItmrtError(f"--exact-pass must be at least 0 (0: none), not {self.exact_pass}")
        if self.storage not in REGION_STORAGES:
            raise ItmrtError(f"--regions-storage must be one of {', '.join(REGION_STORAGES)}, not {self.storage!r}")
        if not RESIDUAL_BITS[0] <= self.bits <= RESIDUAL_BITS[1]:
            raise ItmrtError(f"--residual-bits must be between {RESIDUAL_BITS[0]:g} and {RESIDUAL_BITS[1]:g} (bits per "
                             f"dimension on average), not {self.bits:g}")
        return self


def _l2(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def sample_regions(embeddings: np.ndarray, count: int, seed: int) -> np.ndarray:
    """About ``count`` region vectors (float32) from randomly chosen images (sorted rows: memmap-friendly)."""
    images, regions = int(embeddings.shape[0]), int(embeddings.shape[1])
    take = min(images, max(1, -(-count // regions)))
    rows = np.sort(np.random.default_rng(seed).choice(images, size=take, replace=False))
    return np.ascontiguousarray(np.asarray(embeddings[rows], dtype=np.float32).reshape(-1, embeddings.shape[2]))


def train_centroids(vectors: np.ndarray, count: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """``[count, d]`` unit centroids: spherical k-means (FAISS) over ``vectors``."""
    faiss = faiss_module()
    count = max(1, min(count, len(vectors)))
    kmeans = faiss.Kmeans(int(vectors.shape[1]), count, niter=iterations, spherical=True, seed=seed + 1,
                          max_points_per_centroid=max(1, -(-len(vectors) // count)), min_points_per_centroid=1,
                          verbose=False)
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return np.ascontiguousarray(_l2(kmeans.centroids.astype(np.float32)))


class CentroidAssigner:
    """Each vector's nearest centroid by inner product: directly for few centroids, else through coarse groups."""

    def __init__(self, centroids: np.ndarray, seed: int = 0) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.groups: list[np.ndarray] = []
        self.coarse: np.ndarray | None = None
        if len(self.centroids) > DIRECT_ASSIGN:
            count = int(math.sqrt(len(self.centroids)))
            coarse = train_centroids(self.centroids, count, seed + 7, iterations=COARSE_ITERATIONS)
            owner = np.argmax(self.centroids @ coarse.T, axis=1)
            self.groups = [np.flatnonzero(owner == g) for g in range(len(coarse))]
            self.coarse = coarse

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, similarities)`` of each vector ``[R, d]`` (float32) to its nearest centroid found."""
        if self.coarse is None:
            sims = vectors @ self.centroids.T
            codes = np.argmax(sims, axis=1)
            return codes, np.take_along_axis(sims, codes[:, None], axis=1)[:, 0]
        coarse = vectors @ self.coarse.T
        probe = min(COARSE_PROBE, len(self.coarse))
        top = np.argpartition(-coarse, probe - 1, axis=1)[:, :probe]
        best = np.full(len(vectors), -np.inf, dtype=np.float32)
        codes = np.zeros(len(vectors), dtype=np.int64)
        for group, members in enumerate(self.groups):
            rows = np.flatnonzero((top == group).any(axis=1))
            if len(rows) == 0 or len(members) == 0:
                continue
            sims = vectors[rows] @ self.centroids[members].T
            pick = np.argmax(sims, axis=1)
            value = sims[np.arange(len(rows)), pick]
            better = value > best[rows]
            best[rows[better]] = value[better]
            codes[rows[better]] = members[pick[better]]
        return codes, best


def assign_codes(embeddings: np.ndarray, assigner: CentroidAssigner,
                 each: Any = None) -> tuple[np.ndarray, float]:
    """Every region's code ``[images, regions]`` and the mean cosine of a region to its centroid (the fit);
    ``each(first_image, vectors, codes)`` sees every block (compact storage encodes residuals there)."""
    images, regions, depth = (int(x) for x in embeddings.shape)
    dtype = np.uint16 if len(assigner.centroids) <= 1 << 16 else np.int32
    codes = np.empty((images, regions), dtype=dtype)
    per_block = max(1, ASSIGN_CHUNK // regions)
    total = 0.0
    for start in range(0, images, per_block):
        block = np.asarray(embeddings[start : start + per_block], dtype=np.float32).reshape(-1, depth)
        found, sims = assigner.assign(np.ascontiguousarray(block))
        codes[start : start + per_block] = found.reshape(-1, regions)
        total += float(sims.sum(dtype=np.float64))
        if each is not None:
            each(start, block, found)
    return codes, total / max(1, images * regions)


def inverted_lists(codes: np.ndarray, centroids: int) -> np.ndarray:
    """int32: ``centroids + 1`` offsets, then for each centroid the sorted rows of the images holding it."""
    images, regions = codes.shape
    pairs = np.unique(codes.astype(np.int64) * images + np.repeat(np.arange(images), regions).reshape(images, regions))
    owners, rows = pairs // images, pairs % images
    offsets = np.zeros(centroids + 1, dtype=np.int64)
    np.cumsum(np.bincount(owners, minlength=centroids), out=offsets[1:])
    if offsets[-1] >= 1 << 31 or images >= 1 << 31:
        raise ItmrtError("a shard this large needs int64 inverted lists; use smaller shards (--shard-images)")
    return np.concatenate([offsets, rows]).astype(np.int32)


def build_region_index(embeddings: np.ndarray, params: RegionParams) -> dict[str, Any]:
    """The arrays of a shard's region index (``centroids``, ``codes``, ``lists``; compact storage adds
    ``residuals``, ``buckets`` and ``bits``) and its record (parameters, fit, build seconds)."""
    from itmrt.runtime.compact_regions import ResidualCodec

    if embeddings.ndim != 3:
        raise ItmrtError(f"the region index needs region embeddings (images x regions x d), not shape "
                         f"{tuple(embeddings.shape)}")
    started = time.perf_counter()
    images, regions, depth = (int(x) for x in embeddings.shape)
    count = min(params.centroids, images * regions)
    sample = sample_regions(embeddings, count * params.sample, params.seed)
    centroids = train_centroids(sample, count, params.seed)
    assigner = CentroidAssigner(centroids, params.seed)
    arrays: dict[str, np.ndarray] = {}
    each = None
    if params.storage == "compact":
        codec = ResidualCodec.fit(sample, centroids[assigner.assign(sample)[0]], params.bits)
        residuals = np.empty((images, regions, codec.packed_width(depth)), dtype=np.uint8)

        def each(first: int, vectors: np.ndarray, found: np.ndarray) -> None:
            packed = codec.encode(vectors, centroids[found])
            residuals[first : first + len(vectors) // regions] = packed.reshape(-1, regions, packed.shape[-1])

        arrays.update(residuals=residuals, buckets=codec.buckets, bits=codec.bits_per_dim)
    codes, fit = assign_codes(embeddings, assigner, each)
    arrays.update(centroids=centroids, codes=codes, lists=inverted_lists(codes, len(centroids)))
    record = {"params": {"centroids": int(len(centroids)), "nprobe": min(params.nprobe, len(centroids)),
                         "candidates": params.candidates, "refine": DEFAULT_REFINE, "exact_pass": params.exact_pass,
                         "union": DEFAULT_UNION, "poor_fit": POOR_FIT,
                         "storage": params.storage,
                         "bits": params.bits if params.storage == "compact" else 0, "sample": params.sample,
                         **({"residual_codec": RESIDUAL_CODEC} if params.storage == "compact" else {}),
                         "seed": params.seed, "coarse_probe": COARSE_PROBE},
              "rows": images, "regions": regions, "dims": depth, "fit": round(fit, 6),
              "build_seconds": round(time.perf_counter() - started, 3),
              "faiss_version": str(faiss_module().__version__)}
    return {"arrays": arrays, "record": record}


def fit_under(centroids: np.ndarray, embeddings: np.ndarray, images: int = 256, seed: int = 0) -> float:
    """Mean cosine of a sample of ``embeddings``' regions to their nearest of ``centroids`` (drift check)."""
    sample = sample_regions(embeddings, images * int(embeddings.shape[1]), seed)
    return float(CentroidAssigner(centroids, seed).assign(sample)[1].mean())
