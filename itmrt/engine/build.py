"""TensorRT engines from a bundle's precision graphs (TensorRT 10.x and 11.x Python API).

Precision is decided in the ONNX graph (FP16 tensors, INT8 Q/DQ pairs), so the
builder sets no precision flags (TensorRT 11 removed ``BuilderFlag.FP16``/``INT8``
and the INT8 calibrators; 10.x deprecated them) and creates a *strongly
typed* network: ``1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED`` where
the flag exists (networks are always explicit-batch since 10.0, so the
removed ``EXPLICIT_BATCH`` is never used). One optimisation profile per
engine comes from the manifest's ``shape_ranges`` (min/opt/max of batch and
caption length), overridable per axis; the workspace pool can be capped for
small boards; a timing cache file is read before and written after a build so
rebuilds are fast.

``tensorrt`` is imported lazily: everything else in itmrt works without it.
The engine entry written to the manifest records the TensorRT version, the GPU
name and compute capability (see :mod:`itmrt.engine.compat`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from itmrt.bundle.manifest import (
    EngineEntry,
    GraphEntry,
    Log,
    Manifest,
    ProfileShapes,
    read_manifest,
    report_replacement,
    timestamp,
    update_manifest,
)
from itmrt.bundle.names import engine_file
from itmrt.engine.compat import DeviceInfo
from itmrt.engine.doctor import gpus
from itmrt.errors import ItmrtError
from itmrt.io import atomic_write_bytes, sha256_file
from itmrt.optional import available, require

if TYPE_CHECKING:
    import tensorrt as trt

Range = tuple[int, int, int]


class TensorRTUnavailable(ItmrtError):
    """TensorRT (or a GPU for it) is missing here: precision graphs can be made, engines cannot."""


@dataclass
class EngineOptions:
    workspace_mb: int | None = None  # cap of the builder's workspace pool (small boards)
    axis_ranges: dict[str, Range] = field(default_factory=dict)  # axis name -> (min, opt, max) overrides
    timing_cache: Path | None = None


def require_tensorrt() -> ModuleType:
    if not available("tensorrt"):
        raise TensorRTUnavailable("the tensorrt Python package is not installed here (TensorRT 10.x or 11.x is needed to build engines)")
    return require("tensorrt")


def device_info(trt_module: ModuleType) -> DeviceInfo:
    found = gpus()
    if not found:
        raise TensorRTUnavailable("no NVIDIA GPU was found (pycuda and nvidia-smi see none); engines are built on the GPU that runs them")
    return DeviceInfo(str(trt_module.__version__), found[0].name, found[0].compute_capability)


def profile_shapes(graph_entry: GraphEntry, overrides: dict[str, Range]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """min/opt/max shape of every input: fixed dims as they are, symbolic ones from the ranges (or overrides)."""
    ranges: dict[str, Range] = {axis: (r.min, r.opt, r.max) for axis, r in graph_entry.shape_ranges.items()}
    ranges.update(overrides)
    shapes = {}
    for value in graph_entry.inputs:
        low: list[int] = []
        mid: list[int] = []
        high: list[int] = []
        for dim in value.shape:
            if isinstance(dim, int):
                low.append(dim)
                mid.append(dim)
                high.append(dim)
                continue
            if dim not in ranges:
                raise ItmrtError(f"input '{value.name}' has axis '{dim}' with no range; pass it with --shape {dim}=MIN:OPT:MAX")
            minimum, opt, maximum = ranges[dim]
            if not 1 <= minimum <= opt <= maximum:
                raise ItmrtError(f"axis '{dim}': need 1 <= min <= opt <= max, got {minimum}:{opt}:{maximum}")
            low.append(minimum)
            mid.append(opt)
            high.append(maximum)
        shapes[value.name] = (low, mid, high)
    return shapes


def _network_flags(trt_module: Any) -> int:
    flag = getattr(trt_module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)  # TensorRT 11: strongly typed is the only mode


def _parser_errors(parser: trt.OnnxParser) -> str:
    messages = [str(parser.get_error(index).desc()) for index in range(parser.num_errors)]
    return "; ".join(messages[:3]) or "unknown parser error"


def build_serialized_engine(
    onnx_path: Path, shapes: dict[str, tuple[list[int], list[int], list[int]]], options: EngineOptions
) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build it; returns the serialized engine."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        raise ItmrtError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {_parser_errors(parser)}")
    config = builder.create_builder_config()
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    for name, (low, mid, high) in shapes.items():
        profile.set_shape(name, trt.Dims(low), trt.Dims(mid), trt.Dims(high))
    config.add_optimization_profile(profile)
    cache_path = options.timing_cache
    previous = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(previous)
    config.set_timing_cache(timing_cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ItmrtError(f"TensorRT could not build an engine from {onnx_path.name} (see TensorRT's messages above)")
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def build_engines(bundle: str | Path, precision: str, options: EngineOptions | None = None, log: Log | None = None) -> Manifest:
    """Build one engine per graph of ``precision`` (its graphs must exist) and record them; return the manifest."""
    options = options or EngineOptions()
    say: Log = log or (lambda _message: None)
    folder = Path(bundle)
    trt_module = require_tensorrt()
    here = device_info(trt_module)
    manifest = read_manifest(folder)
    entries: dict[str, EngineEntry] = {}
    for graph, graph_entry in manifest.graphs.items():
        started = time.perf_counter()
        relative_graph = manifest.graph_file(precision, graph)
        shapes = profile_shapes(graph_entry, options.axis_ranges)
        engine = build_serialized_engine(folder / relative_graph, shapes, options)
        relative = engine_file(precision, graph)
        atomic_write_bytes(folder / relative, engine)
        entries[graph] = EngineEntry(
            file=relative,
            sha256=sha256_file(folder / relative),
            graph_file=relative_graph,
            graph_sha256=sha256_file(folder / relative_graph),
            tensorrt_version=here.tensorrt_version,
            gpu_name=here.gpu_name,
            compute_capability=here.compute_capability,
            profile={name: ProfileShapes(min=s[0], opt=s[1], max=s[2]) for name, s in shapes.items()},
            workspace_mb=options.workspace_mb,
            built=timestamp(),
        )
        say(f"engine {relative}: {len(engine) / 1e6:.1f} MB, TensorRT {here.tensorrt_version}, {here.gpu_name} ({time.perf_counter() - started:.1f}s)")

    def change(m: Manifest) -> None:
        for graph, entry in entries.items():
            report_replacement(m.engine(precision, graph), entry, f"{precision} {graph} engine", say)
            m.engines.setdefault(precision, {})[graph] = entry
            m.record_file(entry.file, entry.sha256)

    return update_manifest(folder, change)
