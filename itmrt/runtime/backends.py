"""One small backend interface and its ONNX Runtime implementation.

A backend runs one graph of a bundle: named float32/int32 numpy arrays in, the
graph's outputs (as float32 numpy arrays) out. Inputs are cast to the dtype the
graph declares, so an fp16 graph whose inputs are float16 is fed correctly by
callers that only know float32. The native TensorRT backend
(:mod:`itmrt.runtime.backend_trt`) implements the same interface.

onnxruntime is imported when a session is created, not at module import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.bundle.folder import BundleInfo
from itmrt.bundle.names import BACKENDS, BackendName, Precision
from itmrt.runtime.sessions import create_session

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(double)": np.float64,
}


class Backend(Protocol):
    """What the encoders and the scorer need from a compiled graph."""

    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph; outputs in ``output_names`` order, float32 (or the graph's integer type)."""
        ...


@dataclass
class SessionSettings:
    """ONNX Runtime session knobs the runtime exposes."""

    providers: Sequence[str] | None = None  # None: TensorRT, CUDA, CPU, those available
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    optimization: str = "all"  # disable | basic | extended | all


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """Execution providers to use: the user's (by full name or short alias) or the default order."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not requested:
        return [p for p in DEFAULT_PROVIDER_ORDER if p in available] or ["CPUExecutionProvider"]
    chosen = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise ItmrtError(
                f"execution provider {name!r} is not available in this onnxruntime "
                f"(available: {', '.join(available)}); install the matching onnxruntime build or name another"
            )
        chosen.append(full)
    return chosen


class OrtBackend:
    """One ONNX Runtime inference session over one graph file."""

    def __init__(self, path: Path, settings: SessionSettings | None = None) -> None:
        settings = settings or SessionSettings()
        self.providers = resolve_providers(settings.providers)
        self.session = create_session(
            path, providers=self.providers, threads=settings.intra_op_threads, optimization=settings.optimization
        )
        self.name = f"ort:{path.name}"
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self._input_types: dict[str, Any] = {i.name: _ONNX_TYPES.get(i.type) for i in inputs}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cast = {}
        for name, value in feeds.items():
            dtype = self._input_types.get(name)
            cast[name] = np.ascontiguousarray(value, dtype=dtype) if dtype is not None else value
        outputs = self.session.run(self.output_names, cast)
        return [o.astype(np.float32, copy=False) if o.dtype == np.float16 else o for o in outputs]


def open_backend(
    bundle: BundleInfo,
    component: str,
    backend: str = BackendName.ORT,
    precision: str = Precision.FP32,
    settings: SessionSettings | None = None,
) -> Backend:
    """The backend that runs ``component`` of ``bundle`` at ``precision``."""
    if backend == BackendName.ORT:
        return OrtBackend(bundle.graph_file(component, precision), settings)
    if backend == BackendName.TRT:
        from itmrt.runtime.backend_trt import TrtBackend

        return TrtBackend.from_bundle(bundle, component, precision)
    raise ItmrtError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
