"""Sharded galleries at scale: disk and memory, index build time, query latency and recall, 1 against 2 Ray workers.

    python benchmarks/bench_gallery_scale.py [--sizes 10000,100000] [--shards 2] [--work /tmp/itmrt-gallery-scale]
        [--recall-queries 20] [--latency-queries 10] [--full-queries 3] [--keep] [--reuse] [--no-ray]

For each size a sharded gallery of synthetic region embeddings at the released
sizes (36 regions x d 1024, ``scale_data``) is written with float16 storage
through :class:`itmrt.scale.ShardedWriter` (``--shards`` shards, each with its
global vectors and a flat FAISS index; ``--keep`` keeps it and ``--reuse``
searches a kept one of the same bundle and size), then one IVF and one HNSW
index are built from each shard's vectors and each searched with two settings
(IVF ``nprobe`` 16 and 64, HNSW ``efSearch`` 64 and 256). The model is a NAAF at the released sizes with
random weights (``bench_flickr_size.prepare_bundle``); queries are known-item
queries (8-20 token embeddings made from one gallery image, ``scale_data``).

Measured, one query (one caption) at a time unless said otherwise:

- disk (embeddings, global vectors, each index) and this process's memory
  (anonymous, and file-backed: the memory-mapped shards) after searching;
- index build time per kind (all shards);
- latency of exact full scoring, and of shortlist (K per shard) + rerank with
  the flat, IVF and HNSW indexes; the shortlist stage alone;
- recall: on ``--recall-queries`` queries, the share of exact full scoring's
  top 10 each method finds (and whether its top 1 is the same), and how often
  the query's own image comes first / in the top 10;
- Ray (a local instance): the same gallery on 1 worker and on 2 workers (1
  CPU and ``--threads`` threads each), full scoring and flat shortlist.

Latencies of the methods (and of the two Ray set-ups) are measured taking
turns query by query, so a busy machine slows them alike; exact full scoring
is timed on the first ``--full-queries`` queries only. Each size's tables are
printed, and ``results.json`` in ``--work`` rewritten, as soon as it is measured.

Every gallery is deleted at the end unless ``--keep``. Free disk is checked
first: 100K images take 7.4 GB in float16.
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
from itmrt.scale import (
    IndexSpec,
    LocalShards,
    RayOptions,
    RayShards,
    SearchRequest,
    ShardedWriter,
    ShardingOptions,
    read_sharded_gallery,
)
from itmrt.scale.index import ShortlistIndex, build_index, faiss_module

from scale_data import REGIONS, fill_regions, known_item_queries, make_space

TOP = 10


def memory_mb(pid: str = "self") -> dict[str, float]:
    """Resident memory of a process from /proc: anonymous and file-backed (memory-mapped files), MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def folder_mb(folder: Path, pattern: str) -> float:
    return round(sum(p.stat().st_size for p in folder.glob(pattern)) / 2**20, 1)


# -- building ------------------------------------------------------------------------


def build_gallery(runtime: Any, out: Path, images: int, shards: int, space: Any) -> dict[str, Any]:
    """A float16 sharded gallery of ``images`` synthetic images in ``shards`` shards, with flat indexes."""
    from itmrt.runtime.gallery import write_gallery

    depth = int(runtime.bundle.manifest.dims["embed_size"])
    per_shard = -(-images // shards)
    started = time.perf_counter()
    options = ShardingOptions(per_shard, "float16", IndexSpec("flat"))
    with ShardedWriter(out, runtime.bundle, options, overwrite=True) as writer:
        for first in range(0, images, per_shard):
            rows = min(per_shard, images - first)

            def write(folder: Path, first: int = first, rows: int = rows) -> Any:
                def fill(array: np.ndarray) -> None:
                    fill_regions(space, first, array)

                return write_gallery(folder, runtime.bundle, fill, (rows, REGIONS, depth),
                                     {"source": "bench_gallery_scale synthetic"}, dtype="float16")

            writer.add(write)
        gallery = writer.commit()
    return {"seconds": time.perf_counter() - started, "gallery": gallery,
            "disk_mb": {"embeddings": folder_mb(out, "shard-*/image_embeddings.npy"),
                        "global_vectors": folder_mb(out, "shard-*/global_vectors.npy"),
                        "flat": folder_mb(out, "shard-*/shortlist.faiss")}}


def approximate_indexes(shards: LocalShards, kinds: dict[str, tuple[IndexSpec, list[dict[str, Any]]]]
                        ) -> dict[str, Any]:
    """Each kind's index built once per shard (from the shard's vectors), searched with each of its parameter
    sets (``nprobe``/``efSearch`` are search-time settings): name -> indexes, build seconds, size, parameters."""
    built: dict[str, Any] = {}
    for kind, (spec, searches) in kinds.items():
        loaded, seconds, size = [], 0.0, 0
        for shard in shards.shards:
            raw, record = build_index(np.asarray(shard.vectors), spec)
            seconds += record["build_seconds"]
            size += len(raw)
            loaded.append((faiss_module().deserialize_index(np.frombuffer(raw, dtype=np.uint8)), record))
        for search in searches:
            indexes = [ShortlistIndex(index, {**record, "params": {**record["params"], **search}})
                       for index, record in loaded]
            params = indexes[0].record["params"]
            name = (f"IVF {params['ivf_lists']} lists, probe {params['ivf_probe']}" if kind == "ivf" else
                    f"HNSW M {params['hnsw_m']}, efC {params['hnsw_ef_construction']}, ef {params['hnsw_ef_search']}")
            built[name] = {"kind": kind, "indexes": indexes, "build_seconds": round(seconds, 2),
                           "mb": round(size / 2**20, 1)}
    return built


# -- measuring -------------------------------------------------------------------------


def interleaved_ms(searches: dict[Any, tuple[Any, SearchRequest]], queries: list[CaptionEmbeddings],
                   slow: set[Any], slow_queries: int) -> dict[Any, dict[str, float]]:
    """Median and max milliseconds per single-caption query of each named ``(search, request)``, the methods taking
    turns query by query (one untimed call each first); those in ``slow`` on the first ``slow_queries`` only."""
    times: dict[Any, list[float]] = {name: [] for name in searches}
    for _name, (search, request) in searches.items():
        search(queries[0], request)
    for number, query in enumerate(queries):
        for name, (search, request) in searches.items():
            if name in slow and number >= slow_queries:
                continue
            started = time.perf_counter()
            search(query, request)
            times[name].append(1000 * (time.perf_counter() - started))
    return {name: {"median_ms": round(statistics.median(t), 1), "max_ms": round(max(t), 1)}
            for name, t in times.items()}


def recall(found: np.ndarray, exact: np.ndarray, own: np.ndarray) -> dict[str, float]:
    return {
        "recall_at_10": round(float(np.mean([len(set(a) & set(b)) / TOP for a, b in zip(found, exact)])), 3),
        "top1_same": round(float(np.mean(found[:, 0] == exact[:, 0])), 3),
        "own_r1": round(100 * float(np.mean(found[:, 0] == own)), 1),
        "own_r10": round(100 * float(np.mean((found == own[:, None]).any(axis=1))), 1),
    }


def shortlist_stage_ms(shards: LocalShards, queries: list[CaptionEmbeddings], shortlist: int) -> float:
    """Median milliseconds of the shortlist stage alone (global vector + every shard's index search), 1 query."""
    from itmrt.runtime.shortlist import caption_global_vectors

    times = []
    for query in queries:
        started = time.perf_counter()
        vector = caption_global_vectors(query)
        for shard in shards.shards:
            shard.candidates(vector, shortlist)
        times.append(1000 * (time.perf_counter() - started))
    return round(statistics.median(times), 2)


class IndexedShards:
    """The shards searched with one set of shortlist indexes (swapped in for each call)."""

    def __init__(self, shards: LocalShards, indexes: list[Any]) -> None:
        self.shards, self.indexes = shards, indexes

    def search(self, captions: CaptionEmbeddings, request: SearchRequest) -> Any:
        for shard, index in zip(self.shards.shards, self.indexes):
            shard.index = index
            if index is not None and index.kind == "ivf":  # several parameter sets share one IVF index
                index.index.nprobe = int(index.record["params"]["ivf_probe"])
        return self.shards.search(captions, request)


def methods(shards: LocalShards, built: dict[str, Any], batch: CaptionEmbeddings, singles: list[CaptionEmbeddings],
            own: np.ndarray, shortlist: int, full_queries: int) -> list[dict[str, Any]]:
    """Exact full scoring, then each index's shortlist + rerank: latency (taking turns) and recall against exact."""
    flat = IndexedShards(shards, [shard.index for shard in shards.shards])
    started = time.perf_counter()
    exact = flat.search(batch, SearchRequest(k=TOP)).t2i.indices
    batch_s = time.perf_counter() - started
    searchers = {"flat (exact inner product)": flat,
                 **{name: IndexedShards(shards, entry["indexes"]) for name, entry in built.items()}}
    label = {name: f"{name}: shortlist {shortlist}/shard + rerank" for name in searchers}
    timed: dict[str, tuple[Any, SearchRequest]] = {"exact": (flat.search, SearchRequest(k=TOP))}
    timed.update({name: (s.search, SearchRequest(k=TOP, shortlist=shortlist)) for name, s in searchers.items()})
    latency = interleaved_ms(timed, singles, slow={"exact"}, slow_queries=full_queries)
    rows = [{"method": "exact full scoring", **latency["exact"], **recall(exact, exact, own),
             "batch_pairs_per_s": round(len(batch) * len(shards) / batch_s)}]
    for name, searcher in searchers.items():
        found = searcher.search(batch, SearchRequest(k=TOP, shortlist=shortlist)).t2i.indices
        searcher.search(batch.take([0]), SearchRequest(k=TOP, shortlist=shortlist))  # its indexes in place
        rows.append({"method": label[name], **latency[name], **recall(found, exact, own),
                     "shortlist_stage_ms": shortlist_stage_ms(shards, singles, shortlist)})
    flat.search(batch.take([0]), SearchRequest(k=TOP, shortlist=shortlist))
    return rows


def ray_workers(runtime: Any, gallery: Any, singles: list[CaptionEmbeddings], shortlist: int,
                reference: LocalShards, threads: int, full_queries: int) -> list[dict[str, Any]]:
    """The same gallery on 1 Ray worker and on 2 workers, each worker 1 CPU and ``threads`` threads, taking turns
    query by query: latency of full scoring and of the flat shortlist + rerank; answers checked against one process."""
    import ray

    setups = {1: RayOptions(address="auto", workers=1, cpus=1.0), 2: RayOptions(address="auto", workers=2, cpus=1.0)}
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # room for both setups' actors at once
    opened: dict[int, RayShards] = {}
    try:
        for workers, options in setups.items():
            opened[workers] = RayShards(runtime, gallery, options, {"threads": threads})
            opened[workers].warmup(shortlist)
        requests = {"full": SearchRequest(k=TOP), "flat": SearchRequest(k=TOP, shortlist=shortlist)}
        timed = {(w, n): (opened[w].search, r) for w in opened for n, r in requests.items()}
        latency = interleaved_ms(timed, singles, slow={(w, "full") for w in opened}, slow_queries=full_queries)
        rows = []
        for workers, shards in opened.items():
            row: dict[str, Any] = {"workers": workers, "cpus_each": 1.0, "threads_each": threads}
            for name, request in requests.items():
                row[name] = latency[(workers, name)]
                got = shards.search(singles[0], request).t2i
                want = reference.search(singles[0], request).t2i
                row[f"{name}_same_as_one_process"] = bool(np.array_equal(got.indices, want.indices)
                                                          and np.array_equal(got.scores, want.scores))
            row["worker_memory_mb"] = [memory_mb(str(w["pid"])) for w in shards.workers]
            rows.append(row)
        return rows
    finally:
        for shards in opened.values():
            shards.close()
        ray.shutdown()


# -- the run ---------------------------------------------------------------------------


def open_or_build(runtime: Any, out: Path, images: int, args: argparse.Namespace, space: Any) -> dict[str, Any]:
    """The gallery at ``out``: reused with ``--reuse`` when it is this bundle's and holds ``images`` images in
    ``--shards`` shards (its shards are checked as every search opens them), else written anew."""
    from itmrt.errors import ItmrtError

    if args.reuse and (out / "gallery.json").is_file():
        try:
            gallery = read_sharded_gallery(out)
            gallery.check_bundle(runtime.bundle.manifest_sha256, runtime.bundle.path)
        except ItmrtError as exc:
            print(f"not reusing {out}: {exc}", file=sys.stderr)
        else:
            if len(gallery) == images and len(gallery.shards) == args.shards and gallery.dtype == "float16":
                return {"seconds": None, "gallery": gallery, "disk_mb": {
                    "embeddings": folder_mb(out, "shard-*/image_embeddings.npy"),
                    "global_vectors": folder_mb(out, "shard-*/global_vectors.npy"),
                    "flat": folder_mb(out, "shard-*/shortlist.faiss")}}
    return build_gallery(runtime, out, images, args.shards, space)


def run_size(runtime: Any, work: Path, images: int, args: argparse.Namespace, space: Any) -> dict[str, Any]:
    out = work / f"gallery-{images}"
    built_gallery = open_or_build(runtime, out, images, args, space)
    gallery = read_sharded_gallery(out)
    shards = LocalShards(runtime, gallery)
    lists = IndexSpec("ivf").lists_for(gallery.shards[0].images)
    probes = sorted({min(probe, lists) for probe in (16, 64)})
    kinds = {"ivf": (IndexSpec("ivf", ivf_lists=lists), [{"ivf_probe": probe} for probe in probes]),
             "hnsw": (IndexSpec("hnsw"), [{"hnsw_ef_search": ef} for ef in (64, 256)])}
    built = approximate_indexes(shards, kinds)
    rng = np.random.default_rng(images)
    targets = rng.choice(images, size=args.recall_queries, replace=False)
    batch = known_item_queries(space, targets)
    singles = [batch.take([q]) for q in range(min(args.latency_queries, len(batch)))]
    started = time.perf_counter()
    rows = methods(shards, built, batch, singles, targets, args.shortlist, args.full_queries)
    flat_seconds = sum(shard.index.record["build_seconds"] for shard in shards.shards if shard.index)
    seconds = built_gallery["seconds"]
    result = {"images": images, "shards": len(gallery.shards),
              "write_seconds": None if seconds is None else round(seconds, 1),
              "disk_mb": built_gallery["disk_mb"], "memory_mb": memory_mb(),
              "index_build_seconds": {"flat": round(flat_seconds, 2),
                                      **{v["kind"]: v["build_seconds"] for v in built.values()}},
              "index_mb": {"flat": built_gallery["disk_mb"]["flat"], **{v["kind"]: v["mb"] for v in built.values()}},
              "queries": {"recall": len(batch), "latency": len(singles), "full_scoring_timed": args.full_queries},
              "methods": rows, "methods_seconds": round(time.perf_counter() - started, 1)}
    if args.ray and images <= args.ray_max_images:
        result["ray"] = ray_workers(runtime, gallery, singles, args.shortlist, shards, args.threads,
                                    args.full_queries)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def print_tables(results: list[dict[str, Any]]) -> None:
    print("| images (shards) | disk MB: embeddings / vectors / flat index | RSS MB: anon / file | "
          "index build s: flat / IVF / HNSW |")
    print("|---|---|---|---|")
    for r in results:
        d, m, b = r["disk_mb"], r["memory_mb"], r["index_build_seconds"]
        approx = [v for k, v in b.items() if k != "flat"]
        print(f"| {r['images']:,} ({r['shards']}) | {d['embeddings']:,} / {d['global_vectors']:,} / {d['flat']:,} "
              f"| {m.get('RssAnon')} / {m.get('RssFile')} | {b['flat']} / {approx[0]} / {approx[-1]} |")
    print()
    print("| images | method | latency ms (median / max) | shortlist stage ms | recall@10 vs exact | "
          "top-1 = exact | own image R@1 / R@10 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for row in r["methods"]:
            print(f"| {r['images']:,} | {row['method']} | {row['median_ms']} / {row['max_ms']} "
                  f"| {row.get('shortlist_stage_ms', '-')} | {row['recall_at_10']} | {row['top1_same']} "
                  f"| {row['own_r1']} / {row['own_r10']} |")
    print()
    print("| images | Ray workers (1 CPU, threads each) | full scoring ms (median / max) | flat shortlist + rerank ms "
          "(median / max) | answers = one process |")
    print("|---|---|---|---|---|")
    for r in results:
        for row in r.get("ray", []):
            same = row["full_same_as_one_process"] and row["flat_same_as_one_process"]
            full, flat = row["full"], row["flat"]
            print(f"| {r['images']:,} | {row['workers']} ({row['threads_each']}) "
                  f"| {full['median_ms']} / {full['max_ms']} "
                  f"| {flat['median_ms']} / {flat['max_ms']} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--shortlist", type=int, default=100, help="K per shard")
    parser.add_argument("--recall-queries", type=int, default=20)
    parser.add_argument("--latency-queries", type=int, default=10)
    parser.add_argument("--full-queries", type=int, default=3, help="queries exact full scoring is timed on")
    parser.add_argument("--work", type=Path, default=Path("/tmp/itmrt-gallery-scale"))
    parser.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ray-max-images", type=int, default=10**9, help="run the Ray part on galleries up to this")
    parser.add_argument("--threads", type=int, default=1, help="threads of each runtime (one process, each worker)")
    parser.add_argument("--keep", action="store_true", help="keep the galleries")
    parser.add_argument("--reuse", action="store_true", help="search a kept gallery of the same bundle and size")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    args.work.mkdir(parents=True, exist_ok=True)
    needed = sum(sizes) * REGIONS * 1024 * 2 * 1.15 if args.keep else max(sizes) * REGIONS * 1024 * 2 * 1.15
    if not args.reuse and shutil.disk_usage(args.work).free < needed:
        sys.exit(f"error: {args.work} has {shutil.disk_usage(args.work).free / 2**30:.1f} GB free; "
                 f"the galleries need {needed / 2**30:.1f} GB")

    from itmrt.runtime import load

    from bench_flickr_size import prepare_bundle

    runtime = load(prepare_bundle(args.work / "released")[0], threads=args.threads, warn=lambda message: None)
    space = make_space(int(runtime.bundle.manifest.dims["embed_size"]))
    results = []
    for size in sizes:  # each size's tables as soon as it is measured
        results.append(run_size(runtime, args.work, size, args, space))
        print_tables(results[-1:])
        (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"details: {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
