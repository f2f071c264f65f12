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
- ``region_lists.npy`` int32: ``C + 1`` offsets, then the lists' image rows;
- on a shard whose regions fit its centroids poorly (or as ``--region-sketch``
  asks), every region's sign-bit sketch and their projection
  (:mod:`itmrt.scale.sketches`), which the search scans instead of probing,
  and under exact storage a longer fine sketch of every region
  (``region_fine_sketches.npy``) that narrows the scan's best before the
  stored regions are read.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.optional import compiled_kernels, require
from itmrt.scale.sketches import FINE_BITS, SKETCH_BITS, check_sketch_bits, encode_both, sketch_projection

CENTROIDS_FILE = "region_centroids.npy"
CODES_FILE = "region_codes.npy"
LISTS_FILE = "region_lists.npy"
RESIDUALS_FILE = "region_residuals.npy"
BUCKETS_FILE = "region_buckets.npy"
BITS_FILE = "region_bits.npy"
PROJECTION_FILE = "region_projection.npy"
SKETCHES_FILE = "region_sketches.npy"
FINE_SKETCHES_FILE = "region_fine_sketches.npy"
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
(recorded at build; 100K images: 512, 1024 and 2048 all gave recall@10 1.0 at K 50; 2048 cost 9 ms more per
query). A search refines at most the shard's share of :data:`REFINE_BUDGET`."""
REFINE_BUDGET = 2048
"""Images per query refined by default, split evenly over the gallery's shards, each refining at least
:data:`MIN_REFINE_SHARE` and at most its recorded refine: 1024 a shard at 2 shards (as recorded), 512 at 4, 256
from 8 on. On the distinct 1M gallery (20 shards, K 10) refine 256 kept the same top 10 as 1024 (recall@10 0.93
both, 20 queries) at p50 102.5 against 149.2 ms; at 200K (4 shards) 256, 512 and 1024 all gave 0.9906
(docs/region-index.md, 2026-12-06, session 4)."""
MIN_REFINE_SHARE = 256
DEFAULT_EXACT_PASS = 0
"""Images per shard (the refined estimate's best) scored exactly, at least K, on a shard that fits its centroids
well. 0 by default: at 100K images (50K-image shards, 8192 centroids, fit 0.63) the refined estimate kept 0.95
and 1.0 of exhaustive's top 10 at K = 50 on two draws of 20 queries; poorly fitting shards get
:data:`POOR_FIT_EXACT_PASS` (docs/region-index.md)."""
DEFAULT_PREFILTER = 2048
"""Probed images per shard whose probe estimate is computed, the rest left at the shared estimate (0: every image
the probes reach); chosen by the largest sum of probed centroid similarities over the imputed ones. 2048: on
200,000 images (4 shards of 50,000, 32 queries) every setting's top 10 was the same with and without it, and at
1M (20 shards) it took 15-27 ms off the candidates stage (docs/region-index.md, 2026-12-06, session 3)."""
DEFAULT_RESCORE = 1024
"""Images per query estimated again from their stored regions, centroid plus residual levels (PLAID's residual
stage), before the K best are kept, on compact storage: split evenly over the gallery's shards (each shard
re-estimates its share of its refined estimate's best), so the stage's work per query stays bounded whatever the
shard count; exact storage: none unless a search asks. At 100K images (2 shards) it lifted recall@10 from 0.96 /
0.9775 (K 30 / 50 per shard) to 0.99 at 256 a shard (2026-12-06, session 4). 1024 since 2026-12-07 (session 11):
on a 100K build on another CPU, 256 a shard read 0.9875 and 512 a shard 0.9925 (40 queries, K 20; p50 40.5-48.6
ms on one thread and 37.2-45.3 on two over four runs, against 30.9-32.7 and 27.8-30.0), and session 4's build
read 0.99 and 0.995 (docs/region-index.md). At 16 shards and more the share is :data:`MIN_RESCORE_SHARE`, as
before."""
POOLED_RESCORE = 512
""":data:`DEFAULT_RESCORE` for a search with a budget, whose shards' re-estimated images are pooled (their share
of it at least :data:`MIN_POOLED_RESCORE_SHARE`): the setting the 1M budget path was measured with."""
MIN_RESCORE_SHARE = 64
"""The fewest images a compact shard re-estimates by default, whatever its share of :data:`DEFAULT_RESCORE`: on
the distinct 1M gallery (20 shards, K 10 per shard, refine 256) 64 a shard lifted recall@10 from 0.93 to 0.975
(20 queries) at p50 141.0 against 121.0 ms in the same run; 128 a shard read 0.975 as well at 169.2 ms
(docs/region-index.md, 2026-12-06, session 4)."""
MIN_POOLED_RESCORE_SHARE = 24
"""The fewest images a compact shard re-estimates by default in a search with a budget (its best by residual
estimate are pooled with the other shards' and the gallery's ``budget`` best of them reranked): on the distinct
1M gallery (20 shards, 20 queries; shares of 12, 16, 20, 24 and 32 a shard replayed from the same estimates)
24 a shard and a budget of 100 kept 0.98 of exhaustive's top 10, 16 a shard 0.965 (docs/region-index.md,
2026-12-06, session 6)."""
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
SKETCH_RESCORE = 1000
"""Images a shard with sketches (:mod:`itmrt.scale.sketches`) re-estimates from its stored regions (the best of
its sketch estimate), unless a search says otherwise; such a shard scores exactly only its K best after that,
and adds no global vectors. Not split over the shards: where a shard's answers rank in its sketch estimate
depends on the shard's size, not on how many shards there are. On 100,000 instance-copy images (2 shards of
50,000, 256 bits, 20 queries, K 20): 500 a shard kept recall@10 0.975, 1000 kept 0.995, 2000 1.0, top-1 1.0 in
each (docs/region-index.md, 2026-12-07, session 12). A shard with a fine sketch re-estimates
:data:`FINE_RESCORE` instead."""
FINE_KEEP = 2000
"""Images a shard of :data:`FINE_SHARD` images with a fine sketch estimates again from it (the best of its scan's
estimate), unless a search says otherwise (``refine``, which on a shard without sketches counts step 3b's
images); a larger shard in proportion, a smaller one at least :data:`MIN_FINE_KEEP`: where a shard's answers
rank in an estimate grows with the images competing with them, not with the number of shards. On 100,000
instance-copy images (2 shards, 256 + 512 bits, 200 re-estimated, K 20, 20 queries) 1,000 / 2,000 / 4,000 a
shard kept recall@10 0.99 / 0.995 / 0.995; in 4 shards of 25,000, 500 / 1,000 a shard kept 0.99 / 0.995 at 100
re-estimated (docs/region-index.md, 2026-12-07, session 13)."""
FINE_RESCORE = 200
"""Images a shard of :data:`FINE_SHARD` images with a fine sketch re-estimates from its stored regions (the best
of the fine sketch's estimate), unless a search says otherwise; a larger shard in proportion, a smaller one
:data:`MIN_FINE_RESCORE`. On the 2-shard build with :data:`FINE_KEEP` 2,000: 100 a shard kept recall@10 0.98,
200 and 300 0.995, top-1 1.0 in each; in 4 shards of 25,000 with 1,000 kept, 100 / 150 / 200 a shard kept
0.995 each (a first scratch pass on session 12's gallery, candidates only: 60 / 100 / 150 kept 0.985 / 0.995 /
1.0)."""
FINE_SHARD = 50_000
"""The shard size :data:`FINE_KEEP` and :data:`FINE_RESCORE` count for."""
MIN_FINE_KEEP = 1000
MIN_FINE_RESCORE = 200
"""The fewest images a smaller shard keeps for its fine sketch, and re-estimates after it: on the object data
at 20,000 images (2 shards of 10,000, fit 0.44, 40 queries, K 20 / 50) 100 re-estimated a shard kept recall@10
0.99-0.9925 whatever was kept, 200 kept 0.9925 / 0.995 / 0.9975 with 500 / 1,000 / 2,000 kept (session 13)."""


def fine_counts(images: int) -> tuple[int, int]:
    """``(kept, re-estimated)``: the images a shard of ``images`` with a fine sketch keeps for it and then
    re-estimates from its stored regions by default (:data:`FINE_KEEP` and :data:`FINE_RESCORE` in proportion)."""
    return (max(MIN_FINE_KEEP, round(FINE_KEEP * images / FINE_SHARD)),
            max(MIN_FINE_RESCORE, round(FINE_RESCORE * images / FINE_SHARD)))

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
ASSIGN_CHUNK = 16384
"""Region vectors assigned per block (a block's float32 copy and its gathers stay in the tens of MB)."""
BUILD_WORKERS = 2
"""Threads that assign and encode blocks side by side (this machine's two cores)."""
CODEC_SAMPLE = 16384
"""Region vectors whose residuals set compact storage's buckets (per-dimension quantiles: 16K rows pin a
quartile to well under a bucket's width; the whole k-means sample, 8 per centroid, took 15 s at 50K images)."""


def faiss_module() -> Any:
    return require("faiss", "the region index")


def residual_kernels() -> Any:
    """:mod:`itmrt.scale.residual_kernels` where numba is installed (the ``cpu`` extra), else None."""
    return compiled_kernels("itmrt.scale.residual_kernels")


@dataclass(frozen=True)
class SharedCodebook:
    """What the first new shard of a build trained, for its later shards to reuse (as one codebook serves a
    whole collection in PLAID): that shard's name, its centroids and, under compact storage, its residual codec
    (the residuals are taken to the same centroids, so one codec fits them; fitting it took 12-14 s a 50K shard)."""

    source: str
    centroids: np.ndarray
    codec: Any = None  # itmrt.runtime.compact_regions.ResidualCodec


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
    sketch_bits: int | None = None
    """Sign bits a region (:mod:`itmrt.scale.sketches`); 0: none; None: :data:`SKETCH_BITS` on a shard whose
    regions fit its centroids poorly, else none."""
    fine_bits: int | None = None
    """Bits of a region's fine sketch where there are sketches; 0: none; None: :data:`FINE_BITS` under exact
    storage, none under compact."""

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
        if self.sketch_bits:
            check_sketch_bits(self.sketch_bits, self.fine_bits)
        return self

    def sketch_sizes(self, fit: float) -> tuple[int, int]:
        """``(bits, fine)`` a region's sketches on a shard whose regions fit its centroids at ``fit`` (0: none)."""
        bits = self.sketch_bits if self.sketch_bits is not None else SKETCH_BITS if fit < POOR_FIT else 0
        fine = self.fine_bits if self.fine_bits is not None else FINE_BITS if self.storage == "exact" else 0
        return bits, fine if bits else 0


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
        # each group's centroids transposed into one contiguous [d, members] array: BLAS multiplies by a
        # contiguous right-hand side about twice as fast as by a transposed view
        self.grouped = [np.ascontiguousarray(self.centroids[members].T) for members in self.groups]
        self.coarse_t = None if self.coarse is None else np.ascontiguousarray(self.coarse.T)

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, similarities)`` of each vector ``[R, d]`` (float32) to its nearest centroid found."""
        if self.coarse is None or self.coarse_t is None:
            sims = vectors @ self.centroids.T
            codes = np.argmax(sims, axis=1)
            return codes, np.take_along_axis(sims, codes[:, None], axis=1)[:, 0]
        probe = min(COARSE_PROBE, len(self.coarse))
        top = np.argpartition(-(vectors @ self.coarse_t), probe - 1, axis=1)[:, :probe].ravel()
        # (vector, probed group) pairs sorted by group: one gather and one product per group, no per-vector loop
        order = np.argsort(top, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(top, minlength=len(self.coarse)))])
        best = np.full(len(top), -np.inf, dtype=np.float32)
        codes = np.zeros(len(top), dtype=np.int64)
        for group, members in enumerate(self.groups):
            pairs = order[bounds[group] : bounds[group + 1]]
            if len(pairs) == 0 or len(members) == 0:
                continue
            sims = vectors[pairs // probe] @ self.grouped[group]
            pick = np.argmax(sims, axis=1)
            best[pairs] = sims[np.arange(len(pairs)), pick]
            codes[pairs] = members[pick]
        slot = np.argmax(best.reshape(-1, probe), axis=1)
        rows = np.arange(len(vectors))
        return codes.reshape(-1, probe)[rows, slot], best.reshape(-1, probe)[rows, slot]


def assign_codes(embeddings: np.ndarray, assigner: CentroidAssigner,
                 each: Any = None, workers: int = BUILD_WORKERS) -> tuple[np.ndarray, float]:
    """Every region's code ``[images, regions]`` and the mean cosine of a region to its centroid (the fit);
    ``each(first_image, vectors, codes)`` sees every block (compact storage encodes residuals there).
    Blocks run on ``workers`` threads (numpy's products, casts and comparisons release the GIL), each writing
    its own rows; a block is read from ``embeddings`` (a memory map) only when a thread takes it."""
    images, regions, depth = (int(x) for x in embeddings.shape)
    dtype = np.uint16 if len(assigner.centroids) <= 1 << 16 else np.int32
    codes = np.empty((images, regions), dtype=dtype)
    per_block = max(1, ASSIGN_CHUNK // regions)

    def one_block(start: int) -> float:
        block = np.ascontiguousarray(np.asarray(embeddings[start : start + per_block], dtype=np.float32)
                                     .reshape(-1, depth))
        found, sims = assigner.assign(block)
        codes[start : start + per_block] = found.reshape(-1, regions)
        if each is not None:
            each(start, block, found)
        return float(sims.sum(dtype=np.float64))

    starts = range(0, images, per_block)
    if workers <= 1 or len(starts) <= 1:
        total = sum(one_block(start) for start in starts)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            total = sum(pool.map(one_block, starts))
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


def build_region_index(embeddings: np.ndarray, params: RegionParams,
                       shared: SharedCodebook | None = None) -> dict[str, Any]:
    """The arrays of a shard's region index (``centroids``, ``codes``, ``lists``; compact storage adds
    ``residuals``, ``buckets`` and ``bits``) and its record (parameters, fit, build seconds and each stage's).

    ``shared``: the centroids (and compact storage's codec, where it has one) trained on another shard of the
    same build, used instead of training k-means (and fitting a codec) here; the shard still stores its own
    copy and records where they came from."""
    if embeddings.ndim != 3:
        raise ItmrtError(f"the region index needs region embeddings (images x regions x d), not shape "
                         f"{tuple(embeddings.shape)}")
    clock = _StageClock()
    images, regions, depth = (int(x) for x in embeddings.shape)
    count = min(params.centroids, images * regions)
    codec = shared.codec if shared is not None and params.storage == "compact" else None
    sample = np.empty((0, depth), dtype=np.float32)
    if shared is None or (params.storage == "compact" and codec is None):
        sample = sample_regions(embeddings, count * params.sample if shared is None else CODEC_SAMPLE, params.seed)
        clock.lap("sample")
    if shared is None:
        centroids, centroids_from = train_centroids(sample, count, params.seed), "this shard"
        clock.lap("kmeans")
    else:
        centroids, centroids_from = shared.centroids, shared.source
    assigner = CentroidAssigner(centroids, params.seed)
    clock.lap("coarse")
    arrays: dict[str, np.ndarray] = {}
    each = None
    if params.storage == "compact":
        each = _residual_encoder(sample, assigner, params.bits, arrays, (images, regions, depth), codec)
        clock.lap("codec")
    codes, fit = assign_codes(embeddings, assigner, each)
    clock.lap("assign" if each is None else "assign_encode")
    arrays.update(centroids=centroids, codes=codes, lists=inverted_lists(codes, len(centroids)))
    clock.lap("lists")
    sketch_bits, fine_bits = params.sketch_sizes(fit)
    if sketch_bits:
        projection = sketch_projection(depth, sketch_bits + fine_bits, params.seed)
        # from the vectors given, under compact storage too: sketches of the decoded regions kept fewer of the
        # decoded gallery's answers in the scan's best 1,000 (0.98 against 0.9925; docs/region-index.md, session 14)
        sketches, fine = encode_both(embeddings, projection, sketch_bits)
        arrays.update(projection=projection, sketches=sketches)
        if fine is not None:
            arrays["fine_sketches"] = fine
        clock.lap("sketches")
    record = {"params": {"centroids": int(len(centroids)), "nprobe": min(params.nprobe, len(centroids)),
                         "candidates": params.candidates, "refine": DEFAULT_REFINE, "exact_pass": params.exact_pass,
                         "union": DEFAULT_UNION, "poor_fit": POOR_FIT,
                         "storage": params.storage,
                         "bits": params.bits if params.storage == "compact" else 0, "sample": params.sample,
                         **({"residual_codec": RESIDUAL_CODEC} if params.storage == "compact" else {}),
                         "seed": params.seed, "coarse_probe": COARSE_PROBE, "kmeans_iterations": KMEANS_ITERATIONS,
                         "centroids_from": centroids_from,
                         "codec_sample": min(CODEC_SAMPLE, len(sample)) if params.storage == "compact" else 0,
                         **({"codec_from": centroids_from if codec is not None else "this shard"}
                            if params.storage == "compact" else {}),
                         "sketch_bits": sketch_bits, "fine_bits": fine_bits, "stage_seconds": clock.stages},
              "rows": images, "regions": regions, "dims": depth, "fit": round(fit, 6),
              "build_seconds": round(clock.total(), 3),
              "faiss_version": str(faiss_module().__version__)}
    return {"arrays": arrays, "record": record}


class _StageClock:
    """Seconds per build stage."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.started


def _residual_encoder(sample: np.ndarray, assigner: CentroidAssigner, bits: float, arrays: dict[str, np.ndarray],
                      shape: tuple[int, int, int], codec: Any = None) -> Any:
    """Compact storage: fit the residual buckets on (part of) ``sample`` (unless a shared ``codec`` is given),
    allocate ``arrays["residuals"]`` and return the per-block encoder :func:`assign_codes` calls (each block
    writes its own images' rows; compiled where numba is installed, the same bytes as numpy's)."""
    from itmrt.runtime.compact_regions import ResidualCodec, compact_kernels
    from itmrt.runtime.fused import call_compiled

    images, regions, depth = shape
    if codec is None:
        few = sample[:: max(1, len(sample) // CODEC_SAMPLE)][:CODEC_SAMPLE]
        codec = ResidualCodec.fit(few, assigner.centroids[assigner.assign(few)[0]], bits)
    width = codec.packed_width(depth)
    residuals = np.empty((images, regions, width), dtype=np.uint8)
    arrays.update(residuals=residuals, buckets=codec.buckets, bits=codec.bits_per_dim)
    kernels, tables = compact_kernels(), codec.packing()

    def encode(first: int, vectors: np.ndarray, found: np.ndarray) -> None:
        if kernels is not None:
            packed = np.zeros((len(vectors), width), dtype=np.uint8)
            call_compiled(kernels.encode_residuals, vectors, assigner.centroids, found.astype(np.intp), *tables,
                          packed)
        else:
            packed = codec.encode(vectors, assigner.centroids[found])
        residuals[first : first + len(vectors) // regions] = packed.reshape(-1, regions, width)

    return encode


def fit_under(centroids: np.ndarray, embeddings: np.ndarray, images: int = 256, seed: int = 0) -> float:
    """Mean cosine of a sample of ``embeddings``' regions to their nearest of ``centroids`` (drift check)."""
    sample = sample_regions(embeddings, images * int(embeddings.shape[1]), seed)
    return float(CentroidAssigner(centroids, seed).assign(sample)[1].mean())
