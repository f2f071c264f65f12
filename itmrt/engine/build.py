"""TensorRT engines from a bundle's precision graphs (TensorRT 10.x and 11.x Python API).

Precision is decided in the ONNX graph (FP16 tensors, INT8 Q/DQ pairs), so the
builder sets no precision flags (TensorRT 11 removed ``BuilderFlag.FP16``/``INT8``
and the INT8 calibrators; 10.x deprecated them) and creates a *strongly
typed* network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10.x;
TensorRT 11 networks are always strongly typed and the flag is ignored). What
the builder is told beyond the graph - TF32 off unless asked, version and
hardware compatibility, DLA, workspace, profiling verbosity - comes from
:mod:`itmrt.engine.settings`; the optimisation profile from the manifest's
shape ranges, a board preset and ``--shape`` (:mod:`itmrt.engine.profiles`);
the timing cache from the bundle (:mod:`itmrt.engine.timing_cache`).

After each build the engine is deserialised once to read what it needs on
the device (``device_memory_size_v2``) and, with detailed profiling
verbosity, the engine inspector's layer JSON, which is kept in the bundle
(:mod:`itmrt.engine.layers`). :func:`engine_entry` writes the manifest entry
(:class:`itmrt.bundle.manifest.EngineEntry`). ``itmrt build`` - the precision
graphs first, then these engines - is :func:`itmrt.build.orchestration.build_bundle`.

``tensorrt`` is imported lazily: everything else in itmrt works without it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itmrt.bundle.folder import bundle_file
from itmrt.bundle.manifest import (
    AxisRange,
    EngineEntry,
    GraphEntry,
    LayerInfo,
    Log,
    Manifest,
    ProfileShapes,
    Tf32Record,
    TimingCacheUse,
    read_manifest,
    report_replacement,
    timestamp,
    update_manifest,
)
from itmrt.bundle.names import BATCH_CAPTIONS, BATCH_IMAGES, engine_file, layer_info_file
from itmrt.documents import sha256_file
from itmrt.engine.compat import DeviceInfo, this_platform
from itmrt.engine.dla import (
    DlaPlacement,
    count_devices,
    dla_note,
    dla_refusal,
    dla_version_problem,
    network_placement,
    static_ranges,
)
from itmrt.engine.layers import matmul_node_names, parse_layer_json, summarize_layers
from itmrt.engine.profiles import Range, Shapes, board, estimate_peaks, fit_ranges, manifest_ranges, profile_shapes
from itmrt.engine.settings import (
    BuilderSettings,
    EngineOptions,
    apply_builder_settings,
    builder_settings,
    carries_host_code,
)
from itmrt.engine.tensorrt_api import (
    TensorRTUnavailable,
    device_memory_bytes,
    open_runtime,
    require_tensorrt,
    tensorrt_logger,
    version_tuple,
)
from itmrt.engine.timing_cache import attach_timing_cache, save_timing_cache, timing_cache_file
from itmrt.errors import ItmrtError
from itmrt.machine.gpus import gpu
from itmrt.machine.jetson import detect_jetson
from itmrt.optional import available
from itmrt.publish import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "EngineOptions",
    "TensorRTUnavailable",
    "build_engines",
    "build_target",
    "profile_shapes",
    "require_tensorrt",
]


@dataclass(frozen=True)
class BuildTarget:
    """The GPU an engine is built on, and whether it shares the system memory."""

    device: DeviceInfo
    unified_memory: bool


def build_target(trt_module: Any, device: int = 0) -> BuildTarget:
    """The CUDA device ``device`` (after ``CUDA_VISIBLE_DEVICES``) with the running TensorRT version."""
    found = gpu(device)
    if found is None:
        raise TensorRTUnavailable(
            f"no NVIDIA GPU {device} was found (pycuda and nvidia-smi see none; see CUDA_VISIBLE_DEVICES); "
            "engines are built on the GPU that runs them"
        )
    unified = bool(found.integrated) or detect_jetson() is not None
    system, arch = this_platform()
    here = DeviceInfo(str(trt_module.__version__), found.name, found.compute_capability, system, arch, unified)
    return BuildTarget(here, unified)


def device_info(trt_module: Any, device: int = 0) -> DeviceInfo:
    return build_target(trt_module, device).device


def _network_flags(trt_module: Any) -> int:
    if version_tuple(str(trt_module.__version__))[:1] >= (11,):
        return 0  # TensorRT 11: always strongly typed; STRONGLY_TYPED is deprecated and ignored
    return 1 << int(trt_module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _parser_errors(parser: trt.OnnxParser) -> str:
    messages = [str(parser.get_error(index).desc()) for index in range(parser.num_errors)]
    return "; ".join(messages[:3]) or "unknown parser error"


def build_serialized_engine(
    onnx_path: Path, shapes: Shapes, settings: BuilderSettings, timing_cache: Path | None, say: Log,
    read_cache: bool = True,
) -> tuple[bytes, str, DlaPlacement | None]:
    """Parse ``onnx_path`` into a strongly typed network and build it: the serialized engine, what
    became of the timing cache and, for a DLA build, where the builder places each network layer (a build
    that cannot work on the DLA is refused first, naming the layers: :func:`itmrt.engine.dla.dla_refusal`)."""
    import tensorrt as trt

    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        raise ItmrtError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {_parser_errors(parser)}")
    config = builder.create_builder_config()
    apply_builder_settings(trt, builder, config, settings)
    profile = builder.create_optimization_profile()
    for name, (low, mid, high) in shapes.items():
        profile.set_shape(name, trt.Dims(low), trt.Dims(mid), trt.Dims(high))
    config.add_optimization_profile(profile)
    placement = None
    if settings.dla_core is not None:
        placement = network_placement(config, network)
        refusal = dla_refusal(placement, "GPU_FALLBACK" in settings.set_flags)
        if refusal is not None:
            raise ItmrtError(f"{onnx_path.name}: {refusal}")
        note = dla_note(placement)
        if note is not None:
            say(f"{onnx_path.name}: {note}")
    attached = attach_timing_cache(config, timing_cache if read_cache else None, say)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ItmrtError(f"TensorRT could not build an engine from {onnx_path.name} (see TensorRT's messages above)")
    if timing_cache is not None:
        save_timing_cache(config, timing_cache)
    return bytes(memoryview(serialized)), attached.status, placement


def inspect_serialized(
    serialized: bytes, settings: BuilderSettings, lean_runtime: Path | None = None
) -> tuple[int, str | None]:
    """Device memory an execution context of the engine needs, and its layer JSON (detailed builds, and DLA
    builds, whose layers' devices are read from it). A plan without its lean runtime is loaded through
    ``lean_runtime``, as it will be at run time."""
    import tensorrt as trt

    runtime = open_runtime(
        host_code=carries_host_code(settings.set_flags), dla_core=settings.dla_core, lean_runtime=lean_runtime
    )
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise ItmrtError("TensorRT could not load the engine it has just built (see TensorRT's messages above)")
    layers = None
    if settings.profiling_verbosity == "DETAILED" or settings.dla_core is not None:
        layers = str(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return device_memory_bytes(engine), layers


def engine_ranges(
    folder: Path, manifest: Manifest, precision: str, options: EngineOptions, say: Log
) -> dict[str, Range]:
    """The axis ranges every engine's profile uses: the manifest's, fitted to a board, then ``--shape``."""
    ranges: dict[str, Range] = {}
    for entry in manifest.graphs.values():
        ranges.update(manifest_ranges(entry))
    preset = board(options.board) if options.board else None
    if preset is not None and preset.intermediate_mb is not None:
        graphs = {g: (manifest.graph_file(precision, g), entry) for g, entry in manifest.graphs.items()}
        for file, _entry in graphs.values():
            bundle_file(folder, manifest, file)  # inside the bundle, listed and intact before it is read
        ranges, peak = fit_ranges(folder, graphs, ranges, preset.intermediate_mb << 20)
        fitted = ", ".join(f"{axis} max {ranges[axis][2]}" for axis in (BATCH_IMAGES, BATCH_CAPTIONS) if axis in ranges)
        say(
            f"board {options.board}: {fitted}; largest intermediate {peak / 2**20:.1f} MB "
            f"(budget {preset.intermediate_mb} MB)"
        )
    if options.dla_core is not None:
        return static_ranges(ranges, options.axis_ranges)  # the DLA takes no dynamic dimension
    ranges.update(options.axis_ranges)
    return ranges


def effective_options(options: EngineOptions) -> EngineOptions:
    """``options`` with a board's workspace cap filled in when none was given."""
    preset = board(options.board) if options.board else None
    if preset is not None and options.workspace_mb is None and preset.workspace_mb is not None:
        return replace(options, workspace_mb=preset.workspace_mb)
    return options


@contextlib.contextmanager
def device_scope(device: int) -> Iterator[None]:
    """Build on CUDA device ``device``: its primary context current (pycuda) - TensorRT works on the
    current device. Device 0 needs no pycuda: it is the CUDA runtime's default."""
    if available("pycuda"):
        from itmrt.engine.cuda_context import shared_context

        with shared_context(device).current():
            yield
        return
    if device != 0:
        raise ItmrtError(
            f"building on CUDA device {device} needs pycuda (pip install pycuda), or CUDA_VISIBLE_DEVICES={device}"
        )
    yield


def engine_entry(
    folder: Path,
    relative: str,
    relative_graph: str,
    target: BuildTarget,
    shapes: Shapes,
    ranges: dict[str, Range],
    settings: BuilderSettings,
    options: EngineOptions,
    measured: Measured,
) -> EngineEntry:
    """The manifest entry of one engine: the one place that decides its fields."""
    here = target.device
    return EngineEntry(
        file=relative,
        sha256=sha256_file(folder / relative),
        graph_file=relative_graph,
        graph_sha256=sha256_file(folder / relative_graph),
        tensorrt_version=here.tensorrt_version,
        gpu_name=here.gpu_name,
        compute_capability=here.compute_capability,
        unified_memory=target.unified_memory,
        os=here.os,
        arch=here.arch,
        profile={name: ProfileShapes(min=s[0], opt=s[1], max=s[2]) for name, s in shapes.items()},
        axis_ranges={axis: AxisRange(min=r[0], opt=r[1], max=r[2]) for axis, r in sorted(ranges.items())},
        board=options.board,
        workspace_mb=settings.workspace_mb,
        builder=settings.as_dict(),
        tf32=measured.tf32,
        version_compatible=options.version_compatible,
        exclude_lean_runtime=options.exclude_lean_runtime,
        lean_runtime=str(options.lean_runtime) if options.lean_runtime is not None else None,
        hardware_compatibility=settings.hardware_compatibility,
        dla_core=settings.dla_core,
        gpu_fallback=options.gpu_fallback if settings.dla_core is not None else None,
        layer_devices=measured.layer_devices,
        device_memory_bytes=measured.device_memory_bytes,
        largest_intermediate_bytes=measured.largest_intermediate_bytes,
        layer_info=measured.layer_info,
        timing_cache=measured.timing_cache,
        built=timestamp(),
    )


def _save_layers(folder: Path, precision: str, graph: str, layers: str | None, onnx_path: Path) -> LayerInfo | None:
    if layers is None:
        return None
    relative = layer_info_file(precision, graph)
    atomic_write_text(folder / relative, layers)
    try:
        summary = summarize_layers(parse_layer_json(layers), matmul_node_names(onnx_path))
    except (ValueError, TypeError) as exc:
        summary = {"unreadable": str(exc)}
    return LayerInfo(file=relative, sha256=sha256_file(folder / relative), summary=summary)


def _layer_devices(placement: DlaPlacement | None, layers: str | None) -> dict[str, object] | None:
    """Engine layers on the DLA and on the GPU (from the inspector), with the builder's network placement."""
    if placement is None:
        return None
    devices: dict[str, object] = {"network_dla": len(placement.dla), "network_gpu": len(placement.gpu)}
    try:
        devices.update(count_devices(parse_layer_json(layers or "")["Layers"], set(placement.dla)))
    except (ValueError, TypeError) as exc:
        devices["unreadable"] = str(exc)
    return devices


@dataclass
class Measured:
    """What one build measured about its engine (recorded in its manifest entry)."""

    tf32: Tf32Record
    device_memory_bytes: int
    largest_intermediate_bytes: int
    layer_info: LayerInfo | None
    timing_cache: TimingCacheUse
    layer_devices: dict[str, object] | None = None  # DLA builds: engine layers on the DLA and on the GPU


@dataclass
class BuildContext:
    """What every engine of one ``build_engines`` call shares."""

    options: EngineOptions
    settings: BuilderSettings
    target: BuildTarget
    cache: Path | None
    ranges: dict[str, Range]
    tf32: dict[str, Tf32Record]
    read_cache: bool = True  # False: the bundle's cache file is not one its manifest vouches for


def _build_one(folder: Path, manifest: Manifest, precision: str, graph: str, context: BuildContext,
               say: Log) -> tuple[EngineEntry, int]:
    """Build, save and inspect one engine; its manifest entry and size."""
    relative_graph = manifest.graph_file(precision, graph)
    graph_entry: GraphEntry = manifest.graph(graph)
    shapes = profile_shapes(graph_entry, context.ranges)
    onnx_path = bundle_file(folder, manifest, relative_graph)
    engine, cache_status, placement = build_serialized_engine(onnx_path, shapes, context.settings, context.cache,
                                                              say, context.read_cache)
    context.read_cache = True  # from now on the file is this build's own
    relative = engine_file(precision, graph)
    atomic_write_bytes(folder / relative, engine)
    memory, layers = inspect_serialized(engine, context.settings, context.options.lean_runtime)
    peak = estimate_peaks(folder, {graph: (relative_graph, graph_entry)}, context.ranges)[graph]
    measured = Measured(
        tf32=context.tf32[graph],
        device_memory_bytes=memory,
        largest_intermediate_bytes=peak,
        layer_info=_save_layers(folder, precision, graph, layers, folder / relative_graph),
        timing_cache=TimingCacheUse(file=str(context.cache) if context.cache else None, status=cache_status),
        layer_devices=_layer_devices(placement, layers),
    )
    entry = engine_entry(folder, relative, relative_graph, context.target, shapes, context.ranges, context.settings,
                         context.options, measured)
    return entry, len(engine)


def build_engines(
    bundle: str | Path,
    precision: str,
    options: EngineOptions | None = None,
    log: Log | None = None,
    tf32: dict[str, Tf32Record] | None = None,
) -> Manifest:
    """Build one engine per graph of ``precision`` (its graphs must exist) and record them; return the manifest.

    ``tf32``: per graph, what TF32 costs (:func:`itmrt.precision.tf32.tf32_record`, which ``itmrt build``
    measures); without it each entry records only whether TF32 was allowed.
    """
    options = effective_options(options or EngineOptions())
    say: Log = log or (lambda _message: None)
    folder = Path(bundle)
    trt_module = require_tensorrt()
    target = build_target(trt_module, options.device)
    here = target.device
    dla_problem = (dla_version_problem(here.tensorrt_version, here.os, here.arch)
                   if options.dla_core is not None else None)
    if dla_problem is not None:
        raise ItmrtError(dla_problem)
    manifest = read_manifest(folder)
    settings = builder_settings(
        options, precision, unified_memory=target.unified_memory, compute_capability=here.compute_capability
    )
    cache = options.timing_cache or folder / timing_cache_file(
        here.tensorrt_version, here.gpu_name, here.compute_capability
    )
    context = BuildContext(
        options, settings, target, cache, engine_ranges(folder, manifest, precision, options, say),
        tf32 or {graph: Tf32Record(enabled=options.tf32) for graph in manifest.graphs},
        read_cache=options.timing_cache is not None or _bundle_cache_intact(folder, manifest, cache, say),
    )
    entries: dict[str, EngineEntry] = {}
    with device_scope(options.device):
        for graph in manifest.graphs:
            started = time.perf_counter()
            entries[graph], size = _build_one(folder, manifest, precision, graph, context, say)
            entry = entries[graph]
            say(
                f"engine {entry.file}: {size / 1e6:.1f} MB, needs "
                f"{(entry.device_memory_bytes or 0) / 2**20:.1f} MB of device "
                f"memory at the profile's maximum shapes; TensorRT {here.tensorrt_version}, {here.gpu_name} "
                f"({time.perf_counter() - started:.1f}s)"
            )

    def change(m: Manifest) -> None:
        for graph, entry in entries.items():
            report_replacement(m.engine(precision, graph), entry, f"{precision} {graph} engine", say)
            m.engines.setdefault(precision, {})[graph] = entry
            m.record_file(entry.file, entry.sha256)
            if entry.layer_info is not None:
                m.record_file(entry.layer_info.file, entry.layer_info.sha256)
        if options.timing_cache is None and cache.is_file():  # the bundle's own cache: listed like every file
            m.record_file(cache.relative_to(folder).as_posix(), sha256_file(cache))

    return update_manifest(folder, change)


def _bundle_cache_intact(folder: Path, manifest: Manifest, cache: Path, say: Log) -> bool:
    """Whether the bundle's timing cache may be read: absent, or listed in the manifest with its sha256
    (TensorRT deserializes it; a file the manifest does not vouch for is not read, and is replaced)."""
    if not cache.exists():
        return True
    try:
        bundle_file(folder, manifest, cache.relative_to(folder).as_posix())
    except ItmrtError as exc:
        say(f"timing cache {cache.name} not read ({exc}); this build starts a fresh one")
        return False
    return True
