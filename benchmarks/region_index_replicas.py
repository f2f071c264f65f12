"""A large sharded gallery made of copies of a smaller one's shards, for latency at a size the build cannot reach
in the time at hand.

    python benchmarks/region_index_replicas.py SOURCE_GALLERY WORK --copies 5
    python benchmarks/bench_region_index.py large --images 1000000 --shards 20 --reuse --work WORK

The source (a gallery ``bench_region_index.py large`` built, e.g. 200K images in 4 shards of 50K) is copied
shard folder by shard folder (real copies, not links, so the page cache holds as many bytes as a gallery of
distinct images would) until the new gallery holds ``copies`` times its images: shard ``i`` of the new
gallery is a copy of shard ``i mod S`` of the source. The gallery document lists the copies with their own
positions, so image ``j`` answers as ``j``, and every shard's files keep their recorded sha256.

What such a gallery measures honestly: the work one query does per shard (probing, estimating, reranking) and
the memory and page-cache pressure of the full size; that work depends on each shard's size and its data's
distribution, which copies share with distinct shards of the same generator. What it does not measure: recall
against exhaustive scoring (every image has ``copies - 1`` twins, so the top 10 is full of ties) and build
time. ``results-large-<N>.json`` records ``replicas`` so that the tables say what the gallery was; the
queries are drawn from the source's images (``images_built`` = the source's count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def replicate(source: Path, out: Path, copies: int) -> dict[str, Any]:
    """Write ``out`` (a new folder): ``copies`` times ``source``'s shards and its gallery document."""
    document = json.loads((source / "gallery.json").read_text())
    shards, first = [], 0
    out.mkdir(parents=True)
    for copy in range(copies):
        for shard in document["shards"]:
            name = f"shard-{len(shards):05d}"
            shutil.copytree(source / shard["name"], out / name)
            shards.append({**shard, "name": name, "first": first})
            first += shard["images"]
            print(f"  {name}: copy {copy + 1} of {shard['name']}", flush=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / "gallery.json").write_text(json.dumps({**document, "shards": shards, "images": first,
                                                  "created": now, "updated": now}, indent=2) + "\n")
    return {"images": first, "shards": len(shards), "distinct_images": document["images"],
            "distinct_shards": len(document["shards"]), "copies": copies, "source": str(source)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a sharded gallery built by bench_region_index.py large")
    parser.add_argument("work", type=Path, help="the --work folder of the later `large --reuse` run")
    parser.add_argument("--copies", type=int, default=5)
    args = parser.parse_args()
    source_images = json.loads((args.source / "gallery.json").read_text())["images"]
    source_results = args.source.parent / f"results-large-{source_images}.json"
    started = time.perf_counter()
    replicas = replicate(args.source, args.work / "gallery-large-PENDING", args.copies)
    out = args.work / f"gallery-large-{replicas['images']}"
    (args.work / "gallery-large-PENDING").rename(out)
    per_shard = max(shard["images"] for shard in json.loads((out / "gallery.json").read_text())["shards"])
    built = json.loads(source_results.read_text()) if source_results.is_file() else {}
    results = {"images": replicas["images"], "shards": replicas["shards"], "images_built": replicas["distinct_images"],
               "shards_built": replicas["shards"], "per_shard": per_shard,
               "build_seconds": built.get("build_seconds", "not measured (copies)"),
               "generate_seconds": built.get("generate_seconds", "-"), "seconds": built.get("seconds", {}),
               "index_stage_seconds": built.get("index_stage_seconds", {}),
               "replicas": {**replicas, "copy_seconds": round(time.perf_counter() - started, 1)}}
    (args.work / f"results-large-{replicas['images']}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}: {replicas['images']:,} images in {replicas['shards']} shards "
          f"({args.copies} copies of {replicas['distinct_images']:,})")


if __name__ == "__main__":
    main()
