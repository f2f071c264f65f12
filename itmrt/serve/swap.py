"""Hot swap: a new gallery (or bundle) version on disk is picked up whole by a running ``itmrt serve``.

The service's gallery folder is watched (the folder and every file in it:
inode, size, mtime and ctime, every ``watch_s`` seconds); a change, SIGHUP, or
``POST /v2/repository/models/text_to_image/load`` makes the :class:`Reloader`
open what is on disk now, on its own thread, the way the service opened it at
start: the gallery's embeddings copied into memory as they are hashed and
checked (:func:`itmrt.runtime.gallery.copy_embeddings`), the bundle tied to
them by the image encoder that made them. Only a version that passes every
check is handed to the worker (:meth:`itmrt.serve.batcher.Batcher.swap`),
which answers from it from its next batch on; requests in the batch being
scored finish on the old version, no request is answered from half of each, and
``/v2/health/ready`` stays true. A version that fails a check - a file changed
in place after indexing, a truncated file, a gallery of another image encoder -
is refused with one log line, and the service keeps answering from the version
it has (its own copy, which no change to the file reaches).

The runtime is kept when the new gallery is tied to the bundle already loaded
(``itmrt index --overwrite`` of the same bundle, engines added to it); a gallery
made by another bundle loads that bundle and warms it up on the reloader's
thread before it is handed over, while the worker keeps answering from the old
version (warmed on the worker, a bundle's 20 s warm-up left every request
waiting or refused with 429/504 meanwhile). New Ray actors of a sharded gallery
that keeps the loaded runtime still warm up on the worker, between batches:
their warm-up runs that runtime, which the worker is using.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from stat import S_ISDIR
from typing import Any

from itmrt.errors import first_line
from itmrt.serve.batcher import Batcher, SwapOutcome
from itmrt.serve.metrics import ServiceMetrics
from itmrt.serve.searcher import RuntimeSearcher

log = logging.getLogger("itmrt.serve")

FolderState = tuple[object, ...] | None
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 60.0
"""While the version in use is broken and the last one tried was refused: seconds to the next try (doubling)."""


def folder_state(folder: Path, subfolders: bool = False) -> FolderState:
    """What a change to ``folder`` or any file in it changes (None when it cannot be read); ``subfolders``: also
    any file in a folder inside it (a sharded gallery's shards: a file written in place changes no stat of the
    folder that holds it)."""
    try:
        top = os.stat(folder)
        entries = sorted(
            (entry.name, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
             folder_state(Path(entry.path)) if subfolders and S_ISDIR(stat.st_mode) else None)
            for entry in os.scandir(folder)
            for stat in (entry.stat(follow_symlinks=False),)
        )
    except OSError:
        return None
    return (top.st_ino, top.st_mtime_ns, top.st_ctime_ns, tuple(entries))


class RuntimeSource:
    """Where the service's gallery lives, and how to open it whole: gallery, bundle, runtime, searcher."""

    def __init__(self, gallery: Path, bundle: Path | None, load_options: dict[str, Any], on_long: Any,
                 warn: Callable[[str], None] | None) -> None:
        self.gallery, self.bundle = gallery, bundle
        self.load_options, self.on_long, self.warn = load_options, on_long, warn

    def state(self) -> FolderState:
        return folder_state(self.gallery)

    def open(self, previous: Any = None) -> tuple[RuntimeSearcher, bool, Callable[[], None] | None]:
        """(searcher, whether it needs a warm-up - a new runtime -, what to free once it is in use): the previous
        searcher's runtime is reused when the gallery is tied to its bundle."""
        from itmrt.runtime import load
        from itmrt.runtime.gallery import gallery_bundle, read_gallery

        gallery = read_gallery(self.gallery, in_memory=True)
        runtime = getattr(previous, "runtime", None)
        if runtime is not None and self._fits(gallery, runtime):
            return RuntimeSearcher(runtime, gallery, self.on_long, warn=self.warn), False, None
        bundle = self.bundle if self.bundle is not None else gallery_bundle(self.gallery).path
        fresh = load(bundle, warn=self.warn, **self.load_options)
        try:
            gallery.check_bundle(fresh.bundle)
            searcher = RuntimeSearcher(fresh, gallery, self.on_long, warn=self.warn)
        except BaseException:
            fresh.close()
            raise
        return searcher, True, (runtime.close if runtime is not None else None)

    def _fits(self, gallery: Any, runtime: Any) -> bool:
        if self.bundle is None and Path(gallery.bundle_path).resolve() != runtime.bundle.path.resolve():
            return False
        try:
            gallery.check_bundle(runtime.bundle)
        except Exception:  # noqa: BLE001 - another image encoder: the bundle on disk is loaded instead
            return False
        return True


class Reloader:
    """Watches a :class:`RuntimeSource` and swaps new versions into a :class:`Batcher` (see the module docstring)."""

    def __init__(self, source: RuntimeSource, batcher: Batcher, metrics: ServiceMetrics, watch_s: float = 1.0,
                 settle_s: float = 0.2) -> None:
        self.source, self.batcher, self.metrics = source, batcher, metrics
        self.watch_s, self.settle_s = watch_s, settle_s
        self.seen: FolderState = source.state()
        self._requests: list[tuple[str, Future[SwapOutcome]]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="itmrt-serve-reloader", daemon=True)
        self._retry_at: float | None = None  # see _retry_due
        self._retry_s = RETRY_FIRST_S

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def reload(self, why: str) -> Future[SwapOutcome]:
        """Open what is on disk now and swap it in (any thread, a signal handler too); the outcome's future."""
        future: Future[SwapOutcome] = Future()
        with self._lock:
            self._requests.append((why, future))
        self._wake.set()
        return future

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.watch_s if self.watch_s > 0 else None)
            self._wake.clear()
            if self._stop or not self.batcher.ready.is_set():
                continue
            with self._lock:
                requests, self._requests = self._requests, []
            state = self.source.state()
            retry = self._retry_due()
            if not requests and not retry and (state == self.seen or state is None):
                continue
            if not requests and state != self.seen:  # let a writer finish: the folder must hold still for settle_s
                threading.Event().wait(self.settle_s)
                if self.source.state() != state:
                    continue
            why = ", ".join(dict.fromkeys(why for why, _future in requests)) or (
                "the gallery folder changed" if state != self.seen else "again: the service is not ready")
            self.seen = state
            outcome = self._attempt(why)
            self._schedule_retry(outcome)
            for _why, future in requests:
                future.set_result(outcome)

    def _retry_due(self) -> bool:
        """Whether to open what is on disk again although nothing changed: the version in use broke (a file of
        it changed) and the last version tried was refused - perhaps by a passing fault, which left the
        service not ready until the next change on disk. Tried again after 2 s, then 4, 8, ... at most 60 s
        (each try verifies the whole gallery)."""
        if self.batcher.broken is None or self.batcher.unloaded:
            self._retry_at, self._retry_s = None, RETRY_FIRST_S
            return False
        return self._retry_at is not None and time.monotonic() >= self._retry_at

    def _schedule_retry(self, outcome: SwapOutcome) -> None:
        if outcome.error is None:
            self._retry_at, self._retry_s = None, RETRY_FIRST_S
            return
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(2 * self._retry_s, RETRY_MAX_S)

    def _attempt(self, why: str) -> SwapOutcome:
        current = self.batcher.searcher
        try:
            searcher, warm, retire = self.source.open(current)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong on disk, the service keeps its version
            reason = first_line(exc)
            self.metrics.swaps.labels("refused").inc()
            log.error("new version refused (%s): %s; still answering from gallery %s", why, reason,
                      getattr(current, "version", "?"))
            return SwapOutcome(error=reason)
        if warm and searcher.runtime is not getattr(current, "runtime", None):
            # A runtime of its own: warmed up here, while the worker answers from the version it has (a runtime
            # the old version shares - new Ray actors - is warmed up on the worker, between batches).
            try:
                searcher.warmup()
            except Exception as exc:  # noqa: BLE001 - a version that cannot warm up is refused, the old one stays
                searcher.discard()
                reason = f"the new version failed its warm-up: {type(exc).__name__}: {first_line(exc)}"
                self.metrics.swaps.labels("refused").inc()
                log.error("new version refused (%s): %s; still answering from gallery %s", why, reason,
                          getattr(current, "version", "?"))
                return SwapOutcome(error=reason)
            warm = False
        try:
            outcome = self.batcher.swap(searcher, warm, retire).result()
        except Exception as exc:  # noqa: BLE001 - the worker is gone (the service is stopping)
            return SwapOutcome(error=first_line(exc))
        if outcome.error is None:
            log.info("swapped in gallery %s (%s)", outcome.version, why)
        return outcome
