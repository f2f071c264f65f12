"""`itmrt serve` under attack and under file faults: does a well-behaved client notice?

    python benchmarks/bench_serve_faults.py [--seconds 5] [--images 2000] [--swaps 20] [--work /tmp/itmrt-faults]
        [--body-mb 1] [--max-wait-ms MS] [--sharded]

One ``itmrt serve`` subprocess on 127.0.0.1 (a free port), run with ``--caller-header X-Caller`` as behind a
proxy that names each caller (the well-behaved clients name themselves ``client-0`` and ``client-1``; attackers
that send no name are each their own connection), serves the shipped
small NAAF over a gallery of ``--images`` random images, with short transport
deadlines (``--header-timeout-s 2 --body-timeout-s 2 --write-timeout-s 2``),
``--max-connections 128``, ``--grace-s 10`` and ``--max-batch-captions 16`` (the
longest a one-caption request waits behind a large one is one batch), with
the default scorer (the fused CPU scorer where numba is installed). Two well-behaved clients send
one-caption requests (top 10) back to back through every phase; each answer
must equal the runtime's own top 10 (computed in this process before the
server starts) for the gallery version the response names. Each phase lasts ``--seconds``
(every attacker loop is bounded in count and time):

- ``quiet``: the well-behaved clients alone (the reference p99);
- ``slow headers``: 100 connections sending a header byte a second;
- ``stalled bodies``: 50 connections announcing ``--body-mb`` bodies (the server's limit), sending 1 KB,
  stalling;
- ``large bodies``: 20 senders posting whole JSON documents of ``--body-mb`` (parsed, then refused: a caption
  too long);
- ``non-readers``: 20 connections pipelining requests for large answers and reading none;
- ``amplification``: 2 callers sending 256-caption requests with the largest top_k --max-answer allows;
- ``overload, one caller``: 64 more closed-loop clients on 64 connections that name one caller
  (``X-Caller: overload``), as a proxy in front of the service names every connection from one host (or one
  forwarded address) by that address: fair queueing gives them one share between them (429 is a correct answer);
- ``overload, 64 callers``: the same 64 clients, each naming a caller of its own: 64 genuinely distinct callers
  sending flat out (the service is at capacity: each gets a 66th of the worker);
- ``hot swap``: ``--swaps`` new gallery folders renamed into place in turn;
- ``disk faults``: one after another, each held 0.6 s and then undone: ``gallery.json`` not JSON, then
  50 MB; the embeddings file replaced by a link to ``/etc/passwd``, a FIFO, a folder (sharded: in a shard,
  and also a shard's embeddings truncated in place then written back in place, and a shard folder taken
  away and put back). Every version seen must be refused, every answer come from the good one;
- ``file faults``: the served embeddings file changed in place, then truncated;
- ``SIGTERM``: 20 non-readers connected, then SIGTERM: seconds to exit, and the exit status.

``--sharded``: the versions are sharded galleries (four shards each) served with
``--copy-shards-mb 0`` (embeddings read from their files by position); the
phases are quiet, hot swap, disk faults, a shard's embeddings truncated under the service
and then a good version renamed into place (503 between the two is a correct
refusal), and SIGTERM.

For each phase the server's CPU use (cores, from /proc/PID/stat), how busy its
one scoring worker was (seconds spent encoding and scoring batches per second,
from its metrics: 100% is a worker that never waits for work) and how busy the
whole machine was (/proc/stat; other work on the machine counts too, niced
work included) tell whether the attack exhausted the CPU or the worker.

First, what the service's copy-on-open costs: the gallery opened mapped
(``read_gallery``) and copied (``in_memory=True``), twice each, each in a fresh
process: seconds to open (verification included) and resident MB added.

The table: well-behaved requests answered correctly, refused at once (429/503),
lost (a wrong answer, another status, a timeout, a dropped connection), their
p50 and p99 and p99 against the quiet p99; how long ``/v2/health/live`` took
(probed every 50 ms: p99 and max); the server's resident memory
before, during (peak sampled) and 3 s after the attack; for hot swap the
swaps done and refused, for file faults the versions refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import Server, metric, small_gallery  # noqa: E402

INFER = "/v2/models/text_to_image/infer"
CALLER_HEADER = "X-Caller"
"""The header the benchmark's server takes a caller's name from (``--caller-header``), as a proxy would set it."""
FLAGS = ["--caller-header", CALLER_HEADER,
         "--max-batch-captions", "16", "--header-timeout-s", "2", "--body-timeout-s", "2", "--write-timeout-s", "2",
         "--max-connections", "128", "--grace-s", "10", "--watch-s", "0.2", "--max-answer", "10000"]


def references(bundle: Path, versions: list[Path], captions: list[str]) -> dict[str, dict[str, list[int]]]:
    """Each version's top 10 for each caption, from the runtime alone: what a correct answer is."""
    from itmrt.runtime import load

    runtime = load(bundle, scorer="graph")
    table: dict[str, dict[str, list[int]]] = {}
    for folder in versions:
        gallery = runtime.open_gallery(folder)
        hits = runtime.search_text_to_image(captions, gallery, k=10)
        table[gallery.manifest.embeddings.sha256[:16]] = {c: row.tolist() for c, row in zip(captions, hits.indices)}
    return table


def galleries(work: Path, images: int) -> tuple[Path, list[Path], list[str]]:
    """The bundle, three gallery versions of ``images`` random images each, and captions to query with."""
    from itmrt.runtime import load

    demo, captions = small_gallery(work / "small")
    bundle = work / "small" / "bundle"
    runtime = load(bundle, scorer="graph")
    shape = [axis if isinstance(axis, int) else 36 for axis in runtime.image_input_shape[1:]]
    versions = []
    for number in range(3):
        folder = work / f"version{number}"
        if not (folder / "gallery.json").is_file():
            rng = np.random.default_rng(number)
            runtime.index(np.abs(rng.standard_normal((images, *shape))).astype(np.float32), folder)
        versions.append(folder)
    return demo, versions, captions


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine so far (/proc/stat): busy is all but idle and iowait."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = float(sum(values[:8]))
    return total - values[3] - values[4], total


def sharded_galleries(work: Path, images: int) -> tuple[list[Path], list[str]]:
    """Three sharded gallery versions of ``images`` random images each (four shards), and captions."""
    from itmrt.runtime import load
    from itmrt.scale import ShardingOptions, index_sharded

    _demo, captions = small_gallery(work / "small")
    runtime = load(work / "small" / "bundle", scorer="graph")
    shape = [axis if isinstance(axis, int) else 36 for axis in runtime.image_input_shape[1:]]
    versions = []
    for number in range(3):
        folder = work / f"sharded-version{number}"
        if not (folder / "gallery.json").is_file():
            rng = np.random.default_rng(number)
            index_sharded(runtime, np.abs(rng.standard_normal((images, *shape))).astype(np.float32), folder,
                          ShardingOptions(shard_images=max(1, images // 4)))
        versions.append(folder)
    return versions, captions


def sharded_references(versions: list[Path], captions: list[str]) -> dict[str, dict[str, list[int]]]:
    """Each sharded version's top 10 per caption (every shard scored, merged), by its top document's sha256."""
    import hashlib

    from itmrt.scale import SearchRequest, open_shards

    table: dict[str, dict[str, list[int]]] = {}
    for folder in versions:
        shards = open_shards(folder, scorer="graph")
        hits = shards.search(shards.runtime.encode_captions(captions), SearchRequest(k=10)).t2i
        version = hashlib.sha256((folder / "gallery.json").read_bytes()).hexdigest()[:16]
        table[version] = {c: row.tolist() for c, row in zip(captions, hits.indices)}
        shards.runtime.close()
    return table


def shard_faults(live: Path, good: Path) -> Callable[..., None]:
    """A shard's embeddings truncated under the service (read from the files), then a good version renamed
    into place: 503 between the two, answers from the good version after."""
    def attack(url: str, stop: threading.Event) -> None:
        stop.wait(1.0)
        path = live / "shard-00001" / "image_embeddings.npy"
        os.truncate(path, path.stat().st_size // 2)
        stop.wait(1.5)
        staging = live.with_name("staging-good")
        shutil.copytree(good, staging)
        os.rename(live, live.with_name("old-faulty"))
        os.rename(staging, live)
    return attack


def worker_seconds(server: Server) -> float:
    """Seconds the service's scoring worker has spent encoding and scoring batches so far (its metrics)."""
    page = server.metrics()
    return sum(metric(page, f'itmrt_stage_seconds_sum{{stage="{stage}"}}') for stage in ("encode", "score"))


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return float(status.split("VmRSS:")[1].split()[0]) / 1024


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    answered: int = 0
    refused: int = 0
    lost: dict[str, int] = field(default_factory=dict)

    def lose(self, why: str) -> None:
        self.lost[why] = self.lost.get(why, 0) + 1


class WellBehaved:
    """Two clients sending one-caption requests; answers checked against references (by gallery version)."""

    def __init__(self, url: str, captions: list[str], references: dict[str, dict[str, list[int]]]) -> None:
        self.url, self.captions, self.references = url, captions, references
        self.outcome = Outcome()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self, clients: int = 2) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._loop, args=(n,), daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        return threads

    def _loop(self, number: int) -> None:
        import http.client

        rng = np.random.default_rng(number)
        host, port = self.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        while not self.stop.is_set():
            caption = self.captions[int(rng.integers(len(self.captions)))]
            body = json.dumps({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [1],
                                           "data": [caption]}], "parameters": {"top_k": 10}})
            started = time.perf_counter()
            try:
                connection.request("POST", INFER, body, {"Content-Type": "application/json",
                                                         CALLER_HEADER: f"client-{number}"})
                reply = connection.getresponse()
                data = reply.read()
                elapsed = time.perf_counter() - started
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
                with self.lock:
                    self.outcome.lose(type(exc).__name__)
                continue
            self._record(reply.status, data, caption, elapsed)
        connection.close()

    def _record(self, status: int, data: bytes, caption: str, elapsed: float) -> None:
        with self.lock:
            if status in (429, 503):
                self.outcome.refused += 1
                return
            if status != 200:
                self.outcome.lose(str(status))
                return
            document = json.loads(data)
            version = document.get("parameters", {}).get("gallery_sha256", "")
            indices = document["outputs"][0]["data"]
            if indices != self.references.get(version, {}).get(caption):
                self.outcome.lose("wrong answer")
                return
            self.outcome.answered += 1
            self.outcome.latencies.append(elapsed)

    def take(self) -> Outcome:
        with self.lock:
            outcome, self.outcome = self.outcome, Outcome()
        return outcome


# -- attacks ------------------------------------------------------------------------


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def slow_headers(url: str, stop: threading.Event, count: int = 100) -> None:
    """``count`` connections that send one header byte a second, reconnecting when cut off."""
    request = b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
    sockets: list[tuple[socket.socket, int]] = []
    while not stop.is_set():
        while len(sockets) < count and not stop.is_set():
            try:
                sockets.append((connect(url), 0))
            except OSError:
                break
        kept = []
        for sock, sent in sockets:
            try:
                sock.send(request[sent : sent + 1])
                kept.append((sock, sent + 1))
            except OSError:
                sock.close()
        sockets = kept
        stop.wait(1.0)
    for sock, _sent in sockets:
        sock.close()


BODY_BYTES = 1 << 20
"""What the body attacks send (``--body-mb``): the server's body limit."""


def stalled_bodies(url: str, stop: threading.Event, count: int = 50) -> None:
    head = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(BODY_BYTES).encode() + b"\r\n\r\n" + b" " * 1024)
    sockets: list[socket.socket] = []
    while not stop.is_set():
        alive = []
        for sock in sockets:
            try:
                sock.setblocking(False)
                if sock.recv(65536) == b"":
                    raise OSError("closed")
                sock.close()  # answered (408/503): open a new one
            except BlockingIOError:
                alive.append(sock)
            except OSError:
                sock.close()
        sockets = alive
        while len(sockets) < count and not stop.is_set():
            try:
                sock = connect(url)
                sock.sendall(head)
                sockets.append(sock)
            except OSError:
                break
        stop.wait(0.5)
    for sock in sockets:
        sock.close()


def non_readers(url: str, stop: threading.Event, count: int = 20, answers: int = 50) -> list[socket.socket]:
    """``count`` connections pipelining ``answers`` requests for large answers each, reading nothing."""
    body = json.dumps({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [20],
                                   "data": ["a dog on the grass"] * 20}], "parameters": {"top_k": 400}}).encode()
    request = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    sockets = []
    for _ in range(count):
        if stop.is_set():
            break
        try:
            sock = connect(url)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(2)
            sock.sendall(request * answers)
            sockets.append(sock)
        except OSError:
            pass
    return sockets


def non_reader_attack(url: str, stop: threading.Event) -> None:
    while not stop.is_set():
        sockets = non_readers(url, stop)
        stop.wait(3.0)
        for sock in sockets:
            sock.close()


def large_bodies(url: str, stop: threading.Event, senders: int = 20, limit: int = 200) -> None:
    """``senders`` threads posting JSON documents of the body limit (one huge caption: parsed, then refused with
    400)."""
    import http.client

    body = json.dumps({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [1],
                                   "data": ["word " * ((BODY_BYTES - 100) // 5)]}]}).encode()
    host, port = url.removeprefix("http://").split(":")

    def sender() -> None:
        for _ in range(limit):
            if stop.is_set():
                return
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                connection.request("POST", INFER, body, {"Content-Type": "application/json"})
                connection.getresponse().read()
            except (OSError, http.client.HTTPException):
                pass
            finally:
                connection.close()

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class LiveProbe:
    """``GET /v2/health/live`` every 50 ms: how long the event loop takes to answer during each phase."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self.stop = url, [], threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        import http.client

        host, port = self.url.removeprefix("http://").split(":")
        while not self.stop.wait(0.05):
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            started = time.perf_counter()
            try:
                connection.request("GET", "/v2/health/live")
                connection.getresponse().read()
                with self.lock:
                    self.latencies.append(time.perf_counter() - started)
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.latencies.append(float("inf"))
            finally:
                connection.close()

    def take(self) -> str:
        with self.lock:
            values, self.latencies = self.latencies, []
        if not values:
            return "live: no probe"
        return f"live p99 {np.percentile(values, 99) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"


def amplification(url: str, stop: threading.Event, callers: int = 2, limit: int = 1000) -> None:
    """``callers`` threads sending 256-caption requests asking for the largest answer allowed."""
    from itmrt.serve.client import ServiceClient, ServiceError

    def caller(number: int) -> None:
        with ServiceClient(url, timeout_s=60) as client:
            for _ in range(limit):
                if stop.is_set():
                    return
                try:
                    client.search([f"a photo number {number} {i}" for i in range(256)], 39)
                except ServiceError:
                    pass

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def overload(url: str, stop: threading.Event, clients: int = 64, one_caller: bool = False) -> None:
    """``clients`` closed-loop clients of one-caption requests, retrying at once when refused: each names a caller
    of its own, or (``one_caller``) all name one, as a proxy names the connections of one host."""
    from itmrt.errors import ItmrtError
    from itmrt.serve import protocol
    from itmrt.serve.client import ServiceClient

    body, headers = protocol.infer_request_body(["a dog runs"], 10, False)

    def client_loop(number: int) -> None:
        named = {**headers, "Content-Type": "application/json",
                 CALLER_HEADER: "overload" if one_caller else f"overload-{number}"}
        with ServiceClient(url, timeout_s=60) as client:
            for _ in range(10_000):
                if stop.is_set():
                    return
                try:
                    client.request("POST", INFER, body, named)
                except (OSError, ItmrtError):
                    pass

    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def overload_one_caller(url: str, stop: threading.Event) -> None:
    overload(url, stop, one_caller=True)


# -- phases -------------------------------------------------------------------------


def phase(name: str, server: Server, clients: WellBehaved, seconds: float, attack: Callable[..., Any] | None,
          quiet_p99: float | None, note: Callable[[], str] | None = None,
          probe: LiveProbe | None = None) -> dict[str, Any]:
    before = rss_mb(server.process.pid)
    clients.take()
    if probe is not None:
        probe.take()
    stop = threading.Event()
    thread = threading.Thread(target=attack, args=(server.url, stop), daemon=True) if attack else None
    cpu0, (busy0, total0), started = cpu_seconds(server.process.pid), machine_busy(), time.monotonic()
    worker0 = worker_seconds(server)
    if thread:
        thread.start()
    peak, end = before, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, rss_mb(server.process.pid))
        time.sleep(0.2)
    server_cores = (cpu_seconds(server.process.pid) - cpu0) / (time.monotonic() - started)
    worker_busy = (worker_seconds(server) - worker0) / (time.monotonic() - started)
    busy1, total1 = machine_busy()
    stop.set()
    outcome = clients.take()
    live = probe.take() if probe is not None else ""
    if thread:
        thread.join(60)
    time.sleep(3.0)
    after = rss_mb(server.process.pid)
    p50, p99 = (np.percentile(outcome.latencies, [50, 99]) * 1000).tolist() if outcome.latencies else (0.0, 0.0)
    row = {"phase": name, "answered": outcome.answered, "refused": outcome.refused,
           "lost": sum(outcome.lost.values()), "lost_why": outcome.lost, "p50_ms": round(p50, 1),
           "p99_ms": round(p99, 1), "p99_x_quiet": round(p99 / quiet_p99, 2) if quiet_p99 else 1.0,
           "rss_before_mb": round(before, 1), "rss_peak_mb": round(peak, 1), "rss_after_mb": round(after, 1),
           "rss_after_x_before": round(after / before, 3), "server_cores": round(server_cores, 2),
           "worker_busy": round(worker_busy, 2),
           "machine_busy": round((busy1 - busy0) / max(total1 - total0, 1.0), 2),
           "note": "; ".join(part for part in (live, note() if note else "") if part)}
    print(json.dumps(row), flush=True)
    return row


def swapper(live: Path, versions: list[Path], swaps: int, server: Server) -> Callable[..., None]:
    def attack(url: str, stop: threading.Event) -> None:
        for number in range(swaps):
            if stop.is_set():
                return
            staging = live.with_name(f"staging{number}")
            shutil.copytree(versions[(number + 1) % len(versions)], staging)
            old = live.with_name(f"old{number}")
            os.rename(live, old)
            os.rename(staging, live)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and stop.wait(0.1) is False:
                page = server.metrics()
                done = metric(page, 'itmrt_swaps_total{outcome="ok"}')
                done += metric(page, 'itmrt_swaps_total{outcome="refused"}')
                if done >= number + 1:
                    break
            shutil.rmtree(old, ignore_errors=True)
    return attack


Fault = tuple[str, Callable[[], None], Callable[[], None]]


def _moved_aside(path: Path, make: Callable[[Path], None]) -> tuple[Callable[[], None], Callable[[], None]]:
    """``path`` renamed aside and ``make(path)`` put in its place; undone: that removed, the original back."""
    aside = path.with_name(path.name + ".aside")

    def do() -> None:
        os.rename(path, aside)
        make(path)

    def undo() -> None:
        if path.is_symlink() or path.is_file() or path.is_fifo():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        os.rename(aside, path)
    return do, undo


def _written_in_place(path: Path, change: Callable[[Path], None]) -> tuple[Callable[[], None], Callable[[], None]]:
    """``change(path)`` in place (same inode); undone: the original bytes written back in place."""
    original: list[bytes] = []

    def do() -> None:
        original.append(path.read_bytes())
        change(path)

    def undo() -> None:
        with open(path, "r+b") as handle:
            handle.write(original.pop())
            handle.truncate()
    return do, undo


def disk_faults(live: Path, sharded: bool) -> Callable[..., None]:
    """Each fault made under the running service, held 0.6 s, then undone (the folder as it was): a document
    that is not JSON or is 50 MB, an embeddings file turned into a link out of the folder, a FIFO or a folder,
    the gallery (or a shard) folder taken away; sharded, also a shard's embeddings truncated in place and
    written back in place (only the shard folder's files change: the service must see the restore itself).
    Every version seen meanwhile must be refused and every answer come from the good one (or be a 503)."""
    top = live / "gallery.json"
    files = live / "shard-00001" if sharded else live
    embeddings = files / "image_embeddings.npy"
    faults: list[Fault] = [
        ("gallery.json not JSON", *_written_in_place(top, lambda path: path.write_bytes(b"{not json"))),
        ("gallery.json of 50 MB", *_written_in_place(
            top, lambda path: path.write_bytes(b'{"pad": "' + b"x" * (50 << 20) + b'"}'))),
        ("embeddings a link to /etc/passwd", *_moved_aside(embeddings, lambda path: path.symlink_to("/etc/passwd"))),
        ("embeddings a FIFO", *_moved_aside(embeddings, lambda path: os.mkfifo(path))),
        ("embeddings a folder", *_moved_aside(embeddings, lambda path: path.mkdir())),
    ]
    if sharded:
        faults += [("a shard truncated in place", *_written_in_place(
                       embeddings, lambda path: os.truncate(path, path.stat().st_size // 2))),
                   ("a shard folder taken away", *_moved_aside(files, lambda path: None))]

    def attack(url: str, stop: threading.Event) -> None:
        for _name, do, undo in faults:
            if stop.is_set():
                return
            do()
            stop.wait(0.6)
            undo()
            stop.wait(0.6)
    return attack


def file_faults(live: Path) -> Callable[..., None]:
    def attack(url: str, stop: threading.Event) -> None:
        path = live / "image_embeddings.npy"
        stop.wait(1.0)
        with open(path, "r+b") as handle:  # in place: same inode
            handle.seek(-4096, os.SEEK_END)
            handle.write(np.full(1024, 1e30, dtype=np.float32).tobytes())
        stop.wait(1.5)
        os.truncate(path, path.stat().st_size // 2)
    return attack


def sigterm(server: Server) -> dict[str, Any]:
    stop = threading.Event()
    sockets = non_readers(server.url, stop, count=20, answers=50)
    time.sleep(1.0)
    signalled = time.monotonic()
    server.process.send_signal(15)
    try:
        status = server.process.wait(60)
    except Exception:  # noqa: BLE001 - reported as a miss
        server.process.kill()
        status = server.process.wait()
    seconds = time.monotonic() - signalled
    for sock in sockets:
        sock.close()
    row = {"phase": "SIGTERM (20 non-readers)", "exit_s": round(seconds, 2), "exit_status": status}
    print(json.dumps(row), flush=True)
    return row


OPEN_COST = """
import sys, time
from itmrt.runtime.gallery import read_gallery
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
base, started = rss(), time.perf_counter()
gallery = read_gallery(sys.argv[2], in_memory=sys.argv[1] == 'copied')
print(round(time.perf_counter() - started, 3), round(rss() - base, 1))
"""


def open_cost(gallery: Path, runs: int = 2) -> list[dict[str, Any]]:
    """What copying the gallery into memory costs against mapping it: open seconds and resident MB, each in a
    fresh process (the file in the page cache: the service's case after the first start)."""
    import subprocess

    rows = []
    for _ in range(runs):
        for mode in ("mapped", "copied"):
            done = subprocess.run([sys.executable, "-c", OPEN_COST, mode, str(gallery)], capture_output=True,
                                  text=True, check=True, timeout=300)
            seconds, mb = done.stdout.split()
            rows.append({"open": mode, "seconds": float(seconds), "rss_mb": float(mb)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.sharded:
        versions, captions = sharded_galleries(work, args.images)
    else:
        _demo, versions, captions = galleries(work, args.images)
    live = work / "live"
    shutil.rmtree(live, ignore_errors=True)
    for leftover in [*work.glob("old*"), *work.glob("staging*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(versions[0], live)
    queries = captions[:50]
    if args.sharded:
        table = sharded_references(versions, queries)
        flags = [*FLAGS, "--copy-shards-mb", "0"]
    else:
        open_cost(versions[0])
        table = references(work / "small" / "bundle", versions, queries)
        flags = FLAGS
    flags = [*flags, "--max-body-mb", f"{BODY_BYTES / (1 << 20):g}"]
    if args.max_wait_ms is not None:
        flags += ["--max-wait-ms", f"{args.max_wait_ms:g}"]
    server = Server.start("faults", live, work / "server.log", *flags)
    server.wait_ready()
    clients = WellBehaved(server.url, queries, table)
    threads = clients.run()
    probe = LiveProbe(server.url)
    rows: list[dict[str, Any]] = []
    try:
        phase("warm-up (not reported)", server, clients, args.seconds, None, None)
        quiet = phase("quiet", server, clients, args.seconds, None, None, probe=probe)
        rows.append(quiet)
        q = quiet["p99_ms"] or 1.0
        size = f"{BODY_BYTES / (1 << 20):g} MB"
        attacks = [("slow headers (100)", slow_headers), (f"stalled {size} bodies (50)", stalled_bodies),
                   (f"large bodies (20 x {size} JSON)", large_bodies),
                   ("non-readers (20 x 50 answers)", non_reader_attack), ("amplification (2 x 256 captions)",
                                                                          amplification),
                   ("overload, one caller (64 connections)", overload_one_caller),
                   ("overload, 64 callers", overload)]
        chosen = [(name, attack) for name, attack in attacks if not args.phases
                  or any(word in name for word in args.phases.split(","))]
        for name, attack in [] if args.sharded else chosen:
            rows.append(phase(name, server, clients, args.seconds, attack, q, lambda: dropped(server), probe))
        if not args.phases or "swap" in args.phases.split(","):
            swap_phases(args, live, versions, server, clients, q, probe, rows)
    finally:
        probe.stop.set()
        clients.stop.set()
        for thread in threads:
            thread.join(30)
    rows.append(sigterm(server))
    return rows


def swap_phases(args: argparse.Namespace, live: Path, versions: list[Path], server: Server, clients: WellBehaved,
                q: float, probe: LiveProbe, rows: list[dict[str, Any]]) -> None:
    """Hot swap, the disk faults, then the file faults (one-folder) or a truncated shard (sharded)."""
    swaps = swapper(live, versions, args.swaps, server)
    rows.append(phase(f"hot swap ({args.swaps} swaps)", server, clients, max(args.seconds, args.swaps * 1.5),
                      swaps, q, lambda: swap_counts(server), probe))
    rows.append(phase("disk faults, each undone (documents, links, FIFOs, folders)", server, clients,
                      max(args.seconds, 10.0), disk_faults(live, args.sharded), q, lambda: swap_counts(server),
                      probe))
    if args.sharded:
        rows.append(phase("shard file truncated, then a good version", server, clients, args.seconds,
                          shard_faults(live, versions[1]), q, lambda: swap_counts(server), probe))
    else:
        rows.append(phase("file faults (changed in place, truncated)", server, clients, args.seconds,
                          file_faults(live), q, lambda: swap_counts(server), probe))


def dropped(server: Server) -> str:
    page = server.metrics()
    counts = {reason: int(metric(page, f'itmrt_connections_dropped_total{{reason="{reason}"}}'))
              for reason in ("header_timeout", "write_timeout", "evicted", "over_limit")}
    refused = int(metric(page, "itmrt_refused_wait_total"))
    held = int(metric(page, "itmrt_refusals_held_total"))
    return ("dropped so far: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"; refused for their wait {refused}; refusals held (caller's own backlog) {held}")


def swap_counts(server: Server) -> str:
    page = server.metrics()
    name = 'itmrt_swaps_total{outcome="OUTCOME"}'
    ok, refused = (int(metric(page, name.replace("OUTCOME", outcome))) for outcome in ("ok", "refused"))
    return f"swaps ok {ok}, refused {refused} (so far)"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| phase | answered | refused | lost | p50 ms | p99 ms | p99 / quiet "
             "| server CPU cores / worker busy / machine busy | RSS before / peak / after MB (after / before) | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "exit_s" in row:
            lines.append(f"| {row['phase']} | | | | | | | | | exit in {row['exit_s']} s, status {row['exit_status']} |")
            continue
        lines.append(f"| {row['phase']} | {row['answered']} | {row['refused']} | {row['lost']} | {row['p50_ms']} "
                     f"| {row['p99_ms']} | {row['p99_x_quiet']} | {row['server_cores']} / "
                     f"{row['worker_busy'] * 100:.0f}% / {row['machine_busy'] * 100:.0f}% | "
                     f"{row['rss_before_mb']} / {row['rss_peak_mb']} / "
                     f"{row['rss_after_mb']} ({row['rss_after_x_before']}) | {row['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="Length of each phase (bounded: at most 60).")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--work", default="/tmp/itmrt-faults")
    parser.add_argument("--sharded", action="store_true", help=(
        "Serve sharded galleries read from their files (--copy-shards-mb 0): quiet, hot swap, a truncated shard "
        "file then a good version, SIGTERM."))
    parser.add_argument("--body-mb", type=float, default=1.0, help=(
        "Body size of the stalled-bodies and large-bodies attacks, and the server's --max-body-mb."))
    parser.add_argument("--phases", default="", help=(
        "Run only the attack phases whose names contain one of these comma-separated words (and hot swap and "
        "file faults only when 'swap' is one); default: all."))
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="The server's --max-wait-ms (default: its own).")
    args = parser.parse_args()
    args.seconds = min(args.seconds, 60.0)
    global BODY_BYTES
    BODY_BYTES = int(args.body_mb * (1 << 20))
    rows = run(args)
    print(markdown(rows))


if __name__ == "__main__":
    main()
