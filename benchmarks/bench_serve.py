"""`itmrt serve` under load: closed-loop clients, dynamic batching against none, and an overload run.

    python benchmarks/bench_serve.py [--seconds 10] [--concurrency 1,4,16,64] [--work /tmp/itmrt-serve-bench]

Two galleries:

- ``released``: a NAAF with the released sizes (region features 36 x 2048,
  d = 1024, bi-GRU, word_dim 300; random weights: speed does not depend on
  training), made and exported by ``bench_flickr_size.prepare``, with 1000
  random images indexed into a gallery; queries are its random captions of 8
  to 20 tokens;
- ``small``: the shipped small NAAF (``itmrt/assets``) exported and its
  synthetic test split (200 images) indexed; queries are the split's captions.

For each gallery two servers run side by side on 127.0.0.1 (any free port):
``batched`` (``--max-batch-captions 64 --max-delay-ms 5``) and ``unbatched``
(``--max-batch-captions 1``). At each concurrency C, C client threads each send
one-caption requests (top 10) back to back for ``--seconds`` (at most
``--max-requests`` each); the two servers take turns at every concurrency, so
both see the same machine. The table gives requests/s, latency percentiles
seen by the clients, the mean batch the server formed (from its /metrics) and
the errors. Before timing, the same 16 captions sent concurrently to both
servers must get the same top-10 (batching must not change an answer).

The overload run starts a third server (batched, ``--max-queue
--overload-queue``) and sends it one-caption requests from 4 x queue-size
clients for ``--seconds``: every request must come back (200, or 429/503 at
once), none may hang past the client timeout, and the server's peak resident
memory (VmHWM) is reported beside its memory when idle.

All traffic goes to 127.0.0.1, bounded in time and count; every server is
stopped with SIGTERM at the end (its exit status is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]


# -- galleries ----------------------------------------------------------------------


def released_gallery(work: Path, n_images: int) -> tuple[Path, list[str]]:
    """The released-size NAAF's gallery of ``n_images`` random images, and random captions to query it with."""
    from itmrt.runtime import load

    from bench_flickr_size import prepare

    bundle, features, captions_path = prepare(work, n_images, 2000)
    gallery = work / "gallery"
    if not (gallery / "gallery.json").is_file():
        load(bundle, scorer="graph").index(np.load(features, mmap_mode="r"), gallery)
    return gallery, captions_path.read_text().splitlines()


def small_gallery(work: Path) -> tuple[Path, list[str]]:
    """The shipped small NAAF's gallery of its synthetic test split, and the split's captions."""
    from itmrt.data.precomp import PrecompSplit
    from itmrt.demo import SHIPPED_NAAF, shipped_model
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.runtime import load
    from itmrt.synthetic.region_features import make_synthetic_dataset
    from itmrt.train.recipes import SMALL_REGION_DATA

    checkpoint = shipped_model(SHIPPED_NAAF)
    if checkpoint is None:
        raise SystemExit(f"no shipped {SHIPPED_NAAF} in itmrt/assets; run `itmrt make-small-models` first")
    data = work / "data"
    if not (data / "vocab.json").is_file():
        make_synthetic_dataset(
            data, {"test": 200}, seed=SMALL_REGION_DATA["seed"], img_dim=SMALL_REGION_DATA["img_dim"]
        )
    split = PrecompSplit.open(data, "test")
    bundle, gallery = work / "bundle", work / "gallery"
    if not (bundle / "manifest.json").is_file():
        export_bundle(checkpoint, data / "vocab.json", bundle, ExportOptions())
    if not (gallery / "gallery.json").is_file():
        load(bundle, scorer="graph").index(split.images, gallery)
    return gallery, list(split.captions)


# -- servers ------------------------------------------------------------------------


@dataclass
class Server:
    """An ``itmrt serve`` subprocess on 127.0.0.1 and a free port; its log goes to a file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    @classmethod
    def start(cls, name: str, gallery: Path, log: Path, *flags: str) -> Server:
        command = [sys.executable, "-m", "itmrt", "serve", str(gallery), "--host", "127.0.0.1", "--port", "0", *flags]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with log.open("wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        return cls(name, process, log)

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            found = re.search(r"listening on (http://\S+?);", text)
            if found and "ready:" in text:
                self.url = found.group(1)
                return
            if self.process.poll() is not None:
                raise SystemExit(f"server {self.name} exited ({self.process.returncode}):\n{text[-2000:]}")
            time.sleep(0.2)
        raise SystemExit(f"server {self.name} was not ready within {timeout_s:.0f} s")

    def memory_mb(self) -> dict[str, float]:
        """Resident memory now and at its peak (Linux /proc)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = {key: float(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024 for key in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]
        return {"rss_mb": round(values["VmRSS"], 1), "peak_rss_mb": round(values["VmHWM"], 1)}

    def metrics(self) -> str:
        from itmrt.serve.client import ServiceClient

        with ServiceClient(self.url) as client:
            return client.request("GET", "/metrics")[2].decode()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def metric(text: str, name: str) -> float:
    """One sample's value on a Prometheus text page (``name`` with its labels, as written there)."""
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# -- load ---------------------------------------------------------------------------


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, status: str, latency: float | None = None) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if latency is not None:
            self.latencies.append(latency)


def closed_loop(
    url: str, captions: list[str], clients: int, seconds: float, max_requests: int, timeout_s: float
) -> LoadResult:
    """``clients`` threads, each sending one-caption requests back to back until time or count runs out."""
    from itmrt.errors import ItmrtError
    from itmrt.serve.client import ServiceClient, ServiceError

    result, lock = LoadResult(), threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client_loop(number: int) -> None:
        rng = np.random.default_rng(number)
        with ServiceClient(url, timeout_s=timeout_s) as client:
            barrier.wait()
            stop = time.monotonic() + seconds
            for _ in range(max_requests):
                if time.monotonic() >= stop:
                    break
                started = time.perf_counter()
                try:
                    client.search([captions[int(rng.integers(len(captions)))]], 10)
                    outcome, latency = "200", time.perf_counter() - started
                except ServiceError as exc:
                    outcome, latency = str(exc.status), None
                except ItmrtError as exc:
                    outcome, latency = ("timeout" if "timed out" in str(exc) else "connection"), None
                with lock:
                    result.add(outcome, latency)

    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(seconds + timeout_s + 60)
    result.seconds = time.perf_counter() - started
    if any(thread.is_alive() for thread in threads):
        result.add("hung")
    return result


def batch_sizes(before: str, after: str) -> dict[str, int]:
    """How many batches of each size (captions, by the histogram's buckets: "<=2" means 2) the server formed."""
    pattern = r'^itmrt_batch_captions_bucket\{le="([0-9.]+)"\} ([0-9.e+-]+)$'

    def cumulative(text: str) -> dict[float, float]:
        return {float(le): float(count) for le, count in re.findall(pattern, text, re.MULTILINE)}

    low, high = cumulative(before), cumulative(after)
    sizes, below = {}, 0.0
    for le in sorted(high):
        count = high[le] - low.get(le, 0.0) - below
        below += count
        if count:
            sizes[f"<={le:g}"] = int(count)
    return sizes


def stage_means(before: str, after: str) -> dict[str, float]:
    """The server's mean milliseconds per stage: queue wait per request, encode and score per batch."""
    means = {}
    for stage in ("queue_wait", "encode", "score"):
        name = f'itmrt_stage_seconds_{{}}{{{{stage="{stage}"}}}}'
        count = metric(after, name.format("count")) - metric(before, name.format("count"))
        total = metric(after, name.format("sum")) - metric(before, name.format("sum"))
        means[stage] = round(1000 * total / count, 1) if count else 0.0
    return means


def summarize(load: LoadResult, before: str, after: str) -> dict[str, Any]:
    answered = load.statuses.get("200", 0)
    batches = metric(after, "itmrt_batch_captions_count") - metric(before, "itmrt_batch_captions_count")
    batched = metric(after, "itmrt_batch_captions_sum") - metric(before, "itmrt_batch_captions_sum")
    p50, p90, p99 = (np.percentile(load.latencies, [50, 90, 99]) * 1000).tolist() if load.latencies else (0.0,) * 3
    return {
        "requests_per_s": round(answered / load.seconds, 2),
        "p50_ms": round(p50, 1),
        "p90_ms": round(p90, 1),
        "p99_ms": round(p99, 1),
        "mean_batch": round(batched / batches, 2) if batches else 0.0,
        "batches": batch_sizes(before, after),
        "server_ms": stage_means(before, after),
        "answered": answered,
        "errors": {k: v for k, v in load.statuses.items() if k != "200"},
    }


def same_answers(batched: Server, unbatched: Server, captions: list[str]) -> dict[str, Any]:
    """The same captions sent concurrently (one per request) to both servers: identical top-10?"""
    from concurrent.futures import ThreadPoolExecutor

    from itmrt.serve.client import ServiceClient

    def ask(url: str, caption: str) -> Any:
        with ServiceClient(url) as client:
            return client.search([caption], 10)

    with ThreadPoolExecutor(len(captions)) as pool:
        one = list(pool.map(lambda c: ask(batched.url, c), captions))
        two = list(pool.map(lambda c: ask(unbatched.url, c), captions))
    indices_equal = all(np.array_equal(a.indices, b.indices) for a, b in zip(one, two, strict=True))
    score_diff = max(float(np.abs(a.scores - b.scores).max()) for a, b in zip(one, two, strict=True))
    return {"captions": len(captions), "indices_equal": indices_equal, "max_score_diff": score_diff}


# -- runs ---------------------------------------------------------------------------


def compare(name: str, gallery: Path, captions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Batched and unbatched servers on one gallery, taking turns at every concurrency."""
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--max-delay-ms", str(args.max_delay_ms)]
    servers = {
        "batched": Server.start(
            f"{name}-batched", gallery, logs / f"{name}-batched.log", "--max-batch-captions", "64", *common
        ),
        "unbatched": Server.start(
            f"{name}-unbatched", gallery, logs / f"{name}-unbatched.log", "--max-batch-captions", "1", *common
        ),
    }
    rows: dict[str, Any] = {"check": None, "runs": {}, "exit_status": {}}
    try:
        for server in servers.values():
            server.wait_ready()
        rows["check"] = same_answers(servers["batched"], servers["unbatched"], captions[:16])
        print(f"{name}: batched and unbatched answers agree: {rows['check']}", flush=True)
        for clients in args.concurrency:
            for kind, server in servers.items():
                before = server.metrics()
                load = closed_loop(server.url, captions, clients, args.seconds, args.max_requests, args.client_timeout)
                rows["runs"][f"{kind}@{clients}"] = summary = summarize(load, before, server.metrics())
                print(f"{name} {kind:9s} c={clients:3d}: {summary}", flush=True)
        for kind, server in servers.items():
            rows[f"{kind}_memory"] = server.memory_mb()
    finally:
        for kind, server in servers.items():
            rows["exit_status"][kind] = server.stop()
    return rows


def overload(gallery: Path, captions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """4 x queue-size clients against a server with ``--max-queue args.overload_queue``."""
    log = args.work / "logs" / "overload.log"
    server = Server.start(
        "overload",
        gallery,
        log,
        "--max-queue",
        str(args.overload_queue),
        "--max-connections",
        str(8 * args.overload_queue),
    )
    result: dict[str, Any] = {}
    try:
        server.wait_ready()
        idle = server.memory_mb()
        before = server.metrics()
        clients = 4 * args.overload_queue
        load = closed_loop(server.url, captions, clients, args.seconds, args.max_requests, args.client_timeout)
        after = server.metrics()
        result = {
            "clients": clients,
            "queue": args.overload_queue,
            "idle_memory": idle,
            "memory": server.memory_mb(),
            **summarize(load, before, after),
            "server_counts": {
                o: metric(after, f'itmrt_requests_total{{outcome="{o}"}}')
                for o in ("ok", "queue_full", "unavailable", "timeout", "error")
            },
        }
    finally:
        result["exit_status"] = server.stop()
    print(f"overload: {result}", flush=True)
    return result


def print_table(results: dict[str, Any], concurrency: list[int]) -> None:
    print(
        "\n| gallery | concurrency | batched req/s | p50 / p90 / p99 ms | mean batch | unbatched req/s "
        "| p50 / p90 / p99 ms | batched / unbatched | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        if name == "overload":
            continue
        for clients in concurrency:
            a, b = rows["runs"][f"batched@{clients}"], rows["runs"][f"unbatched@{clients}"]
            ratio = a["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("nan")
            errors = sum(a["errors"].values()) + sum(b["errors"].values())
            print(
                f"| {name} | {clients} | {a['requests_per_s']:.1f} | {a['p50_ms']:.0f} / {a['p90_ms']:.0f} / "
                f"{a['p99_ms']:.0f} | {a['mean_batch']:.1f} | {b['requests_per_s']:.1f} | {b['p50_ms']:.0f} / "
                f"{b['p90_ms']:.0f} / {b['p99_ms']:.0f} | {ratio:.2f}x | {errors} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/itmrt-serve-bench"))
    parser.add_argument("--galleries", default="released,small", help="released and/or small")
    parser.add_argument("--images", type=int, default=1000, help="images in the released-size gallery")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=10.0, help="per run (each concurrency, each server)")
    parser.add_argument("--max-requests", type=int, default=2000, help="per client per run")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument(
        "--client-timeout", type=float, default=120.0, help="a request unanswered this long counts as hung"
    )
    parser.add_argument(
        "--overload-queue", type=int, default=256, help="the overload server's --max-queue (0: no overload run)"
    )
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, Any] = {}
    prepared = {
        "released": lambda: released_gallery(args.work / "released", args.images),
        "small": lambda: small_gallery(args.work / "small"),
    }
    for name in args.galleries.split(","):
        gallery, captions = prepared[name]()
        results[name] = compare(name, gallery, captions, args)
        if name == args.galleries.split(",")[0] and args.overload_queue:
            results["overload"] = overload(gallery, captions, args)
    print_table(results, args.concurrency)
    (args.work / "bench_serve.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.work / 'bench_serve.json'}")


if __name__ == "__main__":
    main()
