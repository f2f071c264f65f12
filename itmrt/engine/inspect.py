"""What engines a bundle holds and whether each can run here (used by ``itmrt doctor BUNDLE``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from itmrt.engine.compat import DeviceInfo, check_engine
from itmrt.errors import ItmrtError
from itmrt.export.manifest import read_manifest


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
    travels: str = ""  # version / hardware compatibility the engine was built with, if any

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_engines(manifest: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(precision, graph, entry)`` for every engine the manifest records."""
    return [
        (precision, graph, entry)
        for precision, graphs in sorted(manifest.get("engines", {}).items())
        for graph, entry in sorted(graphs.items())
    ]


def _travels(entry: dict[str, Any]) -> str:
    parts = []
    if entry.get("version_compatible"):
        parts.append("version-compatible")
    level = entry.get("hardware_compatibility")
    if level and level != "NONE":
        parts.append(str(level).lower().replace("_", "-"))
    if entry.get("dla_core") is not None:
        parts.append(f"DLA core {entry['dla_core']}")
    return ", ".join(parts)


def _optional_int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


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
        tf32 = entry.get("tf32")
        statuses.append(
            EngineStatus(
                precision,
                graph,
                str(entry["file"]),
                str(entry.get("tensorrt_version")),
                str(entry.get("gpu_name")),
                str(entry.get("compute_capability")),
                not problem,
                problem,
                _optional_int(entry.get("device_memory_bytes")),
                _optional_int(entry.get("largest_intermediate_bytes")),
                bool(tf32.get("enabled")) if isinstance(tf32, dict) else None,
                _travels(entry),
            )
        )
    return statuses
