"""Native TensorRT backend (TensorRT 10.x / 11.x Python API, pycuda for memory, streams and the context).

Both packages are optional (``itmrt[trt]``, or JetPack's TensorRT on a
Jetson): they are imported when a backend is created, and its tests skip
where they are absent.

Per engine: one execution context, one CUDA stream, device buffers grown to
the largest shapes seen (allocated once, reused by every call), pinned host
staging buffers, asynchronous copies in and out, and a pair of CUDA events
that time the GPU work of each call (:attr:`TrtBackend.gpu_seconds`). Input
shapes are set per call and checked against the profile first, so a batch or
caption beyond the profile is a one-line error instead of a TensorRT failure.

The CUDA context is the device's primary context, made current around each
call (:mod:`itmrt.engine.cuda_context`), so a backend can be called from any
thread (one call at a time: TensorRT's execution context is not thread-safe).
:meth:`TrtBackend.close` frees everything in TensorRT's order - execution
context, engine, runtime - then the buffers and the stream, with the context
current; what is still open at exit is closed the same way.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.bundle.folder import BundleInfo
from itmrt.bundle.manifest import GraphEntry
from itmrt.bundle.names import MAX_LENGTH
from itmrt.bundle.traits import bundle_traits
from itmrt.engine.cuda_context import CudaContext, cuda_error, shared_context
from itmrt.errors import ItmrtError
from itmrt.optional import require_all
from itmrt.runtime.runner import Runner, TensorInfo
from itmrt.runtime.static_shapes import StaticPadding


def _import_tensorrt() -> tuple[Any, Any]:
    trt, cuda = require_all(["tensorrt", "pycuda.driver"], "the TensorRT backend (--backend trt)")
    return trt, cuda


def _dims(dims: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (indexed: the type stubs do not declare it iterable)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def lean_runtime_for(
    engine: str, excludes_lean_runtime: bool, tensorrt_version: str, environ: dict[str, str] | None = None
) -> Path | None:
    """The lean runtime library an engine built with ``--exclude-lean-runtime`` loads through: the user's
    ``ITMRT_TRT_LEAN_RUNTIME`` (never a path from the bundle); a one-line error when it is not set."""
    from itmrt.engine.tensorrt_api import LEAN_RUNTIME_ENV

    if not excludes_lean_runtime:
        return None
    value = (os.environ if environ is None else environ).get(LEAN_RUNTIME_ENV)
    if not value:
        raise ItmrtError(
            f"engine {engine} was built without its lean runtime: set {LEAN_RUNTIME_ENV} to TensorRT "
            f"{tensorrt_version}'s lean runtime library (libnvinfer_lean), or rebuild without --exclude-lean-runtime"
        )
    return Path(value)


class TrtBackend(Runner):
    """A deserialised engine with its context, stream and reusable buffers."""

    # The order :meth:`close` drops what the backend holds: TensorRT objects before their factories,
    # then device and pinned host memory, then the stream.
    RELEASE_ORDER = ("context", "engine", "_runtime", "_device", "_host", "_events", "stream")

    def __init__(
        self,
        engine_path: Path,
        *,
        device: int = 0,
        dla_core: int | None = None,
        host_code: bool = False,
        cuda_context: CudaContext | None = None,
        lean_runtime: Path | None = None,
        graph: GraphEntry | None = None,
        unpadded: frozenset[str] = frozenset(),
    ) -> None:
        trt, cuda = _import_tensorrt()
        self._trt, self._cuda = trt, cuda
        self.name = f"trt:{engine_path.name}"
        self._lock = threading.Lock()
        self._cuda_context = cuda_context or shared_context(device, cuda)
        self.gpu_seconds = 0.0  # GPU time of every run so far (CUDA events around the engine's work)
        self._device: dict[str, Any] = {}
        self._device_bytes: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        with self._cuda_context.current():
            try:
                self._open(engine_path, dla_core, host_code, lean_runtime)
            except ItmrtError:
                self._drop_all()
                raise
            except Exception as exc:  # noqa: BLE001 - TensorRT or pycuda failures
                self._drop_all()
                raise cuda_error(f"loading {engine_path.name}", exc) from None
        self._handle = self._cuda_context.own(self._drop_all)
        # a static profile (a DLA engine's) takes smaller batches and shorter captions padded up to it
        profile = {name: tuple(_dims(shape) for shape in shapes) for name, shapes in self._profile.items()}
        self._padding = StaticPadding.for_engine(graph, profile, unpadded) if graph is not None else None

    def _open(self, engine_path: Path, dla_core: int | None, host_code: bool, lean_runtime: Path | None) -> None:
        from itmrt.engine.tensorrt_api import open_runtime

        trt, cuda = self._trt, self._cuda
        self._runtime = open_runtime(host_code=host_code, dla_core=dla_core, lean_runtime=lean_runtime)
        engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise ItmrtError(
                f"TensorRT cannot deserialise {engine_path} (truncated, or built for another GPU or TensorRT); "
                "rebuild it with `itmrt build`"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream()
        self._events = (cuda.Event(), cuda.Event())
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._profile = {n: engine.get_tensor_profile_shape(n, 0) for n in self.input_names}

    @classmethod
    def from_bundle(cls, bundle: BundleInfo, component: str, precision: str, device: int = 0) -> TrtBackend:
        """The engine of ``component`` at ``precision``, after checking it was built for this TensorRT and
        for the GPU this backend runs on (CUDA device ``device``, after ``CUDA_VISIBLE_DEVICES``)."""
        from itmrt.engine.compat import DeviceInfo, check_engine, this_platform
        from itmrt.engine.settings import carries_host_code
        from itmrt.machine.jetson import detect_jetson

        bundle.engine_file(component, precision)  # was it built at all, and is the file intact?
        trt, cuda = _import_tensorrt()
        context = shared_context(device, cuda)
        major, minor = context.device.compute_capability()
        system, arch = this_platform()
        integrated = bool(context.device.get_attribute(cuda.device_attribute.INTEGRATED))
        here = DeviceInfo(str(trt.__version__), str(context.device.name()), f"{major}.{minor}", system, arch,
                          integrated or detect_jetson() is not None)
        path = check_engine(bundle.path, bundle.manifest, precision, component, here)
        entry = bundle.engine_record(component, precision)
        assert entry is not None  # check_engine found it
        host_code = carries_host_code(entry.builder.get("set_flags") or ())
        lean = lean_runtime_for(entry.file, entry.exclude_lean_runtime, entry.tensorrt_version)
        return cls(path, device=device, dla_core=entry.dla_core, host_code=host_code, cuda_context=context,
                   lean_runtime=lean, graph=bundle.manifest.graph(component),
                   unpadded=frozenset() if bundle_traits(bundle.manifest).caption_buckets else frozenset({MAX_LENGTH}))

    def inputs(self) -> list[TensorInfo]:
        """Inputs with the engine's dtypes; a dynamic axis (-1 in the engine) is None."""
        return [
            TensorInfo(name, self._dtypes[name].name,
                       tuple(None if d < 0 else d for d in _dims(self.engine.get_tensor_shape(name))))
            for name in self.input_names
        ]

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        low, _opt, high = (_dims(s) for s in self._profile[name])
        if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
            raise ItmrtError(
                f"input '{name}' of shape {shape} is outside the engine's optimisation profile "
                f"(min {low}, max {high}); use smaller batches or shorter captions, or rebuild with a larger profile"
            )

    def _buffer(self, name: str, nbytes: int) -> Any:
        """Device buffer for ``name`` holding at least ``nbytes``; grown (never shrunk) when needed."""
        if self._device_bytes.get(name, -1) < nbytes:
            old = self._device.pop(name, None)
            if old is not None:
                old.free()
            self._device[name] = self._cuda.mem_alloc(max(nbytes, 1))
            self._device_bytes[name] = nbytes
            self.context.set_tensor_address(name, int(self._device[name]))
        return self._device[name]

    def _pinned(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        host = self._host.get(name)
        if host is None or host.size < size:
            host = self._cuda.pagelocked_empty(max(size, 1), self._dtypes[name])
            self._host[name] = host
        return host[:size].reshape(shape)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.closed:
            raise ItmrtError(f"{self.name} was closed; open the runtime again")
        for name in self.input_names:
            if name not in feeds:
                raise ItmrtError(f"engine {self.name} needs input '{name}'")
        real: dict[str, int] = {}
        if self._padding is not None:
            feeds, real = self._padding.pad(feeds)
        with self._lock, self._cuda_context.current():
            try:
                outputs = self._run(feeds)
            except ItmrtError:
                raise
            except Exception as exc:  # noqa: BLE001 - pycuda / TensorRT failures
                raise cuda_error(f"running {self.name}", exc) from None
        return self._padding.cut(self.output_names, outputs, real) if self._padding is not None else outputs

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cuda = self._cuda
        for name in self.input_names:
            value = np.asarray(feeds[name], dtype=self._dtypes[name])
            self._check_shape(name, value.shape)
            self.context.set_input_shape(name, value.shape)
            staged = self._pinned(name, value.shape)
            staged[...] = value
            cuda.memcpy_htod_async(self._buffer(name, staged.nbytes), staged, self.stream)
        shapes = {n: _dims(self.context.get_tensor_shape(n)) for n in self.output_names}
        for name in self.output_names:
            self._buffer(name, int(np.prod(shapes[name])) * self._dtypes[name].itemsize)
        start, end = self._events
        start.record(self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise ItmrtError(f"TensorRT failed to run {self.name}")
        end.record(self.stream)
        results = []
        for name in self.output_names:
            host = self._pinned(name, shapes[name])
            cuda.memcpy_dtoh_async(host, self._device[name], self.stream)
            results.append(host)
        self.stream.synchronize()
        self.gpu_seconds += start.time_till(end) / 1e3
        return [r.astype(np.float32) if r.dtype == np.float16 else r.copy() for r in results]

    def _drop_all(self) -> None:
        """Drop every TensorRT and CUDA object in :data:`RELEASE_ORDER` (the context must be current)."""
        for attribute in self.RELEASE_ORDER:
            value = self.__dict__.pop(attribute, None)
            while isinstance(value, dict) and value:
                _name, item = value.popitem()
                free = getattr(getattr(item, "base", item), "free", None)  # pinned arrays: their host allocation
                if callable(free):
                    free()
                del item, free
            del value  # the last reference: dropped here, in this order

    def close(self) -> None:
        """Free the engine, its context, buffers and stream now (later calls fail with a clear error)."""
        handle = self.__dict__.pop("_handle", None)
        if handle is not None:
            with self._lock:
                self._cuda_context.release(handle)

    @property
    def closed(self) -> bool:
        return "_handle" not in self.__dict__
