"""Is a built engine usable here? Checks a manifest engine entry against this machine (no TensorRT import).

A TensorRT engine is specific to the TensorRT version that built it and to the
GPU (its compute capability; engines are not portable between GPU models
either). The engine entry records both (:class:`itmrt.bundle.manifest.EngineEntry`);
loading compares them with the running TensorRT and GPU and refuses a
mismatch with a message that says how to rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itmrt.bundle.manifest import EngineEntry, Manifest
from itmrt.errors import ItmrtError
from itmrt.io import sha256_file


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to: TensorRT version, GPU name, compute capability ("8.7")."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def engine_entry(manifest: Manifest, precision: str, graph: str) -> EngineEntry:
    entry = manifest.engine(precision, graph)
    if entry is None:
        raise ItmrtError(f"the bundle has no {precision} {graph} engine; run `itmrt build BUNDLE --precision {precision}` on this machine")
    return entry


def _same_version(built: str, running: str) -> bool:
    """TensorRT serialises engines for one exact version: compare all components given."""
    return built.strip() == running.strip()


def compatibility_problems(entry: EngineEntry, here: DeviceInfo) -> list[str]:
    """Why the engine of ``entry`` cannot run with ``here`` (empty when it can)."""
    problems = []
    if not _same_version(entry.tensorrt_version, here.tensorrt_version):
        problems.append(f"it was built with TensorRT {entry.tensorrt_version}, this machine has {here.tensorrt_version}")
    if entry.compute_capability != here.compute_capability or entry.gpu_name != here.gpu_name:
        problems.append(
            f"it was built for {entry.gpu_name} (compute capability {entry.compute_capability}), "
            f"this GPU is {here.gpu_name} ({here.compute_capability})"
        )
    return problems


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
    path = folder / entry.file
    if not path.is_file():
        raise ItmrtError(f"engine {entry.file} is missing; {rebuild}")
    if sha256_file(path) != entry.sha256:
        raise ItmrtError(f"engine {entry.file} differs from the manifest's sha256 (changed after the build); {rebuild}")
    graph_path = folder / entry.graph_file
    if not graph_path.is_file() or sha256_file(graph_path) != entry.graph_sha256:
        raise ItmrtError(f"engine {entry.file} was built from a graph that has changed since; {rebuild}")
    return path
