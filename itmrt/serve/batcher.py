"""Dynamic batching: a bounded queue of requests and the one worker thread that owns the searcher.

The event loop only appends a :class:`Job` to the queue (rejected at once when
the queue is full) and awaits its future; the worker thread opens the searcher
(the runtime and gallery), warms it up, and then loops: take the oldest job,
add later ones while the batch has room (``max_batch_captions``) and the oldest
has waited less than ``max_delay_s``, encode and score them in one go, and
split the answers back. A request's rows are exactly what it gets alone (see
:mod:`itmrt.serve.searcher`); every request is answered with ``max(top_k)``
of its batch cut to its own ``top_k`` (rankings are stable, so a prefix of
a longer top-k is the shorter one).

One thread owns the runtime because the fused scorer's threading layer takes
one caller at a time, and so that compute never runs on the event loop.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from itmrt.errors import ItmrtError, first_line
from itmrt.serve.metrics import ServiceMetrics
from itmrt.serve.searcher import Searcher, TokenIds

log = logging.getLogger("itmrt.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already."""


class NotReady(Exception):
    """The worker has not finished loading, failed to load, or the service is stopping."""


class DeadlineExceeded(Exception):
    """A request's deadline passed before the worker reached it."""


class Refused(Exception):
    """The model refuses one of the request's captions (too many tokens): the client's to fix."""


@dataclass(frozen=True)
class BatchSettings:
    max_batch_captions: int = 64
    max_delay_s: float = 0.005
    max_queue: int = 256

    def check(self) -> None:
        if self.max_batch_captions < 1 or self.max_queue < 1 or self.max_delay_s < 0:
            raise ItmrtError("--max-batch-captions and --max-queue must be at least 1 and --max-delay-ms at least 0")


@dataclass
class Answer:
    """One request's results: indices and scores ``[N, top_k]``."""

    indices: np.ndarray
    scores: np.ndarray


@dataclass
class Job:
    captions: list[str]
    top_k: int
    deadline: float  # time.monotonic()
    future: Future[Answer] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """The queue and its worker thread; :meth:`start` opens the searcher on the worker thread."""

    def __init__(
        self,
        open_searcher: Callable[[], Searcher],
        settings: BatchSettings,
        metrics: ServiceMetrics,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        settings.check()
        self.settings, self.metrics = settings, metrics
        self._open_searcher, self._on_failure = open_searcher, on_failure
        self._queue: collections.deque[Job] = collections.deque()
        self._condition = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="itmrt-serve-worker", daemon=True)
        self.ready = threading.Event()
        self.searcher: Searcher | None = None
        self.failure: str | None = None
        self.warmup_s: float | None = None

    # -- event-loop side -----------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called: no new requests."""
        return self._closing

    def start(self) -> None:
        self._thread.start()

    def submit(self, captions: list[str], top_k: int, deadline: float) -> Future[Answer]:
        """Queue a request; :class:`QueueFull` or :class:`NotReady` at once when it cannot be."""
        if not self.ready.is_set() or self._closing:
            raise NotReady(
                self.failure or ("the service is stopping" if self._closing else "the gallery is still loading")
            )
        job = Job(captions, top_k, deadline)
        with self._condition:
            if len(self._queue) >= self.settings.max_queue:
                raise QueueFull(f"the queue holds {self.settings.max_queue} requests; retry shortly")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._condition.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Answer what is queued, then stop the worker (waits up to ``timeout`` seconds for it)."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker side ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            searcher = self._open_searcher()
            self.warmup_s = searcher.warmup()
        except Exception as exc:  # reported as the service's one-line failure
            self.failure = (
                first_line(exc) if isinstance(exc, ItmrtError) else f"{type(exc).__name__}: {first_line(exc)}"
            )
            log.error("cannot serve: %s", self.failure)
            if self._on_failure is not None:
                self._on_failure(self.failure)
            return
        self.searcher = searcher
        self.metrics.gallery_images.set(searcher.size)
        self.metrics.ready.set(1)
        self.ready.set()
        log.info("ready: %d images, warmed up in %.1f s", searcher.size, self.warmup_s)
        while (jobs := self._next_batch()) is not None:
            try:
                self._answer(searcher, jobs)
            except Exception as exc:  # the worker must outlive any request: fail what is left of the batch
                log.exception("batch failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
        close = getattr(searcher, "close", None)  # a searcher holding processes (Ray actors) ends them here
        if callable(close):
            close()

    def _next_batch(self) -> list[Job] | None:
        """The next batch: the oldest job and those after it that fit, waiting at most ``max_delay_s``."""
        limit, delay = self.settings.max_batch_captions, self.settings.max_delay_s
        with self._condition:
            while not self._queue:
                if self._closing:
                    return None
                self._condition.wait()
            first = self._queue.popleft()
            jobs, captions = [first], len(first.captions)
            until = first.enqueued + delay
            while captions < limit:
                if self._queue:
                    if captions + len(self._queue[0].captions) > limit:
                        break
                    job = self._queue.popleft()
                    jobs.append(job)
                    captions += len(job.captions)
                    continue
                remaining = until - time.monotonic()
                if remaining <= 0 or self._closing:
                    break
                self._condition.wait(remaining)
            self.metrics.queue_depth.set(len(self._queue))
        return jobs

    def _answer(self, searcher: Searcher, jobs: list[Job]) -> None:
        """Tokenize each job (a refused caption fails only its job), then encode and score the rest together."""
        now = time.monotonic()
        live: list[tuple[Job, TokenIds]] = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # the client gave up (deadline or disconnect) while it waited
            self.metrics.stage_seconds.labels("queue_wait").observe(now - job.enqueued)
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded("the request waited past its deadline in the queue"))
                continue
            try:
                live.append((job, searcher.tokenize(job.captions)))
            except ItmrtError as exc:
                job.future.set_exception(Refused(first_line(exc)))
            except Exception as exc:  # whatever it is, the request fails alone
                log.exception("request failed")
                job.future.set_exception(exc)
        if live:
            self._search(searcher, live)

    def _search(self, searcher: Searcher, live: list[tuple[Job, TokenIds]]) -> None:
        try:
            started = time.perf_counter()
            embeddings = searcher.encode([ids for _job, ids in live])
            encoded = time.perf_counter()
            k = max(job.top_k for job, _ids in live)
            hits = searcher.top_k(embeddings, k)
            scored = time.perf_counter()
        except Exception as exc:  # one bad request never takes the process (or its batch) down
            if len(live) > 1:  # find the culprit: every request again on its own
                for one in live:
                    self._search(searcher, [one])
                return
            log.exception("request failed")
            live[0][0].future.set_exception(exc)
            return
        self.metrics.batch(len(live), len(embeddings), encoded - started, scored - encoded,
                           getattr(searcher, "index_stages", None))
        row = 0
        for job, _ids in live:
            rows = slice(row, row + len(job.captions))
            job.future.set_result(Answer(hits.indices[rows, : job.top_k].copy(), hits.scores[rows, : job.top_k].copy()))
            row += len(job.captions)
