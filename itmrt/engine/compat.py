"""Is a built engine usable here? Checks a manifest engine entry against this machine (no TensorRT import).

By default a TensorRT engine runs only with the TensorRT version that built
it, on the GPU model it was built on; the engine entry records both (see
:class:`itmrt.bundle.manifest.EngineEntry`) and loading compares them with the
running TensorRT and the GPU the runtime actually uses, refusing a mismatch
with a message that says how to rebuild. Engines built to travel promise more,
and the check accepts what they promise (TensorRT's "Engine Compatibility"
documentation and ``include/NvInfer.h``):

- ``version_compatible`` (``BuilderFlag::kVERSION_COMPATIBLE``, with the lean
  runtime in the plan): runs with the TensorRT version that built it or any
  later one (TensorRT 8.6 or later built it);
- hardware compatibility ``AMPERE_PLUS``: built on Ampere or later, runs on
  any GPU of compute capability 8.0 or more; ``SAME_COMPUTE_CAPABILITY``
  ("only supported for engines built on NVIDIA Turing and later GPUs"): any
  GPU of the same compute capability, whatever its name.

No compatibility flag crosses platforms: TensorRT's support matrix says
serialized engines are not portable across platforms (operating system, CPU
architecture), and a Jetson's integrated GPU shares the system memory where a
discrete GPU has its own. Each engine records the OS, the CPU architecture and
whether its GPU had unified memory; :func:`platform_problem` refuses a mismatch
(entries written before that record none and are not checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itmrt.bundle.closed import verified_member
from itmrt.bundle.folder import bundle_file
from itmrt.bundle.manifest import EngineEntry, Manifest
from itmrt.engine.tensorrt_api import version_tuple
from itmrt.errors import ItmrtError

FIRST_VERSION_COMPATIBLE = (8, 6)


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to: TensorRT version, GPU name, compute capability ("8.7"), and the platform:
    OS (``platform.system()``), CPU architecture (``platform.machine()``), unified memory (None: unknown)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    os: str | None = None
    arch: str | None = None
    unified_memory: bool | None = None


def this_platform() -> tuple[str, str]:
    """This machine's OS and CPU architecture, as engines record them ("Linux", "aarch64")."""
    import platform

    return platform.system(), platform.machine()


def _memory(unified: bool | None) -> str:
    return "unified memory" if unified else "its own GPU memory"


def platform_problem(entry: EngineEntry, here: DeviceInfo) -> str | None:
    """Why an engine built on another platform cannot run here (None when it can, or nothing was recorded)."""
    built = (entry.os, entry.arch, entry.unified_memory)
    running = (here.os, here.arch, here.unified_memory)
    differs = [b != r for b, r in zip(built, running) if b is not None and r is not None]
    if not any(differs):
        return None
    return (
        f"it was built on {entry.os} {entry.arch} with {_memory(entry.unified_memory)}, this machine is "
        f"{here.os} {here.arch} with {_memory(here.unified_memory)} (serialized engines do not cross platforms)"
    )


def engine_entry(manifest: Manifest, precision: str, graph: str) -> EngineEntry:
    entry = manifest.engine(precision, graph)
    if entry is None:
        raise ItmrtError(
            f"the bundle has no {precision} {graph} engine; "
            f"run `itmrt build BUNDLE --precision {precision}` on this machine"
        )
    return entry


def _capability(text: str) -> tuple[int, ...]:
    return version_tuple(str(text))


def version_problem(entry: EngineEntry, running: str) -> str | None:
    """A version-compatible plan runs with its TensorRT or a later one: through the lean runtime it carries,
    or - built with ``kEXCLUDE_LEAN_RUNTIME`` - through the lean runtime library of its build version that
    the running TensorRT loads (``IRuntime::loadRuntime``; the runtime asks for it)."""
    built = entry.tensorrt_version
    if entry.version_compatible:
        ok = version_tuple(built) >= FIRST_VERSION_COMPATIBLE and version_tuple(running) >= version_tuple(built)
        return None if ok else f"it is version-compatible from TensorRT {built} on, this machine has {running}"
    if built.strip() != running.strip():
        return f"it was built with TensorRT {built}, this machine has {running}"
    return None


def hardware_problem(entry: EngineEntry, here: DeviceInfo) -> str | None:
    level = entry.hardware_compatibility or "NONE"
    built_cc, here_cc = _capability(entry.compute_capability), _capability(here.compute_capability)
    if level == "AMPERE_PLUS":
        ok = here_cc >= (8, 0)
        need = "an Ampere or later GPU (compute capability 8.0+)"
    elif level == "SAME_COMPUTE_CAPABILITY":
        ok = bool(built_cc) and here_cc == built_cc
        need = f"a GPU of compute capability {entry.compute_capability}"
    else:
        ok = bool(built_cc) and here_cc == built_cc and entry.gpu_name == here.gpu_name
        need = f"{entry.gpu_name} (compute capability {entry.compute_capability}), the GPU it was built on"
    return None if ok else f"it needs {need}, this GPU is {here.gpu_name} ({here.compute_capability})"


def compatibility_problems(entry: EngineEntry, here: DeviceInfo) -> list[str]:
    """Why the engine of ``entry`` cannot run with ``here`` (empty when it can)."""
    found = (
        platform_problem(entry, here), version_problem(entry, here.tensorrt_version), hardware_problem(entry, here)
    )
    return [problem for problem in found if problem]


def check_engine(bundle: str | Path, manifest: Manifest, precision: str, graph: str, here: DeviceInfo) -> Path:
    """The engine file of ``graph`` in ``precision`` if it exists, is intact, matches its graph and this machine.

    Raises a one-line :class:`ItmrtError` naming the mismatch and the rebuild command otherwise.
    """
    folder = Path(bundle)
    entry = engine_entry(manifest, precision, graph)
    rebuild = f"rebuild it here: itmrt build {folder} --precision {precision}"
    problems = compatibility_problems(entry, here)
    if problems:
        raise ItmrtError(f"engine {entry.file} cannot run here: {'; '.join(problems)}; {rebuild}")
    if not (folder / entry.file).is_file():
        raise ItmrtError(f"engine {entry.file} is missing; {rebuild}")
    if manifest.files.get(entry.file) != entry.sha256:
        raise ItmrtError(f"engine {entry.file} is not listed in the manifest with its sha256; {rebuild}")
    try:
        path = bundle_file(folder, manifest, entry.file)
    except ItmrtError:
        raise ItmrtError(
            f"engine {entry.file} differs from the manifest's sha256 (changed after the build); {rebuild}"
        ) from None
    try:
        if manifest.files.get(entry.graph_file) != entry.graph_sha256:
            raise ItmrtError("its graph is listed with another sha256")
        verified_member(folder, entry.graph_file, manifest.files, "bundle", rebuild)  # TensorRT reads no graph: hash
    except ItmrtError:
        raise ItmrtError(f"engine {entry.file} was built from a graph that has changed since; {rebuild}") from None
    return path
