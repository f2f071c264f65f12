"""The region index at 1M images, compact storage, built shard by shard (``bench_region_index.py large``).

    python benchmarks/bench_region_index.py large --images 1000000 --shards 20 --queries 10 \\
        --latency-queries 30 --sweep-k 10,25,50 --work DIR [--max-build-seconds 2100]
    python benchmarks/bench_region_index.py large --images 1000000 --shards 20 --queries 10 \\
        --work DIR --exhaustive 5        (later, on the kept gallery: the reference and the recall)
    ... large ... --reuse                (measure the latency sweep again on the kept gallery)

1M images of float16 region embeddings would be 74 GB, more than this disk
holds, so no source file is written: each shard's embeddings (object_data,
the same images as ``synthetic`` makes) are generated in memory, checked and
handed to the sharded writer (as ``itmrt index BUNDLE --embeddings`` does per
shard), which stores them, builds the shard's compact region index and drops
them; then the next shard is made. Generation is timed apart from the build.
``--max-build-seconds``: when generating and building have taken this long,
no further shard is started; the gallery holds the shards built so far and the
results say how many images that is (the run is then a smaller size, not 1M).

The first run builds, opens the gallery at 1 and 2 threads and measures, for
each K of ``--sweep-k`` (images per shard reranked; nprobe and refine are the
shards' recorded defaults), p50 / p99 ms per one-caption query on
``--latency-queries`` queries, and the index's top 10 for ``--queries`` other
queries (saved). Disk bytes per image, RSS, build seconds in all and per
stage (the shards' recorded stage seconds summed). The second run
(``--exhaustive N``) scores the first N of those queries exhaustively on the
decompressed vectors (2 threads) and reports recall@10 and top-1 agreement of
each K against it. The gallery is kept for it (delete ``DIR`` afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.scale import IndexSpec, LocalShards, SearchRequest, ShardingOptions, read_sharded_gallery

TOP = 10


def _runtimes(work: Path) -> dict[int, Any]:
    from itmrt.runtime import load

    from bench_flickr_size import prepare_bundle

    bundle = prepare_bundle(work / "released")[0]
    return {threads: load(bundle, threads=threads, warn=lambda message: None) for threads in (1, 2)}


def _queries(world: Any, images: int, built: int, args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The recall queries and the one-caption latency queries, each made from one image of the ``built``
    first (the same draw as ``synthetic`` makes for ``images``, kept to the images built)."""
    import object_data

    draw = np.random.default_rng(images).choice(images, size=4 * (args.queries + args.latency_queries),
                                                replace=False)
    targets = draw[draw < built][: args.queries + args.latency_queries]
    batch = object_data.captions_for(world, targets[: args.queries])
    latency = object_data.captions_for(world, targets[args.queries :])
    return batch, [latency.take([q]) for q in range(len(latency))]


def build(runtime: Any, out: Path, args: argparse.Namespace, world: Any) -> dict[str, Any]:
    """Generate and index the gallery shard by shard; the timings."""
    import object_data

    from itmrt.runtime.given_embeddings import check_given_embeddings
    from itmrt.scale.writer import ShardedWriter

    per_shard = -(-args.images // args.shards)
    depth = int(runtime.bundle.manifest.dims["embed_size"])
    spec = IndexSpec("regions", regions_storage="compact")
    timing: dict[str, float] = {"generate": 0.0, "check": 0.0, "store_and_index": 0.0, "commit": 0.0}
    shards: list[dict[str, Any]] = []
    started = time.perf_counter()
    with ShardedWriter(out, runtime.bundle, ShardingOptions(per_shard, "float16", spec), overwrite=True) as writer:
        for first in range(0, args.images, per_shard):
            if args.max_build_seconds and time.perf_counter() - started > args.max_build_seconds:
                print(f"  --max-build-seconds {args.max_build_seconds} reached: stopping at {first:,} images",
                      flush=True)
                break
            clock = time.perf_counter()
            chunk = np.empty((min(per_shard, args.images - first), object_data.REGIONS, depth), dtype=np.float16)
            object_data.fill_regions(world, first, chunk)
            timing["generate"] += time.perf_counter() - clock
            clock = time.perf_counter()
            check_given_embeddings(chunk, runtime.bundle, "generated embeddings")
            timing["check"] += time.perf_counter() - clock
            clock = time.perf_counter()
            record = writer.add(lambda folder, chunk=chunk: runtime.store_embeddings(
                chunk, folder, source="bench_region_index large", dtype="float16", checked=True,
                store=writer.shard_store()))
            timing["store_and_index"] += time.perf_counter() - clock
            del chunk
            assert record is not None
            document = json.loads((writer.staging / record.name / "gallery.json").read_text())["region_index"]
            shards.append({"name": record.name, "images": record.images, "fit": document["fit"],
                           "build_seconds": document["build_seconds"],
                           "stages": document["params"]["stage_seconds"],
                           "load": os.getloadavg()[0]})
            print(f"  {record.name}: {record.images:,} images, {shards[-1]}, "
                  f"{time.perf_counter() - started:.0f} s so far", flush=True)
        clock = time.perf_counter()
        writer.commit()
        timing["commit"] = time.perf_counter() - clock
    stages: dict[str, float] = {}
    for shard in shards:
        for stage, seconds in shard["stages"].items():
            stages[stage] = round(stages.get(stage, 0.0) + seconds, 1)
    built = sum(shard["images"] for shard in shards)
    return {"images_built": built, "shards_built": len(shards), "per_shard": per_shard,
            "build_seconds": round(timing["check"] + timing["store_and_index"] + timing["commit"], 1),
            "generate_seconds": round(timing["generate"], 1),
            "seconds": {key: round(value, 1) for key, value in timing.items()},
            "index_stage_seconds": stages, "shards": shards}


def settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The sweep: every K x refine x prefilter x budget x rescore (None: the shards' recorded value or default)."""
    return [{"K": k, "refine": refine, "prefilter": prefilter, "budget": budget, "rescore": rescore}
            for k in args.sweep_k for refine in args.large_refine for prefilter in args.sweep_prefilter
            for budget in args.sweep_budget for rescore in args.sweep_rescore]


def setting_name(row: dict[str, Any]) -> str:
    return f"K {row['K']}" + "".join(f", {key} {row[key]}" for key in ("refine", "prefilter", "budget", "rescore")
                                     if row.get(key) is not None)


def measure(runtimes: dict[int, Any], out: Path, batch: Any, singles: list[Any], args: argparse.Namespace
            ) -> dict[str, Any]:
    from bench_region_index import folder_bytes, memory_mb, timed_queries

    gallery = read_sharded_gallery(out)
    opened = {threads: LocalShards(runtime, gallery) for threads, runtime in runtimes.items()
              if threads in args.large_threads}  # each opening holds the shards' compact files in memory
    rows = []
    for setting in settings(args):
        k = setting["K"]
        request = SearchRequest(k=TOP, shortlist=k, refine=setting["refine"], prefilter=setting["prefilter"],
                                budget=setting["budget"], rescore=setting["rescore"])
        started = time.perf_counter()
        found = next(iter(opened.values())).search(batch, request)
        row: dict[str, Any] = {**setting, "indices": found.t2i.indices.tolist(),
                               "ms_per_query_batched": round(1000 * (time.perf_counter() - started) / len(batch), 1),
                               "stage_ms": {s: round(1000 * v / len(batch), 1)
                                            for s, v in found.stage_seconds.items()}}
        for threads, shards in opened.items():
            row[f"{threads}_threads"] = timed_queries(shards.search, singles, request)
        print(f"  {setting_name(row)}: { {key: value for key, value in row.items() if key != 'indices'} }",
              flush=True)
        rows.append(row)
    return {"sweep": rows, "disk_bytes_per_image": round(folder_bytes(out) / len(gallery)),
            "rss_mb": memory_mb(), "load_after": os.getloadavg()}


def exhaustive(runtimes: dict[int, Any], out: Path, batch: Any, results: dict[str, Any], count: int
               ) -> dict[str, Any]:
    """Exhaustive scoring of the first ``count`` recall queries on the decompressed vectors; each K's recall."""
    from bench_region_index import overlap

    few = batch.take(list(range(min(count, len(batch)))))
    shards = LocalShards(runtimes[2], read_sharded_gallery(out))
    started = time.perf_counter()
    reference = shards.search(few, SearchRequest(k=TOP)).t2i.indices
    seconds = time.perf_counter() - started
    recall = {setting_name(row): overlap(np.array(row["indices"])[: len(few)], reference)
              for row in results.get("sweep", [])
              if results.get("queries") == len(batch) and len(row["indices"]) >= len(few)}  # the same queries
    return {"queries": len(few), "exhaustive_decoded_s_per_query": round(seconds / len(few), 1),
            "reference": reference.tolist(), "recall": recall, "load_after": os.getloadavg()}


def built_results(path: Path, out: Path) -> dict[str, Any]:
    """The build run's results, or, for a gallery put together otherwise (no results file), its size."""
    if path.is_file():
        return dict(json.loads(path.read_text()))
    gallery = read_sharded_gallery(out)
    return {"images": len(gallery), "shards": len(gallery.shards), "images_built": len(gallery),
            "shards_built": len(gallery.shards), "per_shard": gallery.shards[0].images,
            "build_seconds": "-", "generate_seconds": "-", "seconds": {}, "index_stage_seconds": {}}


def run_large(args: argparse.Namespace) -> dict[str, Any]:
    """``--source DIR``: the bundle, gallery and build results of an earlier run in DIR, only read (results are
    written in ``--work``); the exhaustive reference of ``--exhaustive`` is saved in ``--work`` and reused by
    later runs there (each setting's recall against it)."""
    import object_data

    source = args.source or args.work
    runtimes = _runtimes(source)
    world = object_data.make_world(int(runtimes[1].bundle.manifest.dims["embed_size"]))
    out = source / f"gallery-large-{args.images}"
    path = args.work / f"results-large-{args.images}.json"
    built_path = path if path.is_file() or args.source is None else source / path.name
    reference_path = args.work / f"reference-large-{args.images}.json"
    if args.exhaustive:
        results = built_results(built_path, out)
        batch, _ = _queries(world, args.images, results["images_built"], args)
        results["exhaustive"] = exhaustive(runtimes, out, batch, results, args.exhaustive)
        reference_path.write_text(json.dumps(results["exhaustive"]) + "\n")
        print(f"  exhaustive: { {k: v for k, v in results['exhaustive'].items() if k != 'reference'} }", flush=True)
    else:
        if args.reuse and (out / "gallery.json").is_file():  # measure again on the gallery built before
            results = {key: value for key, value in built_results(built_path, out).items()
                       if key not in ("sweep", "exhaustive")}
        else:
            results = {"images": args.images, "shards": args.shards, "load_before": os.getloadavg(),
                       **build(runtimes[1], out, args, world)}
        path.write_text(json.dumps(results, indent=2) + "\n")
        batch, singles = _queries(world, args.images, results["images_built"], args)
        results.update(queries=len(batch), latency_queries=len(singles),
                       **measure(runtimes, out, batch, singles, args))
        if reference_path.is_file():  # the reference of an earlier --exhaustive run here: every setting's recall
            from bench_region_index import overlap

            kept = json.loads(reference_path.read_text())
            reference = np.array(kept["reference"])
            kept["recall"] = {setting_name(row): overlap(np.array(row["indices"])[: len(reference)], reference)
                              for row in results["sweep"]}
            results["exhaustive"] = kept
    path.write_text(json.dumps(results, indent=2) + "\n")
    print_large(results)
    return results


def print_large(results: dict[str, Any]) -> None:
    from bench_region_index import overlap

    built = results["images_built"]
    print(f"\n{built:,} images ({results['shards_built']} shards of {results['per_shard']:,}), compact storage; "
          f"build {results['build_seconds']} s (generation apart: {results['generate_seconds']} s); "
          f"{results.get('disk_bytes_per_image', '?')} bytes/image on disk; RSS {results.get('rss_mb')}\n")
    print(f"build seconds: {results['seconds']}; region index stages (summed over shards): "
          f"{results['index_stage_seconds']}\n")
    recall = results.get("exhaustive", {}).get("recall", {})
    print("| setting (per shard) | p50 / p99 ms, 1 thread (stages p50) | p50 / p99 ms, 2 threads | ms/query batched "
          "| recall@10 | top-1 same | top 10 as the first setting's |")
    print("|---|---|---|---|---|---|---|")
    sweep = results.get("sweep", [])
    for row in sweep:
        none = {"p50_ms": "-", "p99_ms": "-"}
        one, two = row.get("1_threads", none), row.get("2_threads", none)
        found = recall.get(setting_name(row), {})
        agree = overlap(np.array(row["indices"]), np.array(sweep[0]["indices"]))["recall_at_10"]
        print(f"| {setting_name(row)} | {one['p50_ms']} / {one['p99_ms']} ({one.get('stage_p50_ms')}) | "
              f"{two['p50_ms']} / {two['p99_ms']} | {row['ms_per_query_batched']} | "
              f"{found.get('recall_at_10', '-')} | {found.get('top1_same', '-')} | {agree} |")
