"""What engines a bundle holds and whether each can run here (used by ``itmrt doctor BUNDLE``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from itmrt.bundle.manifest import EngineEntry, Manifest, read_manifest
from itmrt.engine.compat import DeviceInfo, check_engine
from itmrt.engine.dla import dla_summary
from itmrt.errors import ItmrtError


@dataclass(frozen=True)
class EngineStatus:
    precision: str
    graph: str
    file: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    usable: bool
    problem: str
    device_memory_bytes: int | None = None  # what an execution context needs at the profile's maximum shapes
    largest_intermediate_bytes: int | None = None  # ONNX shape inference's estimate at those shapes
    tf32: bool | None = None
    travels: str = ""  # version / hardware compatibility, DLA layer devices, build platform
    layer_devices: dict[str, Any] | None = None  # DLA builds: engine layers on the DLA / the GPU

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_engines(manifest: Manifest) -> list[tuple[str, str, EngineEntry]]:
    """``(precision, graph, entry)`` for every engine the manifest records."""
    return [
        (precision, graph, entry)
        for precision, graphs in sorted(manifest.engines.items())
        for graph, entry in sorted(graphs.items())
    ]


def _travels(entry: EngineEntry) -> str:
    parts = []
    if entry.version_compatible:
        parts.append("version-compatible")
    level = entry.hardware_compatibility
    if level and level != "NONE":
        parts.append(level.lower().replace("_", "-"))
    dla = dla_summary(entry.dla_core, entry.layer_devices)
    if dla:
        parts.append(dla)
    if entry.os or entry.arch:
        parts.append(f"built on {entry.os} {entry.arch}" + (" (unified memory)" if entry.unified_memory else ""))
    return ", ".join(parts)


def inspect_bundle_engines(bundle: str | Path, here: DeviceInfo | None) -> list[EngineStatus]:
    """Every engine of the bundle with whether it can run with ``here`` (``None``: no TensorRT/GPU here)."""
    manifest = read_manifest(bundle)
    statuses = []
    for precision, graph, entry in list_engines(manifest):
        problem = ""
        if here is None:
            problem = "TensorRT or a GPU is not available here"
        else:
            try:
                check_engine(bundle, manifest, precision, graph, here)
            except ItmrtError as exc:
                problem = str(exc)
        statuses.append(
            EngineStatus(
                precision,
                graph,
                entry.file,
                entry.tensorrt_version,
                entry.gpu_name,
                entry.compute_capability,
                not problem,
                problem,
                entry.device_memory_bytes,
                entry.largest_intermediate_bytes,
                entry.tf32.enabled if entry.tf32 is not None else None,
                _travels(entry),
                dict(entry.layer_devices) if entry.layer_devices is not None else None,
            )
        )
    return statuses
