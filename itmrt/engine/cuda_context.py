"""The CUDA context of the native TensorRT backend, managed explicitly (pycuda, not ``pycuda.autoinit``).

``pycuda.autoinit`` creates a context current on the importing thread only
and registers an exit handler that pops it; Python then frees TensorRT's
engines, execution contexts and pycuda's streams *after* their context is
gone: "Error Code 1: Cuda Runtime (context is destroyed)" or a segfault at
exit (NVIDIA/TensorRT#1632), which turns a good run into a failed exit.

Here each device's *primary* context (the one the CUDA runtime, hence
TensorRT, uses; ``Device.retain_primary_context``) is retained once per
process and made current only around each use (:meth:`CudaContext.current`:
push, work, pop, on the calling thread - so any thread may use it, and
pycuda's per-thread context stack is empty between calls). Whatever holds
device resources registers a release function; :meth:`CudaContext.close`
calls them newest first with the context current (a backend releases its
execution context, then its engine, then the runtime, then its buffers and
stream: TensorRT's rule that a factory outlives what it made - "How TensorRT
Works: Object Lifetimes"), and only then lets the context go. An exit handler
closes every context still open, before pycuda's own module cleanup.

Letting the primary context go: pycuda's ``Context.detach`` (``src/cpp/cuda.hpp``,
``context::detach`` with ``primary_context::detach_internal``), called when
the context is not current on this thread, pushes it (``cuCtxPushCurrent``)
and calls ``cuDevicePrimaryCtxRelease`` - which, the CUDA driver API says,
"does not pop the context from stack in any circumstances" (the "pop is
implicit in detach" of that code holds for ``cuCtxDetach``, not for a primary
context). So after ``detach`` one entry is left on the thread's driver
context stack; :meth:`CudaContext.close` pops it with ``cuCtxPopCurrent``
(:func:`driver_pop_current`), and only when it is the context just let go.

The driver module is passed in (``pycuda.driver`` in use), so the ordering
logic is testable without CUDA.
"""

from __future__ import annotations

import atexit
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from itmrt.errors import ItmrtError, first_line

Release = Callable[[], None]
PopCurrent = Callable[[int], None]


def driver_pop_current(handle: int) -> None:
    """``cuCtxPopCurrent`` on this thread if the current context is ``handle`` (what ``detach`` of a primary
    context leaves behind); nothing when libcuda cannot be loaded or another context is current."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return
    current = ctypes.c_void_p()
    if cuda.cuCtxGetCurrent(ctypes.byref(current)) == 0 and (current.value or 0) == handle:
        cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


def cuda_error(action: str, exc: BaseException) -> ItmrtError:
    """A one-line error for a CUDA (pycuda) failure while doing ``action``."""
    return ItmrtError(f"CUDA failed while {action}: {first_line(exc)}")


class CudaContext:
    """One device's primary context, retained for this process and pushed around each use."""

    def __init__(self, driver: Any, device_index: int = 0, pop_current: PopCurrent | None = None) -> None:
        self._driver = driver
        self._pop_current = pop_current or driver_pop_current
        try:
            driver.init()
            count = int(driver.Device.count())
        except Exception as exc:  # noqa: BLE001 - pycuda raises its own error types (cuInit failed, ...)
            raise ItmrtError(
                f"CUDA could not start ({first_line(exc)}); check the NVIDIA driver (nvidia-smi) or use --backend ort"
            ) from None
        if not 0 <= device_index < count:
            raise ItmrtError(
                f"CUDA device {device_index} does not exist here ({count} visible; see CUDA_VISIBLE_DEVICES)"
            )
        try:
            self.device = driver.Device(device_index)
            self._context = self.device.retain_primary_context()
        except Exception as exc:  # noqa: BLE001
            raise cuda_error(f"opening device {device_index}", exc) from None
        self.device_index = device_index
        self._lock = threading.RLock()
        self._releases: dict[int, Release] = {}
        self._ids = itertools.count()
        self.closed = False

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make the context current on this thread for the block (push, then pop even on error)."""
        if self.closed:
            raise ItmrtError("the CUDA context was closed; open the runtime again")
        self._context.push()
        try:
            yield
        finally:
            self._driver.Context.pop()

    def own(self, release: Release) -> int:
        """Register ``release`` (frees device resources; called with the context current); returns a handle."""
        with self._lock:
            handle = next(self._ids)
            self._releases[handle] = release
            return handle

    def release(self, handle: int) -> None:
        """Call one registered release now (the owner closes early) and forget it."""
        with self._lock:
            release = self._releases.pop(handle, None)
            if release is None or self.closed:
                return
            with self.current():
                release()

    def close(self) -> None:
        """Release every owner, newest first, with the context current; then let the primary context go."""
        with self._lock:
            if self.closed:
                return
            releases = [self._releases.pop(handle) for handle in sorted(self._releases, reverse=True)]
            failure: BaseException | None = None
            try:
                with self.current():
                    for release in releases:
                        try:
                            release()
                        except Exception as exc:  # noqa: BLE001 - release the others; report the first failure
                            failure = failure or exc
            finally:
                self.closed = True
                handle = int(self._context.handle)
                self._context.detach()  # pushes the context, releases it, and leaves it on the stack
                self._pop_current(handle)
            if failure is not None:
                raise cuda_error("releasing TensorRT and CUDA resources", failure) from None


_CONTEXTS: dict[int, CudaContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def shared_context(device_index: int = 0, driver: Any | None = None) -> CudaContext:
    """The process's context for CUDA device ``device_index`` (created on first use; pycuda by default)."""
    with _CONTEXTS_LOCK:
        context = _CONTEXTS.get(device_index)
        if context is None or context.closed:
            if driver is None:
                from itmrt.optional import require

                driver = require("pycuda.driver", "the TensorRT backend (--backend trt)")
            context = CudaContext(driver, device_index)
            _register_exit_handler()
            _CONTEXTS[device_index] = context
        return context


_EXIT_HANDLER: list[bool] = []


def _register_exit_handler() -> None:
    if not _EXIT_HANDLER:
        atexit.register(close_all)
        _EXIT_HANDLER.append(True)


def close_all() -> None:
    """Close every shared context (runs at exit; safe to call more than once)."""
    with _CONTEXTS_LOCK:
        contexts = list(_CONTEXTS.values())
        _CONTEXTS.clear()
    for context in contexts:
        context.close()
