"""The bundle manifest (``manifest.json``): what a bundle holds and how to verify it.

Layout (schema version 1)::

    {
      "kind": "itmrt-bundle", "schema_version": 1, "family": "naaf" | "scan" | "cmpm",
      "dims": {...}, "opset": 17,
      "threshold": {"value", "source", "initializer", "checkpoint_value"} | null,
      "lambda_softmax": {"value", "initializer"} | null, "intra_factor": {...} | null,
      "scorer_options": {...},
      "graphs": {name: {"file", "sha256", "inputs": [{"name", "dtype", "shape"}], "outputs": [...],
                        "shape_ranges": {axis: {"min", "opt", "max"}}}},
      "vocab": {"file", "sha256", "size", "content_sha256", "pad_id", "start_id", "end_id", "unk_id"},
      "files": {file name: sha256}, "versions": {...}, "source_checkpoint": {"path", "sha256", "format"},
      "parity": {...}, "created": ISO-8601 time, "export_seconds": float
    }

Shapes name their symbolic axes (``batch_images``, ``batch_captions``,
``max_length``, ``num_regions``); ``shape_ranges`` gives each one the
min/opt/max a TensorRT optimisation profile needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from itmrt.io import atomic_write_text, sha256_file
from itmrt.runtime.bundle import BUNDLE_KIND, MANIFEST_NAME, SCHEMA_VERSION, is_bundle, read_bundle

__all__ = ["BUNDLE_KIND", "MANIFEST_NAME", "SCHEMA_VERSION", "graph_entry", "is_bundle", "read_manifest",
           "value_entries", "verify_files", "write_manifest"]


def _dtype_name(elem_type: int) -> str:
    return str(helper.tensor_dtype_to_np_dtype(elem_type))


def value_entries(values: Any) -> list[dict[str, Any]]:
    entries = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape: list[int | str] = [
            dim.dim_param if dim.HasField("dim_param") else int(dim.dim_value) for dim in tensor_type.shape.dim
        ]
        entries.append({"name": value.name, "dtype": _dtype_name(tensor_type.elem_type), "shape": shape})
    return entries


def graph_entry(model: onnx.ModelProto, file: str, sha256: str, shape_ranges: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The manifest entry of one graph: file, hash, input/output signatures, ranges of its symbolic axes."""
    inputs = value_entries(model.graph.input)
    outputs = value_entries(model.graph.output)
    axes = {dim for entry in inputs for dim in entry["shape"] if isinstance(dim, str)}
    return {
        "file": file,
        "sha256": sha256,
        "inputs": inputs,
        "outputs": outputs,
        "shape_ranges": {axis: shape_ranges[axis] for axis in sorted(axes) if axis in shape_ranges},
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (the last file an export writes)."""
    return atomic_write_text(Path(folder) / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and sanity-check a bundle's manifest; every failure is a one-line :class:`ItmrtError`.

    The runtime's reader (:func:`itmrt.runtime.bundle.read_bundle`) is the one place that knows what a
    complete manifest holds; this returns its parsed document.
    """
    return read_bundle(folder).manifest


def verify_files(folder: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Problems (one line each) with the files the manifest lists: missing, or sha256 not matching."""
    bundle = Path(folder)
    problems = []
    for name, expected in manifest["files"].items():
        path = bundle / name
        if not path.is_file():
            problems.append(f"file '{name}': missing")
        elif sha256_file(path) != expected:
            problems.append(f"file '{name}': sha256 differs from the manifest (the file was changed after export)")
    for graph_name, entry in manifest["graphs"].items():
        if manifest["files"].get(entry["file"]) != entry["sha256"]:
            problems.append(f"graph '{graph_name}': its sha256 disagrees with the manifest's file list")
    return problems
