"""The ``tensorrt`` module, imported lazily, and the one ``trt.Logger`` of the process.

TensorRT keeps a single logger pointer per process: a builder or runtime
created with a second logger object gets the warning "The logger passed into
createInferRuntime differs from one already provided ..." and uses the first
one anyway (NVIDIA/TensorRT#1475). Every builder, runtime and parser in itmrt
therefore takes :func:`tensorrt_logger`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from itmrt.errors import ItmrtError
from itmrt.optional import available, require

if TYPE_CHECKING:
    import tensorrt


class TensorRTUnavailable(ItmrtError):
    """TensorRT (or a GPU for it) is missing here: precision graphs can be made, engines cannot."""


def tensorrt_module() -> ModuleType | None:
    """The ``tensorrt`` module, or ``None`` when it is absent (type stubs alone are not TensorRT)."""
    return require("tensorrt") if available("tensorrt") else None


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` saying how to get it."""
    module = tensorrt_module()
    if module is None:
        raise TensorRTUnavailable(
            "the tensorrt Python package is not installed here (TensorRT 10.x or 11.x is needed to build engines; "
            "pip install 'itmrt[trt]', or JetPack's python3-libnvinfer on a Jetson)"
        )
    return module


@functools.lru_cache(maxsize=1)
def tensorrt_logger() -> tensorrt.Logger:
    """The process's ``trt.Logger`` (warnings and errors), created on first use."""
    trt = require_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; non-numeric parts end the tuple."""
    parts = []
    for part in version.strip().split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


LEAN_RUNTIME_ENV = "ITMRT_TRT_LEAN_RUNTIME"
"""Where the runtime finds the lean runtime library of an engine built with ``--exclude-lean-runtime``: set by the
user, never read from a bundle (a bundle must not make the program load code from outside its folder)."""
_LOADING_RUNTIMES: list[tensorrt.Runtime] = []  # kept for the process: each outlives the lean runtime it loaded


def open_runtime(
    *, host_code: bool, dla_core: int | None, lean_runtime: Path | None = None
) -> tensorrt.Runtime:
    """A ``trt.Runtime`` (the process's logger) that may load plans with host code (version-compatible
    plans carry the lean runtime, which a runtime refuses unless allowed) on DLA core ``dla_core``; with
    ``lean_runtime``, the runtime ``IRuntime::load_runtime`` loads from that library (plans built with
    ``kEXCLUDE_LEAN_RUNTIME`` load only through it)."""
    trt = require_tensorrt()
    runtime = trt.Runtime(tensorrt_logger())
    if lean_runtime is not None:
        loaded = runtime.load_runtime(str(lean_runtime))
        if loaded is None:
            raise ItmrtError(
                f"TensorRT could not load the lean runtime {lean_runtime} (not a libnvinfer_lean of a TensorRT "
                "version this one can load; see TensorRT's messages above)"
            )
        _LOADING_RUNTIMES.append(runtime)
        runtime = loaded
    if host_code:
        runtime.engine_host_code_allowed = True
    if dla_core is not None:
        cores = int(runtime.num_DLA_cores)
        if not 0 <= int(dla_core) < cores:
            raise ItmrtError(
                f"the engine runs on DLA core {dla_core} and this device has {cores} DLA core(s); rebuild it here"
            )
        runtime.DLA_core = int(dla_core)
    return runtime


def device_memory_bytes(engine: tensorrt.ICudaEngine) -> int:
    """What an execution context needs on the device (``device_memory_size_v2``; 10.0 has only the v1)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)
