"""Whether any candidate generation reading less than the whole gallery can find exhaustive scoring's top 10.

    python benchmarks/region_index_reach.py --data instances --images 20000 --shards 2 --queries 20 --work DIR
    python benchmarks/region_index_reach.py --data objects --images 20000 --shards 2 --queries 20 --work DIR

Builds (or, with ``--reuse``, reads what ``bench_region_index.py synthetic --keep`` left in ``DIR``) an
exact-storage region index of the synthetic data and, for each query, computes every word's similarity to every
region of every shard (the exhaustive product, in float32 from the stored float16). From that it reports:

- **reach**: the share of each word's ``R`` most similar regions (over the whole shard) that lie in the
  inverted lists of its ``nprobe`` nearest centroids: what probing centroids can read at all;
- **candidates kept** (share of exhaustive scoring's top 10 among each shard's best ``keep`` images) when a
  shard's images are estimated through the model's score structure (:class:`ScoreEstimate`) from
  (a) every word's exact similarities to the regions in its probed lists (the best any estimate confined to the
  probes can do), and (b) every word's exact ``R`` most similar regions over the whole shard (an oracle
  per-word nearest-region search; words an image misses take the ``R``-th similarity);
- **the floor of a scan**: the exhaustive product's arithmetic per query (``2 m N regions d``) at this run's
  large-GEMM rate, here and at 100,000 images (the time any exhaustive similarity pass needs at least);
- with ``--second-codebook K``, **an inverted multi-index**: a second k-means codebook of ``K`` words over each
  region's residual from its centroid, so that a region's similarity is estimated as ``q.c + q.w`` (centroid
  plus residual word) and a word reads the ``n`` regions of its best (centroid, word) cells. For ``n`` in
  500 / 2,000 / 10,000 regions a word it reports the reach of those reads (against reading the regions of the
  best centroids alone, the same ``n``), the candidates kept when the read regions' *exact* similarities feed
  the estimate, and the candidates kept by the two-level estimate itself over every region.
- with ``--graph M``, **a graph index**: an HNSW graph (FAISS, float16 vectors, ``M`` links a node) over every
  region of a shard; each word takes the 300 regions its graph search returns at two search widths (``efSearch``
  300 and 1,000): their reach, the candidates kept from their exact similarities, and the search's time a word
  on one thread;
- with ``--sketches 64,128,...``, **a cheaper scan**: every region's random-projection sketch of that width;
  each word reads its best 1,000 / 3,000 regions by sketch similarity: their reach, the candidates kept from
  their exact similarities, the candidates kept by the sketch similarities themselves (no exact similarity),
  and the sketch scan's own floor at 100,000 images.

On data whose regions cluster (``objects``) the probed lists hold most of a word's nearest regions; on data where
a word's nearest regions are spread over every centroid (``instances``: a region is a concept plus one of 8,192
shared noise directions) they do not, whatever the number of centroids, while the oracle still finds the
answers: only a near-exhaustive similarity pass does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_region_index import build_gallery, make_data, make_queries, write_source  # noqa: E402

from itmrt.scale import LocalShards, SearchRequest, read_sharded_gallery  # noqa: E402
from itmrt.scale.region_search import ScoreEstimate, select_probes  # noqa: E402

NPROBES = (8, 32, 128, 512)
KEEPS = (50, 500)
NEAREST = (100, 300)
BLOCK = 2048  # images per block of the exhaustive product
READS = (500, 2000, 10000)  # regions a word reads through the multi-index
GRAPH_FOUND = 300  # regions a word takes from the graph search
GRAPH_EFS = (300, 1000)  # the graph search's candidate list lengths
SKETCH_READS = (1000, 3000)  # regions a word reads by its sketch similarities


def word_region_sims(tokens: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """``[m, N * regions]`` every word's similarity to every region (float32 products over float16 blocks)."""
    images, regions, depth = embeddings.shape
    out = np.empty((len(tokens), images * regions), dtype=np.float32)
    for start in range(0, images, BLOCK):
        block = np.asarray(embeddings[start : start + BLOCK], dtype=np.float32).reshape(-1, depth)
        out[:, start * regions : start * regions + len(block)] = tokens @ block.T
    return out


def kept(estimate: ScoreEstimate, best: np.ndarray, tokens: np.ndarray, answers: np.ndarray) -> dict[int, int]:
    """How many of ``answers`` (shard rows) rank in the best ``keep`` images by ``best [m, N]``'s estimate."""
    scores = estimate.scores(best, tokens)
    rank = np.empty(len(scores), dtype=np.int64)
    rank[np.lexsort((np.arange(len(scores)), -scores))] = np.arange(len(scores))
    return {keep: int((rank[answers] < keep).sum()) for keep in KEEPS}


def best_of_chosen(chosen: np.ndarray, sims: np.ndarray, images: int) -> np.ndarray:
    """``[m, N]`` each image's best exact similarity among a word's chosen regions; words an image has none of
    take the lowest chosen similarity (what an index that read only those regions could say)."""
    words = len(sims)
    floor = np.where(chosen, sims, np.inf).min(axis=1)
    best = np.where(chosen, sims, -np.inf).reshape(words, images, -1).max(axis=2)
    return np.where(np.isfinite(best), best, floor[:, None]).astype(np.float32)


def second_codebook(embeddings: np.ndarray, codes: np.ndarray, centroids: np.ndarray, size: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A k-means codebook of ``size`` words over the regions' residuals from their centroid (trained on a sample
    of 16 residuals a word), and each region's nearest word: the second half of an inverted multi-index."""
    import faiss

    images, regions, depth = embeddings.shape
    flat = codes.reshape(-1).astype(np.int64)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(images * regions, size=min(images * regions, 16 * size), replace=False))
    def residual_blocks() -> Any:
        for start in range(0, images, BLOCK):
            block = np.asarray(embeddings[start : start + BLOCK], dtype=np.float32).reshape(-1, depth)
            at = start * regions
            yield at, np.ascontiguousarray(block - centroids[flat[at : at + len(block)]])

    picked = [block[sample[(sample >= at) & (sample < at + len(block))] - at] for at, block in residual_blocks()]
    kmeans = faiss.Kmeans(depth, size, niter=10, seed=seed, max_points_per_centroid=16)
    kmeans.train(np.concatenate(picked))
    words = np.empty(images * regions, dtype=np.int64)
    for at, residual in residual_blocks():
        words[at : at + len(residual)] = kmeans.index.search(residual, 1)[1][:, 0]
    return kmeans.centroids.astype(np.float32), words


def multi_index(tokens: np.ndarray, sims: np.ndarray, coarse: np.ndarray, second: tuple[np.ndarray, np.ndarray],
                images: int, estimate: ScoreEstimate, answers: np.ndarray, nearest: np.ndarray,
                counts: dict[str, float]) -> None:
    """Reach and candidates kept when each word reads its best ``n`` regions by the coarse or two-level estimate
    (``coarse [m, N * regions]``: each region's centroid similarity)."""
    codebook, words_of_regions = second
    two_level = coarse + (tokens @ codebook.T)[:, words_of_regions]
    for name, estimated in (("one codebook", coarse), ("multi-index", two_level)):
        read_best(name, estimated, READS, tokens, sims, images, estimate, answers, nearest, counts)
    estimate_alone("multi-index", two_level, tokens, images, estimate, answers, counts)


def read_best(name: str, estimated: np.ndarray, reads: tuple[int, ...], tokens: np.ndarray, sims: np.ndarray,
              images: int, estimate: ScoreEstimate, answers: np.ndarray, nearest: np.ndarray,
              counts: dict[str, float]) -> None:
    """Reach and candidates kept when each word reads its best ``n`` regions by ``estimated [m, N * regions]``
    (for each ``n`` of ``reads``), the read regions' exact similarities feeding the estimate."""
    for n in reads:
        chosen = np.zeros(sims.shape, dtype=bool)
        np.put_along_axis(chosen, np.argpartition(-estimated, n - 1, axis=1)[:, :n], True, axis=1)
        counts[f"reach R{nearest.shape[1]}, {name} reads {n}"] += \
            float(np.take_along_axis(chosen, nearest, axis=1).mean()) * len(tokens)
        for keep, found in kept(estimate, best_of_chosen(chosen, sims, images), tokens, answers).items():
            counts[f"{name} reads {n} (exact similarities), keep {keep}"] += found


def estimate_alone(name: str, estimated: np.ndarray, tokens: np.ndarray, images: int, estimate: ScoreEstimate,
                   answers: np.ndarray, counts: dict[str, float]) -> None:
    """Candidates kept when ``estimated [m, N * regions]`` itself stands for every region's similarity."""
    best = estimated.reshape(len(tokens), images, -1).max(axis=2).astype(np.float32)
    for keep, found in kept(estimate, best, tokens, answers).items():
        counts[f"{name} estimate over every region, keep {keep}"] += found


def region_graph(embeddings: np.ndarray, links: int) -> Any:
    """An HNSW graph (FAISS, inner product, float16 scalar-quantised vectors) over every region of a shard."""
    import faiss

    images, regions, depth = embeddings.shape
    graph = faiss.IndexHNSWSQ(depth, faiss.ScalarQuantizer.QT_fp16, links, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 40
    graph.train(np.zeros((1, depth), dtype=np.float32))
    for start in range(0, images, BLOCK):
        graph.add(np.asarray(embeddings[start : start + BLOCK], dtype=np.float32).reshape(-1, depth))
    return graph


def graph_reads(tokens: np.ndarray, sims: np.ndarray, graph: Any, images: int, estimate: ScoreEstimate,
                answers: np.ndarray, nearest: np.ndarray, counts: dict[str, float]) -> None:
    """Reach and candidates kept when each word reads the ``GRAPH_FOUND`` regions a graph search returns, and
    the search's time per word (one thread)."""
    import faiss

    faiss.omp_set_num_threads(1)
    for ef in GRAPH_EFS:
        graph.hnsw.efSearch = ef
        started = time.perf_counter()
        found = graph.search(np.ascontiguousarray(tokens, dtype=np.float32), GRAPH_FOUND)[1]
        counts[f"graph ef {ef}: ms a word (1 thread)"] += (time.perf_counter() - started) * 1000
        chosen = np.zeros(sims.shape, dtype=bool)
        np.put_along_axis(chosen, np.maximum(found, 0), True, axis=1)
        counts[f"reach R{nearest.shape[1]}, graph ef {ef} finds {GRAPH_FOUND}"] += \
            float(np.take_along_axis(chosen, nearest, axis=1).mean()) * len(tokens)
        for keep, n in kept(estimate, best_of_chosen(chosen, sims, images), tokens, answers).items():
            counts[f"graph ef {ef} finds {GRAPH_FOUND} (exact similarities), keep {keep}"] += n
    faiss.omp_set_num_threads(2)


def region_sketches(embeddings: np.ndarray, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random orthonormal projection ``[d, width]`` and every region's ``width``-wide sketch (float32)."""
    images, regions, depth = embeddings.shape
    projection = np.linalg.qr(np.random.default_rng(seed).standard_normal((depth, width)))[0].astype(np.float32)
    projection *= np.float32(np.sqrt(depth / width))  # sketch products estimate the full products
    sketches = np.empty((images * regions, width), dtype=np.float32)
    for start in range(0, images, BLOCK):
        block = np.asarray(embeddings[start : start + BLOCK], dtype=np.float32).reshape(-1, depth)
        sketches[start * regions : start * regions + len(block)] = block @ projection
    return projection, sketches


def bit_sketches(embeddings: np.ndarray, bits: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian projection ``[d, bits]`` and every region's sign bits under it, as +-1 (float32): a SimHash
    whose Hamming distance ``h`` to a word's bits estimates their angle as ``pi * h / bits``."""
    images, regions, depth = embeddings.shape
    projection = np.random.default_rng(1000 + seed).standard_normal((depth, bits)).astype(np.float32)
    signs = np.empty((images * regions, bits), dtype=np.float32)
    for start in range(0, images, BLOCK):
        block = np.asarray(embeddings[start : start + BLOCK], dtype=np.float32).reshape(-1, depth)
        signs[start * regions : start * regions + len(block)] = np.where(block @ projection >= 0, 1.0, -1.0)
    return projection, signs


def bit_sketch_reads(tokens: np.ndarray, sims: np.ndarray, sketch: tuple[np.ndarray, np.ndarray], images: int,
                     estimate: ScoreEstimate, answers: np.ndarray, nearest: np.ndarray,
                     counts: dict[str, float]) -> None:
    """As :func:`sketch_reads` for sign-bit sketches: similarity estimated as ``cos(pi * hamming / bits)``."""
    projection, signs = sketch
    bits = projection.shape[1]
    agree = np.where(tokens @ projection >= 0, 1.0, -1.0).astype(np.float32) @ signs.T  # bits - 2 * hamming
    estimated = np.cos(np.pi * (bits - agree) / (2 * bits)).astype(np.float32)
    read_best(f"bits {bits}", estimated, SKETCH_READS, tokens, sims, images, estimate, answers, nearest, counts)
    estimate_alone(f"bits {bits}", estimated, tokens, images, estimate, answers, counts)


def sketch_reads(tokens: np.ndarray, sims: np.ndarray, sketch: tuple[np.ndarray, np.ndarray], images: int,
                 estimate: ScoreEstimate, answers: np.ndarray, nearest: np.ndarray,
                 counts: dict[str, float]) -> None:
    """Reach and candidates kept when each word reads its best ``n`` regions by sketch similarity (a scan of
    every region at the sketch's width, then exact similarities of the read regions)."""
    projection, sketches = sketch
    width = projection.shape[1]
    estimated = (tokens @ projection) @ sketches.T
    read_best(f"sketch {width}", estimated, SKETCH_READS, tokens, sims, images, estimate, answers, nearest, counts)
    estimate_alone(f"sketch {width}", estimated, tokens, images, estimate, answers, counts)


def one_shard(tokens: np.ndarray, sims: np.ndarray, codes: np.ndarray, centroids: np.ndarray,
              estimate: ScoreEstimate, answers: np.ndarray, counts: dict[str, float],
              second: tuple[np.ndarray, np.ndarray] | None = None, graph: Any = None,
              sketches: tuple[tuple[np.ndarray, np.ndarray], ...] = (),
              bit_sketch_sets: tuple[tuple[np.ndarray, np.ndarray], ...] = ()) -> None:
    words, images = len(tokens), codes.shape[0]
    flat_codes = codes.reshape(-1).astype(np.int64)
    centroid_sims = tokens @ centroids.T
    nearest = {r: np.argpartition(-sims, r - 1, axis=1)[:, :r] for r in NEAREST}
    for nprobe in NPROBES:
        probed = select_probes(centroid_sims, nprobe)[0]
        inside = np.zeros((words, len(centroids)), dtype=bool)
        inside[np.arange(words)[:, None], probed] = True
        mask = inside[np.arange(words)[:, None], flat_codes[None, :]]  # [m, N * regions]
        for r, top in nearest.items():
            counts[f"reach R{r} nprobe {nprobe}"] += float(np.take_along_axis(mask, top, axis=1).mean()) * words
        if nprobe in (8, 128):
            for keep, n in kept(estimate, best_of_chosen(mask, sims, images), tokens, answers).items():
                counts[f"probed exact, nprobe {nprobe}, keep {keep}"] += n
    for r, top in nearest.items():
        chosen = np.zeros_like(sims, dtype=bool)
        np.put_along_axis(chosen, top, True, axis=1)
        for keep, n in kept(estimate, best_of_chosen(chosen, sims, images), tokens, answers).items():
            counts[f"oracle nearest R{r}, keep {keep}"] += n
    if second is not None:
        multi_index(tokens, sims, centroid_sims[:, flat_codes], second, images, estimate, answers,
                    nearest[NEAREST[0]], counts)
    if graph is not None:
        graph_reads(tokens, sims, graph, images, estimate, answers, nearest[NEAREST[0]], counts)
    for sketch in sketches:
        sketch_reads(tokens, sims, sketch, images, estimate, answers, nearest[NEAREST[0]], counts)
    for bit_sketch in bit_sketch_sets:
        bit_sketch_reads(tokens, sims, bit_sketch, images, estimate, answers, nearest[NEAREST[0]], counts)
    counts["words"] += words


def gemm_rate(size: int = 2048) -> float:
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    a @ a
    started = time.perf_counter()
    a @ a
    return 2 * size**3 / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("objects", "instances"), default="instances")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--reuse", action="store_true", help="use the gallery and reference already in --work")
    parser.add_argument("--second-codebook", type=int, default=0, metavar="K",
                        help="also measure an inverted multi-index with a K-word residual codebook a shard (0: off)")
    parser.add_argument("--graph", type=int, default=0, metavar="M",
                        help="also measure an HNSW graph over each shard's regions with M links a node (0: off)")
    parser.add_argument("--sketches", default="", metavar="W,W", help=(
        "also measure a scan of every region's random-projection sketch of each width (e.g. 64,128,256): each "
        "word reads its best regions by sketch similarity"))
    parser.add_argument("--bit-sketches", default="", metavar="B,B", help=(
        "also measure a scan of every region's sign-bit sketch (SimHash) of each length in bits (e.g. 128,256)"))
    args = parser.parse_args()
    from itmrt.runtime import load

    from bench_flickr_size import prepare_bundle

    args.work.mkdir(parents=True, exist_ok=True)
    runtime = load(prepare_bundle(args.work / "released")[0], threads=2, warn=lambda message: None)
    depth = int(runtime.bundle.manifest.dims["embed_size"])
    world = make_data(args.data, depth)
    source_path = args.work / f"source-{args.data}-{args.images}.npy"
    write_source(source_path, args.images, depth, args.data, world)
    out = args.work / f"gallery-{args.data}-{args.images}-exact"
    build_gallery(runtime, np.load(source_path, mmap_mode="r"), out, args.shards, "exact", args.reuse)
    targets = np.random.default_rng(args.images).choice(args.images, size=args.queries, replace=False)
    batch = make_queries(args.data, world, targets)
    shards = LocalShards(runtime, read_sharded_gallery(out))
    reference = shards.search(batch, SearchRequest(k=10)).t2i.indices  # exhaustive scoring
    estimate = ScoreEstimate.from_bundle(runtime.bundle)
    counts: dict[str, float] = defaultdict(float)
    seconds: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(shards.shards)
    for number, shard in enumerate(shards.shards):
        if args.second_codebook and shard.regions is not None:
            started = time.perf_counter()
            seconds[number] = second_codebook(shard.gallery.embeddings, np.asarray(shard.regions.codes),
                                              shard.regions.centroids, args.second_codebook, seed=number)
            print(f"shard {number}: residual codebook of {args.second_codebook} trained and assigned in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    graphs: list[Any] = [None] * len(shards.shards)
    for number, shard in enumerate(shards.shards):
        if args.graph:
            started = time.perf_counter()
            graphs[number] = region_graph(shard.gallery.embeddings, args.graph)
            print(f"shard {number}: region graph (M {args.graph}) built in {time.perf_counter() - started:.0f} s",
                  flush=True)
    widths = [int(w) for w in args.sketches.split(",") if w.strip()]
    sketches = [tuple(region_sketches(shard.gallery.embeddings, width, seed=number) for width in widths)
                for number, shard in enumerate(shards.shards)]
    lengths = [int(b) for b in args.bit_sketches.split(",") if b.strip()]
    signs = [tuple(bit_sketches(shard.gallery.embeddings, bits, seed=number) for bits in lengths)
             for number, shard in enumerate(shards.shards)]
    for query in range(len(batch)):
        assert batch.offsets is not None
        start, length = int(batch.offsets[query]), int(batch.lengths[query])
        tokens = np.asarray(batch.vectors[start : start + length], dtype=np.float32)
        for number, shard in enumerate(shards.shards):
            first, images = shard.record.first, shard.record.images
            answers = reference[query][(reference[query] >= first) & (reference[query] < first + images)] - first
            counts["answers"] += len(answers)
            sims = word_region_sims(tokens, shard.gallery.embeddings)
            regions = shard.regions
            assert regions is not None
            one_shard(tokens, sims, np.asarray(regions.codes), regions.centroids, estimate, answers, counts,
                      seconds[number], graphs[number], sketches[number], signs[number])
        print(f"query {query + 1}/{len(batch)}", flush=True)
    result: dict[str, Any] = {"data": args.data, "images": args.images, "shards": args.shards, "queries": len(batch),
                              "fit": [s.regions.fit for s in shards.shards if s.regions is not None],
                              "centroids": [len(s.regions.centroids) for s in shards.shards if s.regions is not None],
                              "second_codebook": args.second_codebook, "gemm_gflops": round(gemm_rate(), 1)}
    flops = 2 * counts["words"] / len(batch) * 36 * depth  # per image, one caption of the mean length
    result["scan_floor_ms"] = round(1000 * flops * args.images / (result["gemm_gflops"] * 1e9), 1)
    result["scan_floor_ms_100k"] = round(1000 * flops * 100000 / (result["gemm_gflops"] * 1e9), 1)
    for key, value in counts.items():
        if key.startswith("reach") or "ms a word" in key:
            result[key] = round(value / counts["words"], 3)
        elif key not in ("words", "answers"):
            result[key] = round(value / max(1, counts["answers"]), 3)
    result["graph_links"] = args.graph
    for width in widths:  # the sketch scan's floor: its product's arithmetic at the large-GEMM rate
        floor = result["scan_floor_ms_100k"] * width / depth
        result[f"sketch {width}: scan floor ms at 100,000 images"] = round(floor, 1)
    name = f"reach-{args.data}-{args.images}-{args.second_codebook}-{args.graph}-{len(widths)}-{len(lengths)}"
    record = args.work / f"{name}.json"
    record.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.images:,} images ({args.data}), {args.shards} shards, fit {result['fit']}, centroids "
          f"{result['centroids']}; {len(batch)} queries; the exhaustive word x region product's floor "
          f"{result['scan_floor_ms']} ms per query here, {result['scan_floor_ms_100k']} ms at 100,000 images "
          f"(large GEMM {result['gemm_gflops']} GFLOP/s)\n")
    print("| measure | share |\n|---|---|")
    for key, value in result.items():
        if key.startswith(("reach", "probed", "oracle", "one codebook", "multi", "graph", "sketch", "bits")):
            print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
