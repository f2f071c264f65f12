"""How long `itmrt serve` takes to answer ``/v2/health/live`` while it scores: is the event loop kept waiting?

    python benchmarks/bench_serve_health.py [--work /tmp/itmrt-serve-health] [--seconds 10] [--tree TREE]...

The service answers health probes on its event loop while its worker thread
scores. Whatever the worker does while holding the interpreter lock (numpy
calls between their inner loops, a numba kernel compiled without ``nogil``)
delays the probe. One ``itmrt serve`` on 127.0.0.1 over ``bench_serve.py``'s
released-size 1000-image gallery (built there first if missing), per source
tree (this one, and each ``--tree``: ``git archive COMMIT | tar -x -C TREE``),
the trees taking turns, for two loads:

* ``one caption``: 2 clients sending one-caption requests back to back (the
  one-caption scorer);
* ``32 captions``: 1 client sending 32-caption requests with
  ``--unit-captions 32 --max-batch-captions 32`` (more than a few captions: the
  fused scorer, where numba is installed).

Meanwhile a probe sends ``GET /v2/health/live`` every 20 ms on one kept-alive
connection. The table: the probe's p50 / p99 / max, and the requests answered.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import REPO, Server, released_gallery  # noqa: E402

LOADS = {"one caption": (2, 1, []), "32 captions": (1, 32, ["--unit-captions", "32", "--max-batch-captions", "32"])}


def start(tree: Path, name: str, gallery: Path, log: Path, flags: list[str]) -> Server:
    command = [sys.executable, "-m", "itmrt", "serve", str(gallery), "--host", "127.0.0.1", "--port", "0", *flags]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=tree, env=env)
    return Server(name, process, log)


def probe_while_loaded(url: str, captions: list[str], clients: int, per_request: int,
                       seconds: float) -> dict[str, Any]:
    from itmrt.serve.client import ServiceClient, ServiceError

    stop = time.monotonic() + seconds
    answered = [0] * clients

    def client_loop(number: int) -> None:
        rng = np.random.default_rng(number)
        with ServiceClient(url, timeout_s=60) as client:
            while time.monotonic() < stop:
                picked = [captions[int(i)] for i in rng.integers(len(captions), size=per_request)]
                try:
                    client.search(picked, 10)
                    answered[number] += 1
                except ServiceError:  # a refusal (429) is an answer too, not one of the requests counted
                    time.sleep(0.01)

    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    latencies = []
    with ServiceClient(url, timeout_s=10) as probe:
        time.sleep(0.5)  # the clients under way
        while time.monotonic() < stop:
            started = time.perf_counter()
            status = probe.request("GET", "/v2/health/live")[0]
            latencies.append(1000 * (time.perf_counter() - started))
            if status != 200:
                raise SystemExit(f"/v2/health/live answered {status}")
            time.sleep(0.02)
    for thread in threads:
        thread.join(120)
    ordered = sorted(latencies)
    return {"probes": len(ordered), "p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 2), "max_ms": round(ordered[-1], 2),
            "requests_per_s": round(sum(answered) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/itmrt-serve-health"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tree", type=Path, action="append", default=[], help="another source tree to compare")
    parser.add_argument("--rounds", type=int, default=1, help="turns of every tree per load")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    gallery, captions = released_gallery(args.work / "released", 1000)
    trees = {"this tree": REPO, **{str(tree): tree.resolve() for tree in args.tree}}
    print(f"load average at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    rows = []
    for load, (clients, per_request, flags) in LOADS.items():
        for turn in range(args.rounds):
            for name, tree in trees.items():
                server = start(tree, name, gallery, args.work / f"serve-{len(rows)}.log", flags)
                try:
                    server.wait_ready()
                    result = probe_while_loaded(server.url, captions, clients, per_request, args.seconds)
                finally:
                    server.stop()
                rows.append((load, name, turn, result))
                print(f"  {load}, {name}, turn {turn}: {result}", flush=True)
    print("\n| load | tree | turn | health p50 / p99 / max ms | probes | requests/s |\n|---|---|---|---|---|---|")
    for load, name, turn, r in rows:
        print(f"| {load} | {name} | {turn} | {r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} | {r['probes']} | "
              f"{r['requests_per_s']} |")
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
