"""Compact storage's packed residuals read by position (the default) against copied into memory, in one run.

    python benchmarks/region_index_residuals.py R1 --images 1000000 --distinct 200000

``R1``: the ``--work`` folder of a ``bench_region_index.py large`` run (or of ``region_index_replicas.py``),
holding ``gallery-large-<images>`` and the bundle in ``released/``. The gallery is opened three times, one
after the other (by position, copied with ``copy_mb`` past its size, by position again), each time with the
2-thread runtime; each opening answers the same one-caption queries (drawn from the first ``--distinct``
images, as ``large`` draws them) at the recorded refine and at ``--refine``, and reports p50 / p99 ms, the
stages, the time to open and the process's RSS.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import object_data
from bench_region_index import memory_mb, timed_queries
from region_index_large import _queries, _runtimes

from itmrt.scale import LocalShards, SearchRequest, read_sharded_gallery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=200_000, help="images the queries are drawn from")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--refine", type=int, default=256)
    args = parser.parse_args()
    runtime = _runtimes(args.work)[2]
    world = object_data.make_world(int(runtime.bundle.manifest.dims["embed_size"]))
    # the draw of `large` with its default 10 recall queries: the latency queries are the same ones it times
    _batch, singles = _queries(world, args.images, args.distinct,
                               argparse.Namespace(queries=10, latency_queries=args.queries))
    gallery = read_sharded_gallery(args.work / f"gallery-large-{args.images}")
    print(f"{len(singles)} queries; load {os.getloadavg()[0]:.1f}", flush=True)
    for label, copy_mb in (("by position", 0.0), ("copied into memory", 1e9), ("by position, again", 0.0)):
        started = time.perf_counter()
        shards = LocalShards(runtime, gallery, copy_mb=copy_mb)
        opened = time.perf_counter() - started
        try:
            for refine in (None, args.refine):
                timed = timed_queries(shards.search, singles,
                                      SearchRequest(k=10, shortlist=10, refine=refine, prefilter=2048))
                print(f"| {label} | refine {refine or 'recorded'} | {timed['p50_ms']} / {timed['p99_ms']} | "
                      f"{timed['stage_p50_ms']} | {opened:.1f} s | {memory_mb()} | load {os.getloadavg()[0]:.1f} |",
                      flush=True)
        finally:
            shards.close()


if __name__ == "__main__":
    main()
