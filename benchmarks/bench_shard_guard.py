"""What keeping a served sharded gallery safe from changed files costs (``itmrt serve --copy-shards-mb``;
docs/serving-faults.md): shards copied into memory, shards read from their files by position (the service's
way over the budget: a truncated file is an error, never SIGBUS), against the memory map it replaced (checked
before each search; a truncation during the search still ends the process).

For a sharded gallery of the shipped small NAAF (random image features), each mode runs in a fresh process
(the page cache warm, as after a first start), alternately ``--repeats`` times:

- open: seconds for opening the shards (verifying every file's sha256 either way; copied: into memory too);
- RSS after opening and after the searches: anonymous (not evictable, not shared) and file-backed, MB;
- check: microseconds for one check of every file read while searching (each search adds two, each health
  probe one);
- search: milliseconds of one search of 1 and of 32 captions with full scoring, and of one caption with a
  shortlist of 50 per shard.

    python benchmarks/bench_shard_guard.py --images 8000 --shard-images 2000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import small_gallery  # noqa: E402


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def child(gallery: str, copy_mb: float, reads: str, queries: int) -> dict[str, float]:
    from itmrt.runtime import load
    from itmrt.scale import SearchRequest
    from itmrt.scale.layout import read_sharded_gallery
    from itmrt.scale.local import LocalShards

    sharded = read_sharded_gallery(gallery)
    runtime = load(sharded.bundle_path, threads=1, scorer="graph", warn=lambda _m: None)
    before = memory_mb()
    started = time.perf_counter()
    shards = LocalShards(runtime, sharded, copy_mb=copy_mb, positional=reads == "positional")
    opened = time.perf_counter() - started
    after = memory_mb()
    check = shards.files_changed
    started = time.perf_counter()
    for _ in range(1000):
        assert check() is None
    check_us = (time.perf_counter() - started) / 1000 * 1e6
    one = shards.runtime.encode_captions(["a man riding a horse"])
    many = shards.runtime.encode_captions([f"a man riding a horse number {n % 10}" for n in range(32)])
    timings = {}
    for name, captions, request in (("full", one, SearchRequest(k=10)), ("full32", many, SearchRequest(k=10)),
                                    ("shortlist", one, SearchRequest(k=10, shortlist=50))):
        shards.search(captions, request)  # warm
        started = time.perf_counter()
        for _ in range(queries):
            shards.search(captions, request)
        timings[name] = (time.perf_counter() - started) / queries * 1000
    searched = memory_mb()
    return {"in_memory": float(shards.in_memory), "open_s": opened,
            "anon_mb": after["RssAnon"] - before["RssAnon"], "file_mb": after["RssFile"] - before["RssFile"],
            "anon_searched_mb": searched["RssAnon"] - before["RssAnon"],
            "file_searched_mb": searched["RssFile"] - before["RssFile"],
            "check_us": check_us, "full_ms": timings["full"], "full32_ms": timings["full32"],
            "shortlist_ms": timings["shortlist"],
            "mapped_files": float(sum(len(s.guard) if s.guard else 0 for s in shards.shards))}


def make_gallery(work: Path, images: int, shard_images: int) -> Path:
    from itmrt.runtime import load
    from itmrt.scale import ShardingOptions, index_sharded

    small_gallery(work / "small")
    bundle = work / "small" / "bundle"
    out = work / f"sharded-{images}-{shard_images}"
    if not (out / "gallery.json").is_file():
        runtime = load(bundle, scorer="graph")
        shape = [axis if isinstance(axis, int) else 36 for axis in runtime.image_input_shape[1:]]
        features = np.abs(np.random.default_rng(0).standard_normal((images, *shape))).astype(np.float32)
        index_sharded(runtime, features, out, ShardingOptions(shard_images=shard_images))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_shard_guard"))
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--shard-images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("GALLERY", "COPY_MB", "READS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]), args.child[2], args.queries)))
        return
    gallery = make_gallery(args.work, args.images, args.shard_images)
    size = sum(f.stat().st_size for f in gallery.rglob("*") if f.is_file()) / (1 << 20)
    print(f"gallery: {args.images} images in shards of {args.shard_images}, {size:.1f} MB on disk")
    rows = []
    for repeat in range(args.repeats):
        for mode, copy_mb, reads in (("positional", 0.0, "positional"), ("mapped", 0.0, "map"),
                                     ("copied", 1e6, "positional")):
            out = subprocess.run([sys.executable, __file__, "--child", str(gallery), str(copy_mb), reads,
                                  "--queries", str(args.queries)], capture_output=True, text=True, check=True)
            rows.append((mode, repeat, json.loads(out.stdout.strip().splitlines()[-1])))
    print("| mode | run | open s | RSS anon/file MB opened | RSS anon/file MB searched | files checked | check us | "
          "full 1 caption ms | full 32 captions ms | shortlist ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, repeat, r in rows:
        print(f"| {mode} | {repeat + 1} | {r['open_s']:.3f} | {r['anon_mb']:+.1f} / {r['file_mb']:+.1f} | "
              f"{r['anon_searched_mb']:+.1f} / {r['file_searched_mb']:+.1f} | {r['mapped_files']:.0f} | "
              f"{r['check_us']:.1f} | {r['full_ms']:.1f} | {r['full32_ms']:.1f} | {r['shortlist_ms']:.2f} |")


if __name__ == "__main__":
    main()
