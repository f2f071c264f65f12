"""What the TensorRT builder is told, decided from the command line and the machine without TensorRT.

:func:`builder_settings` turns :class:`EngineOptions` into a plain
:class:`BuilderSettings` (flag names to set and clear, memory pool, hardware
compatibility level, DLA core, profiling verbosity), which the manifest
records as it is; :func:`apply_builder_settings` hands it to an
``IBuilderConfig``. Sources for each choice (TensorRT ``include/NvInfer.h``,
10.3 and 11.1):

- ``BuilderFlag::kTF32`` "Allow (but not require) computations on tensors of
  type DataType::kFLOAT to use TF32 ... Enabled by default". Precision lives in
  the graph (strongly typed networks), but TF32 is not a type: it still rounds
  the inputs of float32 MatMuls and convolutions to 10-bit mantissas on Ampere
  and later. itmrt clears it for every engine (fp32 engines and the FP32
  islands of fp16 ones); ``--tf32`` is an opt-in whose parity is measured.
- ``kVERSION_COMPATIBLE`` (+ ``kEXCLUDE_LEAN_RUNTIME``, which then needs the
  lean runtime library: :func:`check_lean_runtime`): a plan later TensorRT
  versions can run; ``HardwareCompatibilityLevel::kAMPERE_PLUS`` (engines built
  on Ampere or later run on Ampere and later) and ``kSAME_COMPUTE_CAPABILITY``
  (TensorRT 10.9+: any GPU of the same compute capability).
- ``setDefaultDeviceType(kDLA)``, ``setDLACore(n)``, ``kGPU_FALLBACK`` for
  Jetson's DLA cores.
- ``ProfilingVerbosity::kDETAILED`` so that the engine inspector's JSON names
  every layer, its tactic and its input/output formats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from itmrt.bundle.manifest import LARGEST_AXIS
from itmrt.bundle.names import BATCH_CAPTIONS, BATCH_IMAGES, MAX_LENGTH
from itmrt.engine.profiles import Range
from itmrt.errors import ItmrtError
from itmrt.machine.jetson import UNIFIED_MEMORY_WORKSPACE_MB

if TYPE_CHECKING:
    import tensorrt

HARDWARE_LEVELS = {
    "none": "NONE",
    "ampere-plus": "AMPERE_PLUS",
    "same-compute-capability": "SAME_COMPUTE_CAPABILITY",
}


@dataclass
class EngineOptions:
    """What ``itmrt build`` asks of TensorRT beyond the graph itself."""

    workspace_mb: int | None = None  # builder workspace cap; None: 1 GiB on unified memory, else TensorRT's default
    axis_ranges: dict[str, Range] = field(default_factory=dict)  # axis -> (min, opt, max), over the manifest's
    timing_cache: Path | None = None  # None: the bundle's cache for this TensorRT version and GPU
    tf32: bool = False  # allow TF32 in float32 MatMuls/convolutions (measured, recorded)
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    lean_runtime: Path | None = None  # with exclude_lean_runtime: the lean runtime library the plans load through
    hardware_compatibility: str = "none"  # none | ampere-plus | same-compute-capability
    dla_core: int | None = None
    gpu_fallback: bool = True  # with a DLA core: layers the DLA cannot run go to the GPU
    board: str | None = None  # a preset of engine/profiles.BOARDS: profile and workspace sized for it
    layer_info: bool = True  # detailed profiling verbosity and the engine inspector's JSON in the bundle
    device: int = 0  # CUDA device (after CUDA_VISIBLE_DEVICES)


@dataclass(frozen=True)
class BuilderSettings:
    """The builder configuration, as data: what the manifest records and the builder gets."""

    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    workspace_mb: int | None
    hardware_compatibility: str  # a HardwareCompatibilityLevel member name
    dla_core: int | None
    profiling_verbosity: str  # a ProfilingVerbosity member name

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["set_flags"] = list(self.set_flags)
        values["clear_flags"] = list(self.clear_flags)
        return values


def _compute_capability(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return (int(major), int(minor or 0)) if major.isdigit() and (minor or "0").isdigit() else (0, 0)


def check_options(options: EngineOptions, precision: str) -> None:
    """One-line errors for options that contradict each other or name nothing (no GPU needed)."""
    from itmrt.engine.profiles import board

    if options.hardware_compatibility not in HARDWARE_LEVELS:
        raise ItmrtError(
            f"unknown hardware compatibility {options.hardware_compatibility!r}; choose {', '.join(HARDWARE_LEVELS)}"
        )
    if options.board is not None:
        board(options.board)
    if options.exclude_lean_runtime and not options.version_compatible:
        raise ItmrtError("--exclude-lean-runtime only applies to --version-compatible engines; add that or drop it")
    check_lean_runtime(options)
    if options.dla_core is not None and options.dla_core < 0:
        raise ItmrtError(f"--dla-core must be 0 or more, not {options.dla_core}")
    if options.dla_core is not None and precision == "fp32":
        raise ItmrtError("the DLA runs FP16 and INT8 only: build --precision fp16 or int8 with --dla-core")
    if options.dla_core is not None:
        from itmrt.engine.dla import static_ranges

        static_ranges({}, options.axis_ranges)  # a dynamic --shape is refused before any graph is made
    if options.workspace_mb is not None and not 1 <= options.workspace_mb <= 1 << 20:
        raise ItmrtError(f"--workspace must be from 1 to {1 << 20} MB, not {options.workspace_mb}")
    check_axis_ranges(options.axis_ranges)


def check_lean_runtime(options: EngineOptions) -> None:
    """A plan without its lean runtime loads only through ``IRuntime::loadRuntime(path)`` ("a plan file built with
    BuilderFlag::kVERSION_COMPATIBLE and BuilderFlag::kEXCLUDE_LEAN_RUNTIME both set and built with the same
    version of TensorRT as the loaded runtime library", ``include/NvInferRuntime.h``; trtexec likewise asks
    for ``--leanDLLPath``): the build needs that library to load and check what it built."""
    if options.exclude_lean_runtime and options.lean_runtime is None:
        raise ItmrtError(
            "--exclude-lean-runtime leaves the lean runtime out of the plan, which then loads only through that "
            "library: pass --lean-runtime PATH (libnvinfer_lean of this TensorRT version), or drop the flag"
        )
    if options.lean_runtime is not None and not options.exclude_lean_runtime:
        raise ItmrtError("--lean-runtime only applies with --exclude-lean-runtime; add that or drop --lean-runtime")
    if options.lean_runtime is not None and not Path(options.lean_runtime).is_file():
        raise ItmrtError(f"--lean-runtime {options.lean_runtime}: no such file (the lean runtime library)")


PROFILE_AXES = (BATCH_IMAGES, BATCH_CAPTIONS, MAX_LENGTH)
"""The axes ``--shape`` may set (the region count is fixed when the bundle is exported)."""


def check_axis_ranges(ranges: dict[str, tuple[int, int, int]]) -> None:
    """Each ``--shape`` names a profile axis and gives 1 <= min <= opt <= max within the manifest's limit."""
    for axis, (low, mid, high) in ranges.items():
        if axis not in PROFILE_AXES:
            raise ItmrtError(f"--shape {axis}: not a profile axis; choose one of {', '.join(PROFILE_AXES)}")
        if not 1 <= low <= mid <= high <= LARGEST_AXIS:
            raise ItmrtError(f"--shape {axis}={low}:{mid}:{high}: need 1 <= min <= opt <= max <= {LARGEST_AXIS}")


BUILD_GPU_NEEDS = {"ampere-plus": ((8, 0), "an Ampere"), "same-compute-capability": ((7, 5), "a Turing")}
"""``HardwareCompatibilityLevel`` (``include/NvInfer.h``): kAMPERE_PLUS "is only supported for engines built on
NVIDIA Ampere and later GPUs", kSAME_COMPUTE_CAPABILITY "on NVIDIA Turing and later GPUs"."""


def _check_build_gpu(options: EngineOptions, compute_capability: str) -> None:
    need = BUILD_GPU_NEEDS.get(options.hardware_compatibility)
    if need is not None and _compute_capability(compute_capability) < need[0]:
        (major, minor), family = need
        raise ItmrtError(
            f"--hardware-compatibility {options.hardware_compatibility} needs {family} or later GPU to build on "
            f"(compute capability {major}.{minor}+); this one is {compute_capability}"
        )


def builder_settings(
    options: EngineOptions, precision: str, *, unified_memory: bool, compute_capability: str
) -> BuilderSettings:
    """The builder configuration for one engine of ``precision`` on a GPU of ``compute_capability``."""
    check_options(options, precision)
    _check_build_gpu(options, compute_capability)
    set_flags: list[str] = []
    clear_flags: list[str] = []
    (set_flags if options.tf32 else clear_flags).append("TF32")
    if options.version_compatible:
        set_flags.append("VERSION_COMPATIBLE")
        if options.exclude_lean_runtime:
            set_flags.append("EXCLUDE_LEAN_RUNTIME")
    if options.dla_core is not None and options.gpu_fallback:
        set_flags.append("GPU_FALLBACK")
    workspace = options.workspace_mb
    if workspace is None and unified_memory:
        workspace = UNIFIED_MEMORY_WORKSPACE_MB
    return BuilderSettings(
        tuple(set_flags),
        tuple(clear_flags),
        workspace,
        HARDWARE_LEVELS[options.hardware_compatibility],
        options.dla_core,
        "DETAILED" if options.layer_info else "LAYER_NAMES_ONLY",
    )


def carries_host_code(set_flags: Any) -> bool:
    """Whether a plan built with these flags embeds the lean runtime (host code a runtime must allow)."""
    flags = set(set_flags)
    return "VERSION_COMPATIBLE" in flags and "EXCLUDE_LEAN_RUNTIME" not in flags


def _member(trt: ModuleType, enum: str, name: str, what: str) -> Any:
    member = getattr(getattr(trt, enum), name, None)
    if member is None:
        raise ItmrtError(
            f"TensorRT {trt.__version__} has no {enum}.{name} ({what}); upgrade TensorRT or drop the option"
        )
    return member


def apply_builder_settings(
    trt: ModuleType, builder: tensorrt.Builder, config: tensorrt.IBuilderConfig, settings: BuilderSettings
) -> None:
    """Configure ``config`` (an ``IBuilderConfig`` of ``builder``) as ``settings`` say."""
    for name in settings.set_flags:
        config.set_flag(_member(trt, "BuilderFlag", name, "builder flag"))
    for name in settings.clear_flags:
        config.clear_flag(_member(trt, "BuilderFlag", name, "builder flag"))
    if settings.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mb) << 20)
    if settings.hardware_compatibility != "NONE":
        config.hardware_compatibility_level = _member(
            trt, "HardwareCompatibilityLevel", settings.hardware_compatibility, "hardware compatibility level"
        )
    if settings.dla_core is not None:
        cores = int(builder.num_DLA_cores)
        if settings.dla_core >= cores:
            raise ItmrtError(f"--dla-core {settings.dla_core}: this device has {cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(settings.dla_core)
    config.profiling_verbosity = _member(trt, "ProfilingVerbosity", settings.profiling_verbosity, "profiling verbosity")
