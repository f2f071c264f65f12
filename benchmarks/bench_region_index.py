"""The region index against exhaustive scoring: recall, top-1 agreement, latency, build time, disk and memory.

    python benchmarks/bench_region_index.py synthetic [--images 100000] [--shards 2] [--queries 20]
        [--latency-queries 40] [--sweep-nprobe 4,8,16,32] [--sweep-k 50,100,200,400] [--work DIR] [--reuse]
        [--storages exact,compact] [--compact-exhaustive-queries 5] [--keep] [--warm]
    python benchmarks/bench_region_index.py shipped [--work DIR]
    python benchmarks/bench_region_index.py compact-recall --images N --queries Q --work DIR  (after --keep)
    python benchmarks/bench_region_index.py large --images 1000000 --shards 20 ...  (region_index_large.py)

``synthetic``: structured region embeddings at the released sizes (36 regions x
d 1024, ``scale_data``: a vocabulary of concepts grouped in topics, each image
mostly one topic's concepts, so objects recur across many images; each query
made from one image, three tokens in ten copies of its regions and the rest
words it does not show, all with heavy noise). The model is a NAAF at the
released sizes with random weights (``bench_flickr_size.prepare_bundle``). The
embeddings are written once as a float16 ``.npy`` and indexed with
``index_sharded(..., embeddings=...)`` (as ``itmrt index BUNDLE --embeddings``)
into one sharded gallery per storage, with ``--shortlist-index regions``.

Measured: exhaustive scoring of the ``--queries`` queries (the reference; 2
threads, batched); the region index swept over ``nprobe`` x K (candidates per
shard reranked), recall@10 against exhaustive and top-1 agreement; then, one
caption at a time on ``--latency-queries`` other queries, p50 / p99 ms at 1
and 2 threads of the default setting, of the best-recall setting, and of
today's global shortlist (a flat FAISS index of the shards' global vectors,
K = 100 per shard, built here in memory from the same shards). Build seconds,
disk bytes per image (the shard folders) and this process's RSS per image.
Each storage's recall is against exhaustive scoring of its own gallery
(compact storage: its decoded vectors), kept per gallery in ``--work``.
Compact storage also reports the score error of its decoded vectors on
``--compact-exhaustive-queries`` queries, and its exhaustive answers against
exact storage's where those are known (this run, or kept).
The runtimes are not warmed up (each query runs as in a one-shot command)
unless ``--warm`` says so: then as ``itmrt serve`` warms its own before it
reports ready (compiled scorer kernels, each shard's per-image constants built
on the untimed first query and read by the reranks after).

``shipped``: the small NAAF shipped in ``itmrt/assets`` on its test split (the
recipe's region data), through its real text encoder: rsum of exhaustive
scoring on exact and compact (1, 2, 4 bits) storage, and the region index's
recall against exhaustive scoring.

Tables are printed and ``results-*.json`` written in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.shortlist import caption_global_vectors, image_global_vectors
from itmrt.scale import IndexSpec, LocalShards, SearchRequest, ShardingOptions, index_sharded, read_sharded_gallery
from itmrt.scale.index import ShortlistIndex, build_index, faiss_module
from itmrt.scale.region_search import rerank_candidates

TOP = 10


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def overlap(found: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    return {"recall_at_10": round(float(np.mean([len(set(a) & set(b)) / exact.shape[1]
                                                 for a, b in zip(found, exact)])), 4),
            "top1_same": round(float(np.mean(found[:, 0] == exact[:, 0])), 4)}


def percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": round(statistics.median(ordered), 1),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))], 1)}


class GlobalShortlist:
    """Today's global shortlist over the same shards: flat FAISS indexes of their global vectors, K per shard."""

    def __init__(self, shards: LocalShards) -> None:
        started = time.perf_counter()
        self.shards, self.indexes = shards, []
        for shard in shards.shards:
            raw, record = build_index(image_global_vectors(shard.gallery.embeddings), IndexSpec("flat"))
            index = faiss_module().deserialize_index(np.frombuffer(raw, dtype=np.uint8))
            self.indexes.append(ShortlistIndex(index, record))
        self.build_seconds = time.perf_counter() - started

    def search(self, captions: CaptionEmbeddings, request: SearchRequest) -> np.ndarray:
        vectors = caption_global_vectors(captions)
        found = []
        for shard, index in zip(self.shards.shards, self.indexes):
            candidates = index.candidates(vectors, request.shortlist or 100)
            top = rerank_candidates(self.shards.runtime, shard.gallery.embeddings, captions, candidates, request.k,
                                    gallery=shard.gallery)
            found.append((top.scores, np.where(top.indices >= 0, top.indices + shard.record.first, -1)))
        scores = np.concatenate([s for s, _ in found], axis=1)
        rows = np.concatenate([r for _, r in found], axis=1)
        order = np.lexsort((rows, -scores), axis=1)[:, : request.k]
        return np.take_along_axis(rows, order, axis=1)


def timed_queries(search: Any, singles: list[CaptionEmbeddings], request: SearchRequest) -> dict[str, Any]:
    started = time.perf_counter()
    search(singles[0], request)  # untimed: pages the files in, computes the rerank's cached per-image constants
    first_ms = 1000 * (time.perf_counter() - started)
    times, stages = [], {}
    for query in singles:
        started = time.perf_counter()
        found = search(query, request)
        times.append(1000 * (time.perf_counter() - started))
        for stage, seconds in getattr(found, "stage_seconds", {}).items():
            stages.setdefault(stage, []).append(1000 * seconds)
    return {**percentiles(times), "first_query_ms": round(first_ms, 1),
            "stage_p50_ms": {stage: round(statistics.median(values), 1) for stage, values in stages.items()}}


def data_module(name: str) -> Any:
    """``objects`` (object_data: words name kinds of objects) or ``instances`` (scale_data: a query's shown words
    copy its image's very regions, plus noise)."""
    import object_data

    import scale_data

    return object_data if name == "objects" else scale_data


def make_data(name: str, depth: int) -> Any:
    module = data_module(name)
    return module.make_world(depth) if name == "objects" else module.make_space(depth)


def make_queries(name: str, world: Any, images: np.ndarray) -> CaptionEmbeddings:
    module = data_module(name)
    return module.captions_for(world, images) if name == "objects" else module.known_item_queries(world, images)


def write_source(path: Path, images: int, depth: int, data: str, world: Any) -> None:
    if path.is_file():
        return
    partial = path.with_suffix(".partial.npy")
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(images, 36, depth))
    data_module(data).fill_regions(world, 0, array)
    array.flush()
    del array
    partial.rename(path)


def build_gallery(runtime: Any, source: np.ndarray, out: Path, shards: int, storage: str, reuse: bool,
                  sketch: str = "auto") -> dict:
    if reuse and (out / "gallery.json").is_file():
        return {"write_seconds": None, "index_build_seconds": _recorded_build(out)}
    per_shard = -(-len(source) // shards)
    spec = IndexSpec("regions", regions_storage=storage, region_sketch=sketch)
    started = time.perf_counter()
    index_sharded(runtime, None, out, ShardingOptions(per_shard, "float16", spec), overwrite=True,
                  embeddings=source, source="bench_region_index synthetic")
    return {"write_seconds": round(time.perf_counter() - started, 1), "index_build_seconds": _recorded_build(out)}


def _recorded_build(out: Path) -> float:
    total = 0.0
    for shard in sorted(out.glob("shard-*/gallery.json")):
        total += float(json.loads(shard.read_text())["region_index"]["build_seconds"])
    return round(total, 1)


def sweep(shards: LocalShards, batch: CaptionEmbeddings, exact: np.ndarray, args: argparse.Namespace
          ) -> list[dict[str, Any]]:
    rows = []
    settings = [(nprobe, exact_pass, k, refine, union, rescore, prefilter) for nprobe in args.sweep_nprobe
                for exact_pass in args.sweep_exact for k in args.sweep_k for refine in args.sweep_refine
                for union in args.sweep_union for rescore in args.sweep_rescore for prefilter in args.sweep_prefilter]
    sketched = any(shard.regions.sketch is not None for shard in shards.shards)
    for nprobe, exact_pass, k, refine, union, rescore, prefilter in settings:
        for shard in shards.shards:
            shard.regions.refine = refine
        # a sketched shard's refine (its fine sketch's images) is not the recorded one: the request says it
        request = SearchRequest(k=TOP, shortlist=k, nprobe=nprobe, exact_pass=exact_pass, union=union,
                                rescore=rescore, prefilter=prefilter, refine=refine if sketched else None)
        started = time.perf_counter()
        found = shards.search(batch, request)
        seconds = time.perf_counter() - started
        rows.append({"nprobe": nprobe, "exact_pass": exact_pass, "K": k, "refine": refine, "union": union,
                     "rescore": rescore, "prefilter": prefilter,
                     **overlap(found.t2i.indices, exact),
                     "ms_per_query_batched": round(1000 * seconds / len(batch), 1),
                     "stage_ms": {s: round(1000 * v / len(batch), 1) for s, v in found.stage_seconds.items()}})
        print(f"  {rows[-1]}", flush=True)
    for shard in shards.shards:
        shard.regions.refine = args.refine or int(shard.regions.record["params"].get("refine", 2048))
    return rows


def compact_error(runtime: Any, source: np.ndarray, decoded: Any, batch: CaptionEmbeddings, sample: int = 256
                  ) -> dict[str, float]:
    """Score error of compact storage: the same captions against a sample of images, exact against decoded."""
    rows = np.sort(np.random.default_rng(5).choice(len(source), size=min(sample, len(source)), replace=False))
    exact = runtime.score(np.asarray(source[rows], dtype=np.float32), batch)
    approx = runtime.score(np.asarray(decoded[rows]), batch)
    error = np.abs(exact - approx)
    return {"mean_abs": round(float(error.mean()), 5), "max_abs": round(float(error.max()), 5),
            "pairs": int(error.size)}


def reference_path(args: argparse.Namespace, out: Path, queries: int, singles: int) -> Path:
    """Where exhaustive scoring of the queries drawn is kept: one file per gallery (compact storage's are those of
    its decoded vectors; one file for every storage had compared exact storage with compact's answers)."""
    return args.work / f"reference-{out.name}-{queries}-{singles}.npz"


def measure_storage(runtimes: dict[int, Any], out: Path, batch: CaptionEmbeddings, singles: list[CaptionEmbeddings],
                    args: argparse.Namespace) -> dict[str, Any]:
    from itmrt.scale.regions import DEFAULT_CANDIDATES

    gallery = read_sharded_gallery(out)
    shards = {threads: LocalShards(runtime, gallery) for threads, runtime in runtimes.items()}
    for opened in shards.values():
        for shard in opened.shards:
            if args.refine is not None and shard.regions is not None:
                shard.regions.refine = args.refine
    result: dict[str, Any] = {}
    cached = reference_path(args, out, len(batch), len(singles))  # exhaustive scoring of this gallery
    reference = None
    if args.reuse and cached.is_file():  # exhaustive scoring of the same queries, kept
        reference = dict(np.load(cached))
        print(f"  exhaustive: reused {cached}", flush=True)
    if reference is None:
        started = time.perf_counter()
        exact = shards[2].search(batch, SearchRequest(k=TOP))
        result["exhaustive_ms_per_query"] = round(1000 * (time.perf_counter() - started) / len(batch), 1)
        reference = {"indices": exact.t2i.indices, "scores": exact.t2i.scores}
        np.savez(cached, **reference)
        print(f"  exhaustive: {result['exhaustive_ms_per_query']} ms per query (2 threads, batched)", flush=True)
    result["sweep"] = sweep(shards[1], batch, reference["indices"], args)
    good = [row for row in result["sweep"] if row["recall_at_10"] >= 0.99 and row["top1_same"] >= 0.98]
    best = min(good, key=lambda row: row["ms_per_query_batched"]) if good else \
        max(result["sweep"], key=lambda row: (row["recall_at_10"], -row["ms_per_query_batched"]))
    settings: dict[str, tuple[Any, ...]] = {  # default: each shard's defaults (its fit decides)
                "default": (None, DEFAULT_CANDIDATES, None, None, None),
                "best": (best["nprobe"], best["K"], best["exact_pass"], best["union"], best["rescore"],
                         best["prefilter"])}
    latency = {}
    for name, (nprobe, k, exact_pass, union, rescore, *prefilter) in settings.items():
        request = SearchRequest(k=TOP, shortlist=k, nprobe=nprobe, exact_pass=exact_pass, union=union,
                                rescore=rescore, prefilter=prefilter[0] if prefilter else None)
        found = shards[1].search(batch, request).t2i.indices
        regions = shards[1].shards[0].regions
        latency[name] = {"nprobe": nprobe or regions.nprobe, "K": k,
                         "exact_pass": exact_pass if exact_pass is not None else regions.default_exact_pass(None),
                         "union": union if union is not None else regions.default_union(None),
                         "rescore": rescore if rescore is not None else
                         regions.default_rescore(None, shards[1].shards[0].gallery.embeddings),
                         **overlap(found, reference["indices"])}
        for threads, opened in shards.items():
            latency[name][f"{threads}_threads"] = timed_queries(opened.search, singles, request)
        print(f"  {name}: {latency[name]}", flush=True)
    result["latency"] = latency
    result["memory_mb"] = memory_mb()
    return {**result, "reference": reference}


def global_baseline(runtimes: dict[int, Any], out: Path, batch: CaptionEmbeddings, singles: list[CaptionEmbeddings],
                    exact: np.ndarray) -> list[dict[str, Any]]:
    gallery = read_sharded_gallery(out)
    baselines = {threads: GlobalShortlist(LocalShards(runtime, gallery)) for threads, runtime in runtimes.items()}
    rows = []
    for k in (100, 1000):
        request = SearchRequest(k=TOP, shortlist=k)
        row: dict[str, Any] = {"K": k, **overlap(baselines[1].search(batch, request), exact),
                               "build_seconds": round(baselines[1].build_seconds, 1)}
        for threads, baseline in baselines.items():
            row[f"{threads}_threads"] = timed_queries(baseline.search, singles, request)
        print(f"  global shortlist: {row}", flush=True)
        rows.append(row)
    return rows


def run_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    from itmrt.runtime import load

    from bench_flickr_size import prepare_bundle

    bundle = prepare_bundle(args.work / "released")[0]
    runtimes = {threads: load(bundle, threads=threads, warn=lambda message: None) for threads in (1, 2)}
    if args.warm:  # as `itmrt serve` before it reports ready: compiled kernels loaded, reranks cache constants
        for runtime in runtimes.values():
            runtime.warmup()
    depth = int(runtimes[1].bundle.manifest.dims["embed_size"])
    world = make_data(args.data, depth)
    source_path = args.work / f"source-{args.data}-{args.images}.npy"
    started = time.perf_counter()
    write_source(source_path, args.images, depth, args.data, world)
    print(f"source embeddings ready in {time.perf_counter() - started:.0f}s", flush=True)
    source = np.load(source_path, mmap_mode="r")
    targets = np.random.default_rng(args.images).choice(args.images, size=args.queries + args.latency_queries,
                                                        replace=False)
    batch = make_queries(args.data, world, targets[: args.queries])
    latency_batch = make_queries(args.data, world, targets[args.queries :])
    singles = [latency_batch.take([q]) for q in range(len(latency_batch))]
    results: dict[str, Any] = {"data": args.data, "images": args.images, "shards": args.shards, "queries": args.queries,
                               "latency_queries": len(singles), "storages": {}}
    references: dict[str, Any] = {}
    for storage in args.storages:
        out = gallery_path(args, storage)
        print(f"{storage}: building {out}", flush=True)
        built = build_gallery(runtimes[1], source, out, args.shards, storage, args.reuse, args.region_sketch)
        measured = measure_storage(runtimes, out, batch, singles, args)
        reference = references[storage] = measured.pop("reference")
        entry = {**built, **measured, "disk_bytes_per_image": round(folder_bytes(out) / args.images),
                 "rss_mb": memory_mb()}
        if storage == "compact":
            shards = LocalShards(runtimes[2], read_sharded_gallery(out))
            few = batch.take(list(range(min(args.compact_exhaustive_queries, len(batch)))))
            embeddings = shards.shards[0].gallery.embeddings
            entry["score_error"] = compact_error(runtimes[2], source[: len(embeddings)], embeddings, few)
            exact = references.get("exact")
            kept = reference_path(args, gallery_path(args, "exact"), len(batch), len(singles))
            if exact is None and kept.is_file():
                exact = dict(np.load(kept))
            entry["exhaustive_decoded_vs_exact"] = overlap(reference["indices"], exact["indices"]) \
                if exact is not None else None
        elif args.global_baseline:
            entry["global_shortlist"] = global_baseline(runtimes, out, batch, singles, reference["indices"])
        results["storages"][storage] = entry
        (args.work / f"results-{args.data}-{args.images}.json").write_text(json.dumps(results, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return results


def run_shipped(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped small NAAF on its test split: rsum with exact and compact storage, the index's recall."""
    from itmrt.data.precomp import PrecompSplit
    from itmrt.demo import SHIPPED_NAAF, shipped_model
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.metrics.recall import recall_table
    from itmrt.runtime import load
    from itmrt.synthetic.region_features import make_synthetic_dataset
    from itmrt.train.recipes import SMALL_REGION_DATA

    work = args.work / "shipped"
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    settings = {key: value for key, value in SMALL_REGION_DATA.items() if key != "num_images"}
    make_synthetic_dataset(data, {"test": SMALL_REGION_DATA["num_images"]["test"]}, **settings)
    split = PrecompSplit.open(data, "test")
    checkpoint = shipped_model(SHIPPED_NAAF)
    if checkpoint is None:
        sys.exit("error: this install ships no small NAAF (itmrt/assets)")
    export_bundle(checkpoint, data / "vocab.json", work / "bundle", ExportOptions(), log=lambda message: None)
    runtime = load(work / "bundle", threads=2, warn=lambda message: None)
    images = runtime.encode_images(split.images)
    captions = runtime.encode_captions(split.captions)
    exact = runtime.score(images, captions)
    result: dict[str, Any] = {"images": len(images), "captions": len(captions), "shape": list(images.shape),
                              "rsum_exact": round(recall_table(exact)["rsum"], 2), "compact": {}}
    float16_bytes = images[0].size * 2
    for bits in args.bits:
        rows = [compact_trial(runtime, images, captions, exact, bits, seed) for seed in range(args.seeds)]
        changes = [row["rsum"] - result["rsum_exact"] for row in rows]
        result["compact"][bits] = {
            "rsum_change_mean": round(float(np.mean(changes)), 2), "rsum_change_min": round(min(changes), 2),
            "rsum_change_max": round(max(changes), 2), "seeds": len(rows),
            "score_mean_abs_error": round(float(np.mean([row["mean_abs"] for row in rows])), 5),
            "score_max_abs_error": round(max(row["max_abs"] for row in rows), 5),
            "bytes_per_image": rows[0]["bytes_per_image"], "float16_bytes_per_image": float16_bytes,
            "released_bytes_per_image": round(36 * (-(-1024 * bits // 8)) + 36 * 2)}
        print(f"  compact {bits} bits: {result['compact'][bits]}", flush=True)
    out = work / "regions"
    index_sharded(runtime, None, out, ShardingOptions(-(-len(images) // 2), "float32", IndexSpec("regions")),
                  embeddings=images)
    shards = LocalShards(runtime, read_sharded_gallery(out))
    reference = shards.search(captions, SearchRequest(k=TOP)).t2i.indices
    rows = []
    for nprobe in (2, 4, 8):
        for k in (10, 25, 50):
            found = shards.search(captions, SearchRequest(k=TOP, shortlist=k, nprobe=nprobe)).t2i.indices
            rows.append({"nprobe": nprobe, "K": k, **overlap(found, reference)})
    result["index"] = rows
    result["centroids"] = json.loads((out / "shard-00000" / "gallery.json").read_text())["region_index"]["params"]
    (args.work / "results-shipped.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def compact_trial(runtime: Any, images: np.ndarray, captions: CaptionEmbeddings, exact: np.ndarray, bits: float,
                  seed: int) -> dict[str, float]:
    """Compact storage of ``images`` (one shard, k-means seed ``seed``) decoded and scored: rsum, score error."""
    from itmrt.metrics.recall import recall_table
    from itmrt.runtime.compact_regions import CompactRegions
    from itmrt.scale.regions import RegionParams, build_region_index, centroid_count

    count = centroid_count(len(images), int(images.shape[1]))
    arrays = build_region_index(images, RegionParams(count, storage="compact", bits=bits, seed=seed))["arrays"]
    decoded = CompactRegions(arrays["centroids"], arrays["codes"], arrays["residuals"], arrays["buckets"],
                             arrays["bits"])[:]
    scores = runtime.score(decoded, captions)
    return {"rsum": recall_table(scores)["rsum"], "mean_abs": float(np.abs(scores - exact).mean()),
            "max_abs": float(np.abs(scores - exact).max()),
            "bytes_per_image": round((arrays["residuals"].nbytes + arrays["codes"].nbytes) / len(images))}


def gallery_path(args: argparse.Namespace, storage: str) -> Path:
    """The work folder's gallery of this data, size, storage and ``--region-sketch`` (the default's has no suffix)."""
    sketched = "" if args.region_sketch == "auto" else f"-sketch-{args.region_sketch}"
    return args.work / f"gallery-{args.data}-{args.images}-{storage}{sketched}"


def run_compact_recall(args: argparse.Namespace) -> dict[str, Any]:
    """A kept compact gallery (``--keep``): the region index against exhaustive scoring of the same decoded
    vectors, on the first ``--queries`` queries of the synthetic run."""
    from itmrt.runtime import load

    from bench_flickr_size import prepare_bundle

    runtime = load(prepare_bundle(args.work / "released")[0], threads=2, warn=lambda message: None)
    world = make_data(args.data, int(runtime.bundle.manifest.dims["embed_size"]))
    targets = np.random.default_rng(args.images).choice(args.images, size=args.queries + args.latency_queries,
                                                        replace=False)
    batch = make_queries(args.data, world, targets[: args.queries])
    shards = LocalShards(runtime, read_sharded_gallery(gallery_path(args, "compact")))
    started = time.perf_counter()
    reference = shards.search(batch, SearchRequest(k=TOP)).t2i.indices
    result: dict[str, Any] = {"queries": len(batch),
                              "exhaustive_decoded_ms_per_query": round(1000 * (time.perf_counter() - started)
                                                                       / len(batch), 1)}
    for k in args.sweep_k:
        for rescore in args.sweep_rescore:  # None: each shard's default
            found = shards.search(batch, SearchRequest(k=TOP, shortlist=k, nprobe=args.sweep_nprobe[0], exact_pass=0,
                                                       rescore=rescore))
            result[f"K {k}" + (f", rescore {rescore}" if rescore is not None else "")] = \
                overlap(found.t2i.indices, reference)
    print(json.dumps(result))
    return result


def print_synthetic(results: dict[str, Any]) -> None:
    n = results["images"]
    print(f"\n{n:,} images, {results['shards']} shards; recall against exhaustive scoring on {results['queries']} "
          f"queries, latency on {results['latency_queries']} one-caption queries\n")
    print("| storage | setting | recall@10 | top-1 same | p50 / p99 ms, 1 thread | p50 / p99 ms, 2 threads |")
    print("|---|---|---|---|---|---|")
    for storage, entry in results["storages"].items():
        for name, row in entry["latency"].items():
            one, two = row["1_threads"], row["2_threads"]
            print(f"| {storage} | {name}: nprobe {row['nprobe']}, exact pass {row['exact_pass']}, K {row['K']}/shard, "
                  f"union {row.get('union', 0)}, rescore {row.get('rescore', 0)} "
                  f"| {row['recall_at_10']} | "
                  f"{row['top1_same']} | {one['p50_ms']} / {one['p99_ms']} | {two['p50_ms']} / {two['p99_ms']} |")
        for row in entry.get("global_shortlist", []):
            one, two = row["1_threads"], row["2_threads"]
            print(f"| {storage} | global shortlist, K {row['K']}/shard | {row['recall_at_10']} | {row['top1_same']} "
                  f"| {one['p50_ms']} / {one['p99_ms']} | {two['p50_ms']} / {two['p99_ms']} |")
    print("\n| storage | write + index s | index build s | disk bytes/image | RSS MB anon / file | "
          "exhaustive ms/query |")
    print("|---|---|---|---|---|---|")
    for storage, entry in results["storages"].items():
        rss = entry["rss_mb"]
        exhaustive = entry.get("exhaustive_ms_per_query", entry.get("exhaustive_decoded_ms_per_query"))
        print(f"| {storage} | {entry['write_seconds']} | {entry['index_build_seconds']} | "
              f"{entry['disk_bytes_per_image']:,} | {rss.get('RssAnon')} / {rss.get('RssFile')} | {exhaustive} |")
    print("\n| storage | nprobe | exact pass | K/shard | union | rescore | recall@10 | top-1 same | ms/query (batched, "
          "1 thread) | stages ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for storage, entry in results["storages"].items():
        for row in entry["sweep"]:
            print(f"| {storage} | {row['nprobe']} | {row['exact_pass']} | {row['K']} | {row.get('union', 0)} | "
                  f"{row.get('rescore')}, prefilter {row.get('prefilter')} | "
                  f"{row['recall_at_10']} | "
                  f"{row['top1_same']} | "
                  f"{row['ms_per_query_batched']} | {row['stage_ms']} |")
    compact = results["storages"].get("compact")
    if compact and "score_error" in compact:
        print(f"\ncompact: score error {compact['score_error']}; exhaustive on decoded vs exact storage: "
              f"{compact['exhaustive_decoded_vs_exact']}")


def print_shipped(result: dict[str, Any]) -> None:
    print(f"\nshipped small NAAF, test split: {result['images']} images {result['shape'][1:]}, "
          f"{result['captions']} captions; rsum exhaustive (exact storage) {result['rsum_exact']}\n")
    first = next(iter(result["compact"].values()))
    print(f"| compact bits | rsum change, mean (min / max) over {first['seeds']} k-means seeds | score error mean / "
          f"max | bytes/image (float16: {first['float16_bytes_per_image']}) | bytes/image, released sizes |")
    print("|---|---|---|---|---|")
    for bits, row in result["compact"].items():
        print(f"| {bits} | {row['rsum_change_mean']} ({row['rsum_change_min']} / {row['rsum_change_max']}) | "
              f"{row['score_mean_abs_error']} / {row['score_max_abs_error']} | {row['bytes_per_image']} | "
              f"{row['released_bytes_per_image']} |")
    print(f"\nregion index ({result['centroids']['centroids']} centroids per shard, 2 shards) against exhaustive:\n")
    print("| nprobe | K/shard | recall@10 | top-1 same |")
    print("|---|---|---|---|")
    for row in result["index"]:
        print(f"| {row['nprobe']} | {row['K']} | {row['recall_at_10']} | {row['top1_same']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("synthetic", "shipped", "compact-recall", "large"))
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--data", choices=("objects", "instances"), default="objects", help=(
        "objects: object_data (words name kinds of objects); instances: scale_data (shown words copy regions)"))
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--region-sketch", default="auto", help=(
        "the galleries' --region-sketch: auto (sign-bit sketches on poorly fitting shards), off, BITS or BITS:FINE"))
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--latency-queries", type=int, default=40)
    parser.add_argument("--compact-exhaustive-queries", type=int, default=5)
    numbers = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    optional_numbers = lambda text: [None if x == "none" else int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--sweep-nprobe", type=numbers, default=[8])
    parser.add_argument("--sweep-exact", type=numbers, default=[0, 400, 1000], help="exact_pass values")
    parser.add_argument("--sweep-k", type=numbers, default=[25, 50, 100])
    parser.add_argument("--sweep-union", type=numbers, default=[0], help="global-vector candidates per shard")
    parser.add_argument("--sweep-refine", type=numbers, default=[2048], help="refine values (images per shard)")
    parser.add_argument("--refine", type=int, default=None, help="search every shard with this refine")
    parser.add_argument("--no-global", dest="global_baseline", action="store_false",
                        help="skip today's global shortlist")
    parser.add_argument("--storages", type=lambda text: text.split(","), default=["exact", "compact"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/itmrt-region-index"))
    parser.add_argument("--reuse", action="store_true", help="search galleries kept by an earlier --keep run")
    parser.add_argument("--keep", action="store_true", help="keep the galleries (and the source embeddings)")
    parser.add_argument("--warm", action="store_true", help=(
        "synthetic: warm the runtimes up as `itmrt serve` does before it reports ready (the scorer's compiled "
        "kernels loaded; reranks build each shard's per-image constants once, on the untimed first query, and "
        "read them after); without it every query runs as in a one-shot command"))
    parser.add_argument("--bits", type=lambda text: [float(x) for x in text.split(",")], default=[1, 2, 2.4, 4],
                        help="shipped: compact residual bits per dimension to measure")
    parser.add_argument("--seeds", type=int, default=5, help="shipped: k-means seeds per compact setting")
    parser.add_argument("--max-build-seconds", type=float, default=0.0,
                        help="large: start no further shard after this long (0: build them all)")
    parser.add_argument("--source", type=Path, default=None,
                        help="large: read the bundle, gallery and build results of an earlier run here (not written)")
    parser.add_argument("--large-refine", type=optional_numbers, default=[None],
                        help="large: refine values per shard (none: the shards' recorded)")
    parser.add_argument("--sweep-prefilter", type=optional_numbers, default=[None],
                        help="prefilter values per shard (none: the default; 0: every probed image)")
    parser.add_argument("--large-threads", type=numbers, default=[1, 2],
                        help="large: threads per runtime measured (each opens the gallery in memory)")
    parser.add_argument("--sweep-budget", type=optional_numbers, default=[None],
                        help="large: images reranked over all shards together (none: K per shard)")
    parser.add_argument("--sweep-rescore", type=optional_numbers, default=[None],
                        help="images per shard re-estimated from stored regions (none: the default; 0: off)")
    parser.add_argument("--exhaustive", type=int, default=0,
                        help="large: score this many of the kept run's queries exhaustively (decompressed)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "shipped":
        print_shipped(run_shipped(args))
        return
    if args.what == "compact-recall":
        run_compact_recall(args)
        return
    if args.what == "large":
        from region_index_large import run_large

        run_large(args)
        return
    needed = args.images * 36 * 1024 * 2 * 2.2
    if not args.reuse and shutil.disk_usage(args.work).free < needed:
        sys.exit(f"error: {args.work} has {shutil.disk_usage(args.work).free / 2**30:.1f} GB free; "
                 f"the run needs {needed / 2**30:.1f} GB")
    results = run_synthetic(args)
    print_synthetic(results)
    if not args.keep:
        (args.work / f"source-{args.data}-{args.images}.npy").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
