"""Real ``itmrt serve`` services for the tests: uvicorn on 127.0.0.1, a free port, a small model's gallery."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from itmrt.serve.searcher import RuntimeSearcher
from itmrt.serve.server import Service

from runtime_helpers import region_features

REPO = Path(__file__).resolve().parents[1]


def make_gallery(bundle: Path, out: Path, images: Any = None, count: int = 40) -> Path:
    from itmrt.runtime import load

    load(bundle).index(region_features(count, seed=7) if images is None else images, out)
    return out


@contextlib.contextmanager
def running(service: Service, wait_ready: bool = True, timeout_s: float = 120.0) -> Iterator[Service]:
    """Run ``service`` on a thread; stop it (as SIGTERM would) and check it ended when the block exits."""
    thread = threading.Thread(target=service.run, name="test-service", daemon=True)
    thread.start()
    try:
        if wait_ready:
            deadline = time.monotonic() + timeout_s
            while not service.batcher.ready.wait(0.05):
                assert thread.is_alive() and time.monotonic() < deadline, (
                    service.batcher.failure or "the service never got ready"
                )
        yield service
    finally:
        service.stop()
        thread.join(60)
        assert not thread.is_alive(), "the service did not stop"


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from a Prometheus text page (``labels`` as written, e.g. 'outcome="ok"')."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"{name}{{{labels}}} is not on the metrics page"
    return float(found.group(1))


class ControlledSearcher:
    """The runtime's searcher with handles for a test: it can hold the worker while it scores (``release``
    cleared), says when it is scoring (``scoring``), and fails a batch that holds the ``poison`` token."""

    def __init__(self, inner: RuntimeSearcher, poison: int | None = None) -> None:
        self.inner, self.poison = inner, poison
        self.size, self.ids = inner.size, inner.ids
        self.scoring, self.release = threading.Event(), threading.Event()
        self.release.set()

    def warmup(self) -> float:
        return self.inner.warmup()

    def tokenize(self, captions: Any) -> Any:
        return self.inner.tokenize(captions)

    def encode(self, requests: Any) -> Any:
        if self.poison is not None and any(self.poison in ids for request in requests for ids in request):
            raise RuntimeError("the poisoned caption")
        return self.inner.encode(requests)

    def top_k(self, captions: Any, k: int) -> Any:
        self.scoring.set()
        assert self.release.wait(60)
        return self.inner.top_k(captions, k)


def start_server_process(script: str) -> subprocess.Popen[str]:
    """``script`` (an ``itmrt serve`` command line, or a Service around a test searcher) in a fresh Python
    process, from this checkout, with its log on a pipe for :func:`wait_until_ready`."""
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stderr=subprocess.PIPE, text=True)


def wait_until_ready(server: subprocess.Popen[str], lines: list[str] | None = None) -> str:
    """The URL a server process says it listens on, once its log says it is ready (each log line read is
    appended to ``lines`` when given)."""
    url = None
    assert server.stderr is not None
    for line in server.stderr:
        if lines is not None:
            lines.append(line)
        if url is None and "listening on " in line:
            url = line.split("listening on ")[1].split(";")[0]
        if "ready:" in line:
            break
    assert url is not None, "the server never got ready: " + "".join(lines or [])
    return url
