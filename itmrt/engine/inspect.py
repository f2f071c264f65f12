"""What engines a bundle holds and whether each can run here (used by ``itmrt doctor`` and the runtime)."""

from __future__ import annotations

from dataclasses import dataclass
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


def list_engines(manifest: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(precision, graph, entry)`` for every engine the manifest records."""
    return [
        (precision, graph, entry)
        for precision, graphs in sorted(manifest.get("engines", {}).items())
        for graph, entry in sorted(graphs.items())
    ]


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
                precision, graph, str(entry["file"]), str(entry.get("tensorrt_version")), str(entry.get("gpu_name")),
                str(entry.get("compute_capability")), not problem, problem,
            )
        )
    return statuses
