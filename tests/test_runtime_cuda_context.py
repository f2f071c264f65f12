"""The native TensorRT backend's CUDA context: pushed around each use on the calling thread, owners released
newest first with the context current, the primary context let go last, and CUDA failures as one-line errors.

pycuda and a GPU are absent here, so a small recording driver (the calls pycuda.driver offers: init,
Device.count, Device, retain_primary_context, push, Context.pop, detach) stands in for them: the test checks
the order itmrt issues the calls in, not CUDA. The TensorRT backend's own release order is checked the same
way, with objects that record when they are dropped.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from itmrt.engine.cuda_context import CudaContext, close_all, shared_context
from itmrt.errors import ItmrtError
from itmrt.runtime.backend_trt import TrtBackend


class Log(list[str]):
    pass


def recording_driver(log: Log, devices: int = 1, fail_init: bool = False) -> Any:
    class Context:
        @staticmethod
        def pop() -> None:
            log.append(f"pop@{threading.current_thread().name}")

    class PrimaryContext:
        handle = 0x1234

        def push(self) -> None:
            log.append(f"push@{threading.current_thread().name}")

        def detach(self) -> None:
            log.append("detach")

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        @staticmethod
        def count() -> int:
            return devices

        def retain_primary_context(self) -> PrimaryContext:
            log.append(f"retain {self.index}")
            return PrimaryContext()

    class Driver:
        pass

    def init() -> None:
        if fail_init:
            raise RuntimeError("cuInit failed: no CUDA-capable device is detected")
        log.append("init")

    driver = Driver()
    driver.init = init  # type: ignore[attr-defined]
    driver.Device = Device  # type: ignore[attr-defined]
    driver.Context = Context  # type: ignore[attr-defined]
    return driver


def test_context_is_current_only_around_each_use_on_any_thread() -> None:
    log = Log()
    context = CudaContext(recording_driver(log), 0)
    assert log == ["init", "retain 0"]
    with context.current():
        log.append("work")
    with pytest.raises(ValueError), context.current():
        raise ValueError("a failure inside still pops")
    done = threading.Event()

    def use_elsewhere() -> None:
        with context.current():
            log.append("work elsewhere")
        done.set()

    worker = threading.Thread(target=use_elsewhere, name="worker")
    worker.start()
    worker.join()
    assert done.is_set()
    main = threading.current_thread().name
    assert log[2:] == [
        f"push@{main}",
        "work",
        f"pop@{main}",
        f"push@{main}",
        f"pop@{main}",
        "push@worker",
        "work elsewhere",
        "pop@worker",
    ]


def test_close_releases_owners_newest_first_with_the_context_current_then_detaches() -> None:
    """...and then pops the entry pycuda's detach leaves on the driver's stack (cuDevicePrimaryCtxRelease
    does not pop what detach pushed)."""
    log = Log()
    context = CudaContext(recording_driver(log), 0, pop_current=lambda handle: log.append(f"pop stale {handle:#x}"))
    log.clear()
    first = context.own(lambda: log.append("release image encoder"))
    context.own(lambda: log.append("release text encoder"))
    context.own(lambda: log.append("release scorer"))
    context.release(first)  # closed early by its owner
    context.close()
    context.close()  # idempotent
    main = threading.current_thread().name
    assert log == [
        f"push@{main}",
        "release image encoder",
        f"pop@{main}",
        f"push@{main}",
        "release scorer",
        "release text encoder",
        f"pop@{main}",
        "detach",
        "pop stale 0x1234",
    ]
    with pytest.raises(ItmrtError, match="CUDA context was closed"), context.current():
        pass


def test_a_failing_release_does_not_stop_the_others_and_is_one_line() -> None:
    log = Log()
    context = CudaContext(recording_driver(log), 0)

    def broken() -> None:
        raise RuntimeError("cuMemFree failed: an illegal memory access was encountered\nmore detail")

    context.own(lambda: log.append("released"))
    context.own(broken)
    with pytest.raises(ItmrtError, match="^CUDA failed while releasing .*cuMemFree failed") as error:
        context.close()
    assert "\n" not in str(error.value) and "released" in log and log[-1] == "detach"


def test_cuda_start_failures_are_one_line_errors() -> None:
    with pytest.raises(ItmrtError, match=r"CUDA could not start \(cuInit failed.*use --backend ort"):
        CudaContext(recording_driver(Log(), fail_init=True), 0)
    with pytest.raises(ItmrtError, match="CUDA device 2 does not exist here \\(1 visible"):
        CudaContext(recording_driver(Log(), devices=1), 2)


def test_shared_contexts_are_one_per_device_and_closed_together() -> None:
    log = Log()
    driver = recording_driver(log, devices=2)
    try:
        zero = shared_context(0, driver)
        assert shared_context(0, driver) is zero and shared_context(1, driver) is not zero
    finally:
        close_all()
    assert log.count("detach") == 2 and zero.closed


class Dropped:
    def __init__(self, name: str, log: Log) -> None:
        self.name, self.log = name, log

    def __del__(self) -> None:
        self.log.append(f"drop {self.name}")

    def free(self) -> None:
        self.log.append(f"free {self.name}")


def test_trt_backend_drops_context_engine_runtime_then_memory_and_stream() -> None:
    log = Log()
    backend = TrtBackend.__new__(TrtBackend)
    backend.__dict__.update(
        stream=Dropped("stream", log),
        _runtime=Dropped("runtime", log),
        engine=Dropped("engine", log),
        context=Dropped("execution context", log),
        _device={"scores": Dropped("device buffer", log)},
        _host={},
        _events=None,
    )
    backend._drop_all()
    assert log == [
        "drop execution context",
        "drop engine",
        "drop runtime",
        "free device buffer",
        "drop device buffer",
        "drop stream",
    ]
