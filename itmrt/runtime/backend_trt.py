"""Native TensorRT backend (TensorRT 10.x / 11.x Python API, pycuda for memory and streams).

Both packages are optional (``itmrt[trt]``, or JetPack's TensorRT on a
Jetson): they are imported when a backend is created, and its tests skip
where they are absent.

Per engine: one execution context, one CUDA stream, device buffers sized for
the optimisation profile's maximum shapes (allocated once, reused by every
call), pinned host staging buffers, asynchronous copies in and out. Input
shapes are set per call and checked against the profile first, so a batch or
caption beyond the profile is a one-line error instead of a TensorRT failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.optional import require_all
from itmrt.bundle.folder import BundleInfo


def _import_tensorrt() -> tuple[Any, Any]:
    trt, _context, cuda = require_all(["tensorrt", "pycuda.autoinit", "pycuda.driver"], "the TensorRT backend (--backend trt)")
    return trt, cuda


class TrtBackend:
    """A deserialised engine with its context, stream and reusable buffers."""

    def __init__(self, engine_path: Path) -> None:
        trt, cuda = _import_tensorrt()
        self._trt, self._cuda = trt, cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise ItmrtError(
                f"TensorRT cannot deserialise {engine_path} (truncated, or built for another GPU or TensorRT); "
                "rebuild it with `itmrt build`"
            )
        self._runtime, self.engine = runtime, engine
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream()
        self.name = f"trt:{engine_path.name}"
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._profile = {n: engine.get_tensor_profile_shape(n, 0) for n in self.input_names}
        self._device: dict[str, Any] = {}
        self._device_bytes: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}

    @classmethod
    def from_bundle(cls, bundle: BundleInfo, component: str, precision: str) -> TrtBackend:
        """The engine of ``component`` at ``precision``, after checking it was built for this TensorRT and GPU."""
        from itmrt.engine.compat import DeviceInfo, check_engine
        from itmrt.engine.doctor import gpus

        bundle.engine_file(component, precision)  # was it built at all, and is the file intact?
        trt, _cuda = _import_tensorrt()
        found = gpus()
        if not found:
            raise ItmrtError("the TensorRT backend needs an NVIDIA GPU and none was found; use --backend ort")
        here = DeviceInfo(str(trt.__version__), found[0].name, found[0].compute_capability)
        return cls(check_engine(bundle.path, bundle.manifest, precision, component, here))

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        low, _opt, high = (tuple(int(x) for x in s) for s in self._profile[name])
        if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
            raise ItmrtError(
                f"input '{name}' of shape {shape} is outside the engine's optimisation profile "
                f"(min {low}, max {high}); use smaller batches or shorter captions, or rebuild with a larger profile"
            )

    def _buffer(self, name: str, nbytes: int) -> Any:
        """Device buffer for ``name`` holding at least ``nbytes``; grown (never shrunk) when needed."""
        if self._device_bytes.get(name, -1) < nbytes:
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
        cuda = self._cuda
        for name in self.input_names:
            if name not in feeds:
                raise ItmrtError(f"engine {self.name} needs input '{name}'")
            value = np.asarray(feeds[name], dtype=self._dtypes[name])
            self._check_shape(name, value.shape)
            self.context.set_input_shape(name, value.shape)
            staged = self._pinned(name, value.shape)
            staged[...] = value
            cuda.memcpy_htod_async(self._buffer(name, staged.nbytes), staged, self.stream)
        results = []
        shapes = {n: tuple(int(x) for x in self.context.get_tensor_shape(n)) for n in self.output_names}
        for name in self.output_names:
            self._buffer(name, int(np.prod(shapes[name])) * self._dtypes[name].itemsize)
        if not self.context.execute_async_v3(self.stream.handle):
            raise ItmrtError(f"TensorRT failed to run {self.name}")
        for name in self.output_names:
            host = self._pinned(name, shapes[name])
            cuda.memcpy_dtoh_async(host, self._device[name], self.stream)
            results.append(host)
        self.stream.synchronize()
        return [r.astype(np.float32) if r.dtype == np.float16 else r.copy() for r in results]
