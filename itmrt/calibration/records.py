"""Where precision variants, calibration statistics and engines live in a bundle, and their manifest entries.

Every stage after export *adds* to the bundle's ``manifest.json``; nothing it
writes replaces an export file. The entries (schema version 1, additive)::

    "precisions": {
      "fp16": {
        "graphs": {
          "<graph>": {                      # image_encoder | text_encoder | scorer
            "file": "precision/fp16/<graph>.onnx", "sha256": "...",
            "source_sha256": "...",         # sha256 of the fp32 graph it was made from
            "islands": [{"node", "op", "reason", "measured"}],   # nodes kept in float32
            "max_abs_error": float,         # against fp32 on the sample data
            "sample": "calibration data <dir>" | "random inputs (seed N)"
          }
        },
        "created": ISO time, "versions": {...}
      },
      "int8": {
        "graphs": {
          "<graph>": {
            "file": "precision/int8/<graph>.onnx", "sha256", "source_sha256",
            "calibration": "calibration/<graph>.json",   # ORT TensorsData ranges it was quantized with
            "method": "entropy" | "percentile" | "minmax",
            "quantized_nodes": [...], "excluded_nodes": [{"node", "op", "reason"}],
            "per_channel": true, "symmetric": true, "qdq_pairs": int, "max_abs_error": float
          }
        }, "created", "versions"
      }
    },
    "calibration": {
      "method", "split", "data", "samples", "data_fingerprint",
      "graphs": {"<graph>": {"file": "calibration/<graph>.json", "sha256", "source_sha256"}}
    },
    "engines": {
      "<precision>": {
        "<graph>": {"file": "engines/<precision>/<graph>.plan", "sha256", "graph_file", "graph_sha256",
                    "tensorrt_version", "gpu_name", "compute_capability", "profile": {...},
                    "workspace_mb", "built", ...}   # every field: itmrt.engine.build.engine_entry
      }
    }

``fp32`` is the export's own graphs (``manifest["graphs"][g]["file"]``), so
:func:`graph_file` maps every precision name to a file. Each new file is also
listed in ``manifest["files"]`` with its sha256, so ``itmrt check`` verifies it.
A replaced entry is reported through the ``log`` callback, never silently.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from itmrt import __version__
from itmrt.errors import ItmrtError
from itmrt.export.manifest import read_manifest, write_manifest
from itmrt.io import atomic_write_bytes

PRECISIONS = ("fp32", "fp16", "int8")
GRAPH_NAMES = ("image_encoder", "text_encoder", "scorer")
PRECISION_DIR = "precision"
CALIBRATION_DIR = "calibration"
ENGINE_DIR = "engines"
Log = Callable[[str], None]


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ItmrtError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    return precision


def precision_file(precision: str, graph: str) -> str:
    """Bundle-relative path of a precision variant's graph (fp16/int8)."""
    return f"{PRECISION_DIR}/{precision}/{graph}.onnx"


def calibration_file(graph: str) -> str:
    return f"{CALIBRATION_DIR}/{graph}.json"


def engine_file(precision: str, graph: str) -> str:
    return f"{ENGINE_DIR}/{precision}/{graph}.plan"


def graph_file(manifest: dict[str, Any], precision: str, graph: str) -> str:
    """The bundle-relative ONNX file that holds ``graph`` in ``precision`` (raises if it was never made)."""
    check_precision(precision)
    if graph not in manifest["graphs"]:
        raise ItmrtError(f"the bundle has no '{graph}' graph")
    if precision == "fp32":
        return str(manifest["graphs"][graph]["file"])
    entry = manifest.get("precisions", {}).get(precision, {}).get("graphs", {}).get(graph)
    if entry is None:
        raise ItmrtError(f"the bundle has no {precision} {graph}; run `itmrt build BUNDLE --precision {precision}` first")
    return str(entry["file"])


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"itmrt": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_bundle_file(bundle: Path, relative: str, data: bytes) -> None:
    """Write a file inside the bundle atomically (its folder created as needed)."""
    atomic_write_bytes(bundle / relative, data)


def update_manifest(bundle: str | Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read the manifest, apply ``change`` to it in memory, write it back atomically; return it."""
    folder = Path(bundle)
    manifest = read_manifest(folder)
    change(manifest)
    write_manifest(folder, manifest)
    return manifest


def set_entry(
    manifest: dict[str, Any], path: tuple[str, ...], entry: dict[str, Any], what: str, log: Log | None = None
) -> None:
    """Put ``entry`` at ``manifest[path[0]][path[1]]...``; a different existing entry is replaced *and reported*."""
    node = manifest
    for key in path[:-1]:
        node = node.setdefault(key, {})
    old = node.get(path[-1])
    if old is not None and log is not None:
        if old.get("sha256") and old.get("sha256") == entry.get("sha256"):
            log(f"{what}: unchanged ({entry.get('file', '')})")
        else:
            log(f"{what}: replaced the previous entry ({old.get('file', '?')}, sha256 {str(old.get('sha256', '?'))[:12]})")
    node[path[-1]] = entry
    if "file" in entry and "sha256" in entry:
        manifest.setdefault("files", {})[entry["file"]] = entry["sha256"]
