"""Make and record a bundle's precision graphs: ``fp16`` (measured FP32 islands) and ``int8`` (calibrated Q/DQ).

The functions here are what ``itmrt calibrate`` and ``itmrt build`` call. They
read only the bundle (numpy, onnx, onnxruntime; no torch), write each new file
atomically into it, verify every graph (``onnx.checker``, TensorRT 10's op
check, ONNX Runtime runs it, Q/DQ zero points are 0) before recording it, and
add entries to ``manifest.json`` as :mod:`itmrt.calibration.records` describes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from itmrt.calibration import DEFAULT_METHOD, records
from itmrt.calibration.calib_data import (
    DEFAULT_BATCH,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_SAMPLES,
    CalibrationData,
    FeedMaker,
    Feeds,
    calibration_reader,
    open_calibration_data,
    random_sample,
)
from itmrt.calibration.fp16 import verify_precision_graph
from itmrt.calibration.int8 import excluded_nodes, quantizable_nodes, quantization_summary, quantize_graph, zero_point_problems
from itmrt.calibration.sensitivity import SensitivityOptions, choose_islands, output_error, run_model
from itmrt.errors import ItmrtError
from itmrt.export.manifest import read_manifest, verify_files
from itmrt.io import sha256_file

SENSITIVITY_IMAGES = 16  # images (with their captions) the FP16 sensitivity measurement runs on
RANDOM_SEED = 0


@dataclass
class PrecisionOptions:
    """How precision graphs are made; the defaults suit a real calibration split."""

    calib_data: Path | None = None
    split: str = "train"
    method: str = DEFAULT_METHOD
    samples: int = DEFAULT_SAMPLES
    min_samples: int = DEFAULT_MIN_SAMPLES
    batch_size: int = DEFAULT_BATCH
    recalibrate: bool = False  # calibrate even when the bundle holds matching statistics
    progress: bool = True
    sensitivity: SensitivityOptions = field(default_factory=SensitivityOptions)


def _say(log: records.Log | None) -> records.Log:
    return log or (lambda _message: None)


def _open_verified(bundle: Path) -> dict[str, Any]:
    """The manifest, after checking the export's own graphs and vocabulary are intact (variants are remade)."""
    manifest = read_manifest(bundle)
    exported = {entry["file"] for entry in manifest["graphs"].values()} | {manifest["vocab"]["file"]}
    problems = [p for p in verify_files(bundle, manifest) if any(f"file '{name}'" in p for name in exported)]
    if problems:
        raise ItmrtError(f"bundle {bundle}: {problems[0]}; export it again")
    return manifest


def _sample_feeds(bundle: Path, manifest: dict[str, Any], data: CalibrationData | None, graph: str, feeds: FeedMaker) -> list[Feeds]:
    if data is None:
        images, tokens, lengths = random_sample(manifest, seed=RANDOM_SEED)
        return [feeds.feeds(graph, images, tokens, lengths)]
    batches = data.paired_batches(DEFAULT_BATCH)
    result = []
    for index, (images, tokens, lengths) in enumerate(batches):
        if index * DEFAULT_BATCH >= SENSITIVITY_IMAGES:
            break
        result.append(feeds.feeds(graph, images, tokens, lengths))
    return result


def _sample_name(data: CalibrationData | None) -> str:
    return f"calibration data {data.describe()}" if data is not None else f"random inputs (seed {RANDOM_SEED})"


def _threshold_name(manifest: dict[str, Any], graph: str) -> str | None:
    threshold = manifest.get("threshold")
    return str(threshold["initializer"]) if graph == "scorer" and threshold else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_files(bundle: Path, payloads: dict[str, bytes]) -> None:
    """Write the new files (each atomically) right before the manifest that lists them."""
    for relative, data in payloads.items():
        records.write_bundle_file(bundle, relative, data)


def make_fp16(bundle: str | Path, options: PrecisionOptions | None = None, log: records.Log | None = None) -> dict[str, Any]:
    """Write ``precision/fp16/<graph>.onnx`` for every graph with measured FP32 islands; return the manifest."""
    options = options or PrecisionOptions()
    say = _say(log)
    folder = Path(bundle)
    manifest = _open_verified(folder)
    data = _open_data(folder, manifest, options) if options.calib_data is not None else None
    feeds = FeedMaker(folder, manifest)
    entries: dict[str, dict[str, Any]] = {}
    payloads: dict[str, bytes] = {}
    for graph, graph_entry in manifest["graphs"].items():
        started = time.perf_counter()
        source = onnx.load(str(folder / graph_entry["file"]))
        sample = _sample_feeds(folder, manifest, data, graph, feeds)
        result = choose_islands(source, sample, _threshold_name(manifest, graph), options.sensitivity)
        assert result.model is not None
        verify_precision_graph(result.model, f"fp16 {graph}")
        relative = records.precision_file("fp16", graph)
        payloads[relative] = result.model.SerializeToString()
        sha = _sha256(payloads[relative])
        entries[graph] = {
            "file": relative,
            "sha256": sha,
            "source_sha256": graph_entry["sha256"],
            "islands": [island.as_dict() for island in result.islands],
            "max_abs_error": result.final_error,
            "sample": _sample_name(data),
        }
        say(
            f"fp16 {graph}: {len(result.islands)} FP32 island(s) "
            f"({', '.join(f'{i.node} [{i.reason}]' for i in result.islands) or 'none'}), "
            f"max abs error {result.final_error:.2e} ({time.perf_counter() - started:.1f}s)"
        )

    def change(m: dict[str, Any]) -> None:
        for graph, entry in entries.items():
            records.set_entry(m, ("precisions", "fp16", "graphs", graph), entry, f"fp16 {graph}", say)
        m["precisions"]["fp16"].update({"created": records.now(), "versions": records.versions()})

    _write_files(folder, payloads)
    return records.update_manifest(folder, change)


def _open_data(bundle: Path, manifest: dict[str, Any], options: PrecisionOptions) -> CalibrationData:
    assert options.calib_data is not None
    return open_calibration_data(bundle, manifest, options.calib_data, options.split, options.samples, options.min_samples)


def saved_calibration(bundle: Path, manifest: dict[str, Any], method: str | None = None) -> list[str]:
    """Why the bundle's saved calibration cannot be reused (empty when it can)."""
    saved = manifest.get("calibration")
    if not saved:
        return ["the bundle holds no calibration statistics"]
    reasons = []
    if method is not None and saved.get("method") != method:
        reasons.append(f"it was calibrated with '{saved.get('method')}', not '{method}'")
    for graph, graph_entry in manifest["graphs"].items():
        entry = saved.get("graphs", {}).get(graph)
        if entry is None and not _needs_calibration(bundle, graph_entry):
            continue
        if entry is None:
            reasons.append(f"no statistics for {graph}")
        elif entry["source_sha256"] != graph_entry["sha256"]:
            reasons.append(f"{graph} changed since calibration")
        elif not (bundle / entry["file"]).is_file() or sha256_file(bundle / entry["file"]) != entry["sha256"]:
            reasons.append(f"{entry['file']} is missing or changed")
    return reasons


def _needs_calibration(bundle: Path, graph_entry: dict[str, Any]) -> bool:
    source = onnx.load(str(bundle / graph_entry["file"]))
    return bool(quantizable_nodes(source, [e["node"] for e in excluded_nodes(source)]))


def calibrate(bundle: str | Path, options: PrecisionOptions, log: records.Log | None = None) -> dict[str, Any]:
    """Calibrate on ``options.calib_data`` and write the int8 graphs; return the manifest."""
    if options.calib_data is None:
        raise ItmrtError("calibration needs data: pass --data DIR (or --calib-data DIR to build)")
    return _make_int8(Path(bundle), options, _say(log), force_calibration=True)


def make_int8(bundle: str | Path, options: PrecisionOptions | None = None, log: records.Log | None = None) -> dict[str, Any]:
    """Write the int8 graphs, from the bundle's saved calibration when it matches, else by calibrating."""
    return _make_int8(Path(bundle), options or PrecisionOptions(), _say(log), force_calibration=False)


def _int8_error(source: onnx.ModelProto, quantized: onnx.ModelProto, sample: Sequence[Feeds]) -> float:
    return output_error(run_model(source, sample), quantized, sample)


def _make_int8(folder: Path, options: PrecisionOptions, say: records.Log, force_calibration: bool) -> dict[str, Any]:
    manifest = _open_verified(folder)
    reasons = saved_calibration(folder, manifest, options.method if options.calib_data is not None else None)
    calibrating = force_calibration or options.recalibrate or bool(reasons)
    if calibrating and options.calib_data is None:
        raise ItmrtError(f"int8 needs calibration ({reasons[0]}); pass --calib-data DIR or run `itmrt calibrate BUNDLE --data DIR`")
    method = options.method if calibrating else str(manifest["calibration"]["method"])
    data = _open_data(folder, manifest, options) if options.calib_data is not None else None
    if calibrating:
        assert data is not None
        say(f"calibrating with {method} on {data.describe()}")
    else:
        say(f"using the bundle's saved calibration ({method}, {manifest['calibration']['samples']} images): no recalibration")
    feeds = FeedMaker(folder, manifest)
    graph_entries: dict[str, dict[str, Any]] = {}
    calibration_entries: dict[str, dict[str, Any]] = {}
    payloads: dict[str, bytes] = {}
    for graph, graph_entry in manifest["graphs"].items():
        started = time.perf_counter()
        source = onnx.load(str(folder / graph_entry["file"]))
        exclude = excluded_nodes(source)
        excluded_names = [e["node"] for e in exclude]
        if not quantizable_nodes(source, excluded_names):
            # Nothing here that int8 speeds up (a GRU text encoder): the float32 graph is the int8 variant.
            graph_entries[graph] = {
                "file": graph_entry["file"], "sha256": graph_entry["sha256"], "source_sha256": graph_entry["sha256"],
                "calibration": None, "method": None, "quantized_nodes": [], "per_channel": False, "qdq_pairs": 0,
                "excluded_nodes": exclude, "symmetric": True, "max_abs_error": 0.0, "sample": None,
            }
            say(f"int8 {graph}: no MatMul/Gemm/Conv to quantize; it runs in float32")
            continue
        cache_relative = records.calibration_file(graph)
        reader = calibration_reader(data, feeds, graph, options.batch_size, options.progress) if calibrating and data is not None else None
        quantized, ranges = quantize_graph(source, method, folder / cache_relative, reader, excluded_names)
        verify_precision_graph(quantized, f"int8 {graph}")
        problems = zero_point_problems(quantized)
        if problems:
            raise ItmrtError(f"int8 {graph}: {problems[0]}")
        summary = quantization_summary(quantized)
        sample = _sample_feeds(folder, manifest, data, graph, feeds)
        error = _int8_error(source, quantized, sample)
        relative = records.precision_file("int8", graph)
        payloads[relative] = quantized.SerializeToString()
        payloads[cache_relative] = ranges
        sha = _sha256(payloads[relative])
        graph_entries[graph] = {
            "file": relative,
            "sha256": sha,
            "source_sha256": graph_entry["sha256"],
            "calibration": cache_relative,
            "method": method,
            **summary,
            "excluded_nodes": exclude,
            "symmetric": True,
            "max_abs_error": error,
            "sample": _sample_name(data),
        }
        calibration_entries[graph] = {
            "file": cache_relative,
            "sha256": _sha256(ranges),
            "source_sha256": graph_entry["sha256"],
        }
        say(
            f"int8 {graph}: {len(summary['quantized_nodes'])} quantized node(s), {summary['qdq_pairs']} Q/DQ pairs, "
            f"{len(exclude)} excluded, max abs error {error:.2e} ({time.perf_counter() - started:.1f}s)"
        )

    def change(m: dict[str, Any]) -> None:
        if calibrating:
            assert data is not None
            calibration = {
                "method": method,
                "split": data.split,
                "data": str(data.data_dir.resolve()),
                "samples": data.num_samples,
                "data_fingerprint": data.fingerprint,
                "created": records.now(),
                "graphs": calibration_entries,
            }
            if m.get("calibration"):
                say("calibration: replaced the bundle's previous statistics")
            m["calibration"] = calibration
            for entry in calibration_entries.values():
                m.setdefault("files", {})[entry["file"]] = entry["sha256"]
        for graph, entry in graph_entries.items():
            records.set_entry(m, ("precisions", "int8", "graphs", graph), entry, f"int8 {graph}", say)
        m["precisions"]["int8"].update({"created": records.now(), "versions": records.versions()})

    _write_files(folder, payloads)
    return records.update_manifest(folder, change)


def make_precision_graphs(
    bundle: str | Path, precision: str, options: PrecisionOptions | None = None, log: records.Log | None = None
) -> dict[str, Any]:
    """The graphs ``build`` compiles: fp32 (the export's, verified), fp16 or int8 (made here)."""
    records.check_precision(precision)
    if precision == "fp16":
        return make_fp16(bundle, options, log)
    if precision == "int8":
        return make_int8(bundle, options, log)
    folder = Path(bundle)
    manifest = _open_verified(folder)
    for graph, entry in manifest["graphs"].items():
        verify_precision_graph(onnx.load(str(folder / entry["file"])), f"fp32 {graph}")
    _say(log)(f"fp32: {len(manifest['graphs'])} export graphs verified")
    return manifest
