"""Dynamic batching: a bounded queue of requests and the one worker thread that owns the searcher.

The event loop only adds a :class:`Job` to the queue (rejected at once when
the queue is full) and awaits its future; the worker thread opens the searcher
(the runtime and gallery), warms it up, and then loops: take the next job,
add more while the batch has room (``max_batch_captions``) and the first
has waited less than ``max_delay_s``, encode and score them in one go, and
split the answers back.

The delay is a queue delay under load only (what Triton's dynamic batcher
calls one): a request that arrives after the worker's last answers went out,
when that last batch held one request, is dispatched at once with whatever is
queued beside it - a lone caller never waits for company that is not coming
(at one client, the whole ``max_delay_s`` was added to every answer).
Requests that queue while the worker is busy are batched, and after a batch of
several requests the worker waits for company again (closed-loop callers send
their next requests together, a moment after their answers). ``wait_when_idle`` restores the plain window.

The queue is fair (:class:`FairQueue`): callers (connections) share the worker
by captions, so one caller's backlog of 256-caption requests, or many callers'
large requests, do not hold a one-caption caller back for more than about one
batch. Where a request's rows do not depend on what they are encoded with (NAAF, SCAN: ``searcher.splittable``),
a request of more than ``max_batch_captions`` captions is split into parts of
that size, queued as separate jobs and joined (:func:`joined`), so a large
request waits its turn batch by batch instead of holding the worker for all of it.

Between batches the worker swaps in a new searcher handed to :meth:`Batcher.swap`
(:mod:`itmrt.serve.swap`): every batch runs whole on one version, so a request
is answered entirely by the old gallery or entirely by the new one, and the
service stays ready throughout. Scores that are not finite make the worker find
out what broke - the gallery's embeddings, the model on a plain caption, or
only this request's captions - and in the first two cases the service reports
not ready (with the reason) until a good version is swapped in. A request's rows are exactly what it gets alone (see
:mod:`itmrt.serve.searcher`); every request is answered with ``max(top_k)``
of its batch cut to its own ``top_k`` (rankings are stable, so a prefix of
a longer top-k is the shorter one).

One thread owns the runtime because the fused scorer's threading layer takes
one caller at a time, and so that compute never runs on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from itmrt.errors import GalleryChanged, ItmrtError, first_line
from itmrt.serve.fair import BatchCost, FairQueue
from itmrt.serve.memory import freeze_survivors, release_memory
from itmrt.serve.metrics import ServiceMetrics
from itmrt.serve.searcher import Searcher, TokenIds

log = logging.getLogger("itmrt.serve")


class QueueFull(Exception):
    """The request cannot be queued now (429): the queue is full, or its caller's share is, or it would wait too
    long. ``backlog``: its caller has work queued already (it is sending more than its share)."""

    def __init__(self, message: str, backlog: bool = False) -> None:
        super().__init__(message)
        self.backlog = backlog


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
    wait_when_idle: bool = False  # a request reaching an idle worker after a batch of one waits max_delay_s too
    unit_captions: int = 4
    """Captions scored in one go while others may wait (NAAF, SCAN): larger requests are scored in parts of this
    size, and no batch holds more, so a one-caption request waits for at most about one such unit."""
    max_wait_s: float = 0.5
    """A request whose expected wait in the queue is longer is refused at once (429); 0: no bound."""
    max_caller_captions: int = 512
    """Captions one caller may have queued (more: 429)."""

    def check(self) -> None:
        if min(self.max_batch_captions, self.max_queue, self.unit_captions, self.max_caller_captions) < 1 \
                or self.max_delay_s < 0 or self.max_wait_s < 0:
            raise ItmrtError("--max-batch-captions, --unit-captions, --max-queue and --max-caller-captions must be "
                             "at least 1, --max-delay-ms and --max-wait-ms at least 0")


class ModelFault(Exception):
    """The model gave scores that are not finite for this request's captions (the service's fault, a 500)."""


@dataclass
class Answer:
    """One request's results: indices and scores ``[N, top_k]``, and the ids and version of the gallery that
    answered (a swap between batches changes them)."""

    indices: np.ndarray
    scores: np.ndarray
    ids: Sequence[str] | None = None
    version: str | None = None


@dataclass
class Job:
    captions: list[str]
    top_k: int
    deadline: float  # time.monotonic()
    caller: str = ""
    future: Future[Answer] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class SwapOutcome:
    """What became of a new version: swapped in (its ``version``), or refused (``error``, one line)."""

    version: str | None = None
    error: str | None = None


@dataclass
class PendingSwap:
    searcher: Searcher
    warm: bool  # a new runtime: warm it up on the worker thread before it answers
    retire: Callable[[], None] | None  # frees what the old version held and the new one does not share
    future: Future[SwapOutcome] = field(default_factory=Future)


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
        self._queue = FairQueue()
        self._condition = threading.Condition()
        self._closing = False
        self._pending: PendingSwap | None = None
        self._thread = threading.Thread(target=self._run, name="itmrt-serve-worker", daemon=True)
        self.ready = threading.Event()
        self.searcher: Searcher | None = None
        self.failure: str | None = None
        self.broken: str | None = None  # what broke, while the current version gives non-finite scores
        self.unloaded = False
        self.warmup_s: float | None = None
        self.last_batch_requests = 0  # requests in the worker's last batch: more than one, and company is expected
        self.answered_at = 0.0  # time.monotonic() when the last batch's answers were handed back
        self.cost = BatchCost()
        self._serving: tuple[float, float] | None = None  # the batch being scored: (started, expected seconds)

    # -- event-loop side -----------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called: no new requests."""
        return self._closing

    def ready_now(self, probe: bool = False) -> bool:
        """Whether requests are answered now: loaded, not broken, not unloaded, not stopping. ``probe`` (the
        health probes): look at the searcher's memory-mapped files too, so a changed one shows before a request."""
        if probe and self.ready.is_set() and self.broken is None:
            changed = getattr(self.searcher, "files_changed", None)
            reason = changed() if changed is not None else None
            if reason is not None:
                self.broken = reason
                self._mark_broken()
        return self.ready.is_set() and self.broken is None and not self.unloaded and not self._closing

    def unready_reason(self) -> str:
        """Why requests are not answered now, in words fit for a client (no paths: the log has the details)."""
        if self.failure is not None:
            return "the gallery could not be loaded (the service's log says why); the service is stopping"
        if self._closing:
            return "the service is stopping"
        if not self.ready.is_set():
            return "the gallery is still loading"
        if self.unloaded:
            return "the model is unloaded; load it with POST /v2/repository/models/text_to_image/load"
        return self.broken or "ready"

    def start(self) -> None:
        self._thread.start()

    def submit(self, captions: list[str], top_k: int, deadline: float, caller: str = "") -> Future[Answer]:
        """Queue a request; :class:`QueueFull` or :class:`NotReady` at once when it cannot be (see
        :meth:`_admit`)."""
        if not self.ready_now():
            raise NotReady(self.unready_reason())
        unit = self.unit
        split = len(captions) > unit and getattr(self.searcher, "splittable", False)
        parts = [Job(captions[start : start + unit], top_k, deadline, caller)
                 for start in range(0, len(captions), unit)] if split else [Job(captions, top_k, deadline, caller)]
        with self._condition:
            self._admit(parts[0], len(captions))
            for number, part in enumerate(parts):
                self._queue.push(part, first=number == 0)
            self.metrics.queue_depth.set(self._queue.requests)
            self._condition.notify()
        return parts[0].future if len(parts) == 1 else joined(parts)

    @property
    def unit(self) -> int:
        """Captions in one part of a split request."""
        return min(self.settings.unit_captions, self.settings.max_batch_captions)

    def expected_wait(self, caller: str, captions: int) -> float:
        """Seconds a unit of ``captions`` queued now by ``caller`` would wait: the rest of the batch being scored,
        then every unit ahead of it in the fair order (call with the condition held)."""
        serving = self._serving
        rest = max(0.0, serving[0] + serving[1] - time.monotonic()) if serving is not None else 0.0
        return rest + self.cost.queue_seconds(self._queue.ahead(caller, captions), self.unit)

    def _admit(self, first: Job, captions: int) -> None:
        """Refuse (429) a request the queue cannot take: ``max_queue`` requests waiting, its caller's captions
        over ``max_caller_captions``, or an expected wait (of its first unit) over ``max_wait_s`` or past its
        deadline - refused now rather than answered late."""
        settings = self.settings
        queued = self._queue.queued_by(first.caller)
        if self._queue.requests >= settings.max_queue:
            raise QueueFull(f"the queue holds {settings.max_queue} requests; retry shortly", bool(queued))
        if queued and queued + captions > settings.max_caller_captions:
            raise QueueFull(f"this caller has {queued} captions queued already (at most "
                            f"{settings.max_caller_captions}); wait for its answers", True)
        wait = self.expected_wait(first.caller, len(first.captions))
        bound = first.deadline - time.monotonic()
        if settings.max_wait_s:
            bound = min(bound, settings.max_wait_s)
        if wait > bound:
            self.metrics.refused_wait.inc()
            raise QueueFull(f"the service is busy: this request would wait about {wait * 1000:.0f} ms, over its "
                            f"bound of {bound * 1000:.0f} ms (--max-wait-ms or its timeout); retry shortly",
                            bool(queued))

    def swap(self, searcher: Searcher, warm: bool, retire: Callable[[], None] | None = None) -> Future[SwapOutcome]:
        """Hand a new version to the worker, which answers from it from its next batch on (any thread)."""
        pending = PendingSwap(searcher, warm, retire)
        with self._condition:
            if self._pending is not None:  # a newer version replaces one not yet taken
                self._pending.future.set_result(SwapOutcome(error="replaced by a newer version before it was used"))
            self._pending = pending
            self._condition.notify_all()
        return pending.future

    def unload(self) -> None:
        """Stop answering (503) until a version is loaded again."""
        self.unloaded = True
        self.metrics.ready.set(0)

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
        self._use(searcher)
        size = searcher.size
        # This frame lives as long as the worker: a local naming the first version would keep it (its gallery
        # copy) alive after it is swapped out - +36 MB after the benchmark's swaps, in every run until found.
        del searcher
        freeze_survivors()
        self.ready.set()
        log.info("ready: %d images, warmed up in %.1f s", size, self.warmup_s)
        while (jobs := self._next_batch()) is not None:
            if self._pending is not None:
                self._take_swap()
            if not jobs:
                continue
            current = self.searcher
            assert current is not None
            self._serving = (time.monotonic(), self.cost.seconds(sum(len(job.captions) for job in jobs)))
            try:
                self._answer(current, jobs)
            except Exception as exc:  # the worker must outlive any request: fail what is left of the batch
                log.error("batch failed: %s: %s", type(exc).__name__, first_line(exc))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            self._serving = None
            del current  # not kept past its batch: a swap may retire it before the next one
        if self._pending is not None:
            self._pending.future.set_result(SwapOutcome(error="the service stopped"))
        close = getattr(self.searcher, "close", None)  # a searcher holding processes (Ray actors) ends them here
        if callable(close):
            close()

    def _use(self, searcher: Searcher) -> None:
        self.searcher, self.broken, self.unloaded = searcher, None, False
        self.metrics.gallery_images.set(searcher.size)
        self.metrics.ready.set(1)

    def _take_swap(self) -> None:
        """Between batches: warm the new version up where it needs it, then answer from it."""
        with self._condition:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            if pending.warm:
                pending.searcher.warmup()
        except Exception as exc:  # noqa: BLE001 - a version that cannot warm up is refused, the old one stays
            reason = f"the new version failed its warm-up: {type(exc).__name__}: {first_line(exc)}"
            self.metrics.swaps.labels("refused").inc()
            log.error("swap refused: %s", reason)
            pending.future.set_result(SwapOutcome(error=reason))
            return
        retire = pending.retire
        self._use(pending.searcher)
        self.metrics.swaps.labels("ok").inc()
        pending.future.set_result(SwapOutcome(version=getattr(pending.searcher, "version", None)))
        if retire is not None:
            retire()
        forget = getattr(pending.searcher, "forget_other_constants", None)
        if callable(forget):
            forget()
        del pending
        release_memory()

    def _next_batch(self) -> list[Job] | None:
        """The next batch (empty when a swap is waiting and nothing is queued), waiting at most ``max_delay_s``
        for it to fill - unless the first arrived after the answers of a batch of one (see the module docstring);
        None once closing with nothing queued."""
        with self._condition:
            while not self._queue:
                if self._closing:
                    return None
                if self._pending is not None:
                    return []
                self._condition.wait()
            first = self._queue.pop()
            jobs, captions = [first], len(first.captions)
            # Queued behind a busy worker (before the last answers went out), or after a batch of several: wait.
            busy = first.enqueued < self.answered_at
            wait = busy or self.last_batch_requests > 1 or self.settings.wait_when_idle
            until = first.enqueued + (self.settings.max_delay_s if wait else 0.0)
            # Where requests are split (NAAF, SCAN), no batch holds more than a unit: the worker looks at the
            # queue again after each. Otherwise a batch takes no request larger than its first (or than a
            # quarter of a batch): a small request never waits on large ones, and small ones of different sizes
            # are still scored together.
            splittable = getattr(self.searcher, "splittable", False)
            limit = self.unit if splittable else self.settings.max_batch_captions
            largest = limit if splittable else max(len(first.captions), limit // 4)
            # A batch led by a light caller's work (all it has queued) takes no unit of a caller with more queued:
            # that caller's backlog would lengthen the light one's batch (a one-caption batch costs about half of
            # a four-caption one), and the backlog's turn comes in the next batch anyway.
            light = not self._queue.queued_by(first.caller)
            while captions < limit:
                if self._queue:
                    peek = self._queue.peek()
                    joining = len(peek.captions)
                    if captions + joining > limit or joining > largest \
                            or light and self._queue.queued_by(peek.caller) > joining:
                        break
                    job = self._queue.pop()
                    jobs.append(job)
                    captions += len(job.captions)
                    continue
                remaining = until - time.monotonic()
                if remaining <= 0 or self._closing:
                    break
                self._condition.wait(remaining)
            self.metrics.queue_depth.set(self._queue.requests)
        self.last_batch_requests = len(jobs)
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
            if self.broken is not None:
                job.future.set_exception(NotReady(self.broken))
                continue
            try:
                live.append((job, searcher.tokenize(job.captions)))
            except ItmrtError as exc:
                job.future.set_exception(Refused(first_line(exc)))
            except Exception as exc:  # whatever it is, the request fails alone
                job.future.set_exception(exc)
        if live:
            self._search(searcher, live)

    def _search(self, searcher: Searcher, live: list[tuple[Job, TokenIds]]) -> None:
        if self.broken is not None:
            for job, _ids in live:
                job.future.set_exception(NotReady(self.broken))
            return
        try:
            started = time.perf_counter()
            embeddings = searcher.encode([ids for _job, ids in live])
            encoded = time.perf_counter()
            k = min(max(job.top_k for job, _ids in live), searcher.size)
            hits = searcher.top_k(embeddings, k)
            scored = time.perf_counter()
        except GalleryChanged as exc:  # a mapped file changed: nothing was read from it, nothing is until a restart
            self.broken = first_line(exc)
            self._mark_broken()
            for job, _ids in live:
                job.future.set_exception(NotReady(self.broken))
            return
        except Exception as exc:  # one bad request never takes the process (or its batch) down
            if len(live) > 1:  # find the culprit: every request again on its own
                for one in live:
                    self._search(searcher, [one])
                return
            self.broken = broken_part(searcher)  # a scorer refusing non-finite scores: is it the gallery's fault?
            if self.broken is not None:
                self._mark_broken()
            live[0][0].future.set_exception(NotReady(self.broken) if self.broken is not None else exc)
            return
        if not np.isfinite(hits.scores).all():
            self._not_finite(searcher, live, hits.scores)
            return
        self.cost.observe(len(embeddings), scored - started)
        self.metrics.batch(len(live), len(embeddings), encoded - started, scored - encoded,
                           getattr(searcher, "index_stages", None))
        ids, version = searcher.ids, getattr(searcher, "version", None)
        self.answered_at = time.monotonic()  # a request queued from now on did not wait behind this batch
        row = 0
        for job, _ids in live:
            rows = slice(row, row + len(job.captions))
            job.future.set_result(Answer(hits.indices[rows, : job.top_k].copy(), hits.scores[rows, : job.top_k].copy(),
                                         ids, version))
            row += len(job.captions)

    def _mark_broken(self) -> None:
        self.metrics.ready.set(0)
        log.error("not ready: %s", self.broken)

    def _not_finite(self, searcher: Searcher, live: list[tuple[Job, TokenIds]], scores: np.ndarray) -> None:
        """Scores that are not finite: find what broke (see the module docstring) and answer accordingly."""
        self.broken = broken_part(searcher)
        if self.broken is not None:
            self._mark_broken()
            for job, _ids in live:
                job.future.set_exception(NotReady(self.broken))
            return
        bad_rows = np.flatnonzero(~np.isfinite(scores).all(axis=1))
        log.error("the model gave scores that are not finite for %d caption(s) of this batch", len(bad_rows))
        row = 0
        for job, ids in live:
            if any(row <= bad < row + len(job.captions) for bad in bad_rows):
                job.future.set_exception(ModelFault("the model gave scores that are not finite for this request"))
            else:
                self._search(searcher, [(job, ids)])
            row += len(job.captions)


def joined(parts: list[Job]) -> Future[Answer]:
    """One answer from the parts of a request split into batches (rows in order). The parts of a request are
    scored by one gallery version or the request fails (a swap landed between them): never half of each."""
    whole: Future[Answer] = Future()
    remaining = [len(parts)]
    lock = threading.Lock()

    def part_done(_future: Future[Answer]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] or not whole.set_running_or_notify_cancel():  # more to come, or the client left
                return
        failed = [part.future for part in parts if part.future.cancelled() or part.future.exception() is not None]
        if failed:
            whole.set_exception(failed[0].exception() or NotReady("the request was cancelled"))
            return
        answers = [part.future.result() for part in parts]
        if len({answer.version for answer in answers}) > 1:
            whole.set_exception(NotReady("the gallery was swapped while this request was answered; send it again"))
            return
        indices, scores = (np.concatenate([getattr(a, name) for a in answers]) for name in ("indices", "scores"))
        whole.set_result(Answer(indices, scores, answers[0].ids, answers[0].version))

    def client_left(future: Future[Answer]) -> None:
        if future.cancelled():  # the parts not scored yet are skipped
            for part in parts:
                part.future.cancel()

    whole.add_done_callback(client_left)
    for part in parts:
        part.future.add_done_callback(part_done)
    return whole


def broken_part(searcher: Searcher, block: int = 4096) -> str | None:
    """What makes ``searcher`` give non-finite scores whatever it is asked: its gallery's embeddings, or the model
    on a plain caption; None when both are sound (then only some captions are to blame)."""
    gallery = getattr(searcher, "gallery", None)
    embeddings = getattr(gallery, "embeddings", None)
    if isinstance(embeddings, np.ndarray):
        for start in range(0, len(embeddings), block):
            finite = np.isfinite(embeddings[start : start + block]).reshape(min(block, len(embeddings) - start), -1)
            if not finite.all():
                row = start + int(np.flatnonzero(~finite.all(axis=1))[0])
                return f"the gallery's embeddings hold NaN or infinite values (image {row}); re-index it or swap " \
                       "in a good version"
    try:
        probe = searcher.top_k(searcher.encode([searcher.tokenize(["a photo"])]), 1)
    except Exception as exc:  # noqa: BLE001 - a model that cannot score a plain caption is broken too
        return f"the model fails on a plain caption ({type(exc).__name__})"
    if not np.isfinite(probe.scores).all():
        return "the model gives scores that are not finite for a plain caption; the bundle is damaged"
    return None
