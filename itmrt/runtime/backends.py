"""One small backend interface and its ONNX Runtime implementation.

A backend runs one graph of a bundle: named float32/int32 numpy arrays in, the
graph's outputs (as float32 numpy arrays) out. Inputs are cast to the dtype the
graph declares, so an fp16 graph whose inputs are float16 is fed correctly by
callers that only know float32. The native TensorRT backend
(:mod:`itmrt.runtime.backend_trt`) implements the same interface; both are
runners (:class:`itmrt.runtime.runner.Runner`: open, infer, close, input metadata),
as the PyTorch reference is on the torch side. Which ONNX
Runtime execution providers a session gets, and their options, is decided in
:mod:`itmrt.runtime.providers`.

onnxruntime is imported when a session is created, not at module import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from itmrt.bundle.folder import BundleInfo
from itmrt.bundle.manifest import GraphEntry
from itmrt.bundle.names import BACKENDS, ORT_TENSORRT_CACHE_DIR, BackendName, Precision
from itmrt.errors import ItmrtError
from itmrt.runtime.providers import (
    DEFAULT_PROVIDER_ORDER,
    PROVIDER_ALIASES,
    TENSORRT,
    SessionSettings,
    default_trt_cache_dir,
    graph_precision,
    prepare_cache_dir,
    provider_options,
    resolve_providers,
    tensorrt_typing_problem,
)
from itmrt.runtime.runner import Runner, TensorInfo
from itmrt.runtime.sessions import create_session

__all__ = [
    "BACKENDS",
    "DEFAULT_PROVIDER_ORDER",
    "PROVIDER_ALIASES",
    "Backend",
    "OrtBackend",
    "SessionSettings",
    "open_backend",
    "resolve_providers",
]

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


class OrtBackend(Runner):
    """One ONNX Runtime inference session over one graph file.

    ``graph_entry`` (the graph's manifest entry) and ``cache_dir`` configure ONNX Runtime's TensorRT
    provider when it is asked for. :attr:`providers` are the providers the session really uses:
    ONNX Runtime falls back to fewer when one fails to load.
    """

    def __init__(
        self,
        path: Path,
        settings: SessionSettings | None = None,
        graph_entry: GraphEntry | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        settings = settings or SessionSettings()
        self.requested_providers = resolve_providers(settings.providers, ort.get_available_providers())
        if TENSORRT in self.requested_providers:
            problem = tensorrt_typing_problem(ort.__version__, graph_precision(path))
            if problem is not None:
                raise ItmrtError(f"{path.name}: {problem}")
            prepare_cache_dir(settings.trt_cache_dir or cache_dir or path.parent / ORT_TENSORRT_CACHE_DIR)
        options = provider_options(
            self.requested_providers,
            settings,
            graph_entry,
            cache_dir or path.parent / ORT_TENSORRT_CACHE_DIR,
            ort.__version__,
        )
        self.session = create_session(
            path,
            providers=self.requested_providers,
            provider_options=options,
            threads=settings.intra_op_threads,
            optimization=settings.optimization,
        )
        self.providers = list(self.session.get_providers())
        self.name = f"ort:{path.name}"
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self._input_types: dict[str, Any] = {i.name: _ONNX_TYPES.get(i.type) for i in inputs}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def inputs(self) -> list[TensorInfo]:
        return [
            TensorInfo(i.name, np.dtype(self._input_types[i.name]).name if self._input_types[i.name] else str(i.type),
                       tuple(d if isinstance(d, (int, str)) else None for d in i.shape))
            for i in self.session.get_inputs()
        ]

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
        cache = default_trt_cache_dir(bundle.manifest_sha256, precision)
        path, entry = bundle.graph_file(component, precision), bundle.manifest.graph(component)
        opened = OrtBackend(path, settings, entry, cache)
        _check_signature(opened, entry, path, component)
        return opened
    if backend == BackendName.TRT:
        from itmrt.runtime.backend_trt import TrtBackend

        return TrtBackend.from_bundle(bundle, component, precision, device=(settings or SessionSettings()).device)
    raise ItmrtError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _check_signature(backend: OrtBackend, entry: GraphEntry, path: Path, component: str) -> None:
    """Refuse a graph whose input and output names are not the ones the manifest records for ``component``
    (another component's graph under its name, hash updated): it would fail deep inside ONNX Runtime."""
    found = (sorted(backend.input_names), sorted(backend.output_names))
    recorded = (sorted(entry.input_names()), sorted(spec.name for spec in entry.outputs))
    if found != recorded:
        def names(side: tuple[list[str], list[str]]) -> str:
            return f"takes {', '.join(side[0]) or 'nothing'} and gives {', '.join(side[1]) or 'nothing'}"

        raise ItmrtError(f"{path} {names(found)}, but the manifest's {component} {names(recorded)}: it is not "
                         "this bundle's graph; run `itmrt check` on the bundle, or export it again")

