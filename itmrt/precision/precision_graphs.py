"""Make and record a bundle's precision graphs: ``fp16`` (measured FP32 islands) and ``int8`` (calibrated Q/DQ).

The functions here are what ``itmrt calibrate`` and ``itmrt build`` call. They
read only the bundle (numpy, onnx, onnxruntime; no torch), verify every graph
(``onnx.checker``, TensorRT 10's op check, ONNX Runtime runs it, Q/DQ zero
points are 0) before recording it, then write each new file atomically into
the bundle and add its entry to ``manifest.json``
(:class:`itmrt.bundle.manifest.PrecisionGraphs`). Each pass works graph by
graph: one result per graph (its entry and the bytes to write), recorded
together at the end, so a failure leaves the bundle as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from itmrt.bundle.folder import bundle_file, read_bundle, verify_exported_files
from itmrt.bundle.manifest import (
    CalibrationFile,
    CalibrationRecord,
    Fp16Graph,
    Fp16Graphs,
    GraphEntry,
    Int8Graph,
    Int8Graphs,
    Log,
    Manifest,
    NodeNote,
    report_replacement,
    timestamp,
    tool_versions,
    update_manifest,
)
from itmrt.bundle.names import Component, Precision, calibration_file, parse_choice, precision_file
from itmrt.documents import sha256_bytes
from itmrt.errors import ItmrtError
from itmrt.precision import DEFAULT_METHOD
from itmrt.precision.calib_data import (
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
from itmrt.precision.fp16 import convert_to_fp16, verify_precision_graph
from itmrt.precision.int8 import (
    excluded_nodes,
    quantizable_nodes,
    quantization_summary,
    quantize_graph,
    zero_point_problems,
)
from itmrt.precision.qdq import placement_problems
from itmrt.precision.sensitivity import SensitivityOptions, choose_islands, output_error, run_model
from itmrt.publish import atomic_write_bytes

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


@dataclass
class GraphResult:
    """What one pass made of one graph: its manifest entry and the files to write (bundle-relative -> bytes)."""

    graph: str
    entry: Fp16Graph | Int8Graph
    payloads: dict[str, bytes] = field(default_factory=dict)
    calibration: CalibrationFile | None = None


def _say(log: Log | None) -> Log:
    return log or (lambda _message: None)


def _open_verified(bundle: Path) -> Manifest:
    """The manifest, after checking the export's own graphs and vocabulary are intact (variants are remade)."""
    manifest = read_bundle(bundle).manifest
    verify_exported_files(bundle, manifest)
    return manifest


def _sample_feeds(manifest: Manifest, data: CalibrationData | None, graph: str, feeds: FeedMaker) -> list[Feeds]:
    if data is None:
        images, tokens, lengths = random_sample(manifest, seed=RANDOM_SEED)
        return [feeds.feeds(graph, images, tokens, lengths)]
    result = []
    for index, (images, tokens, lengths) in enumerate(data.paired_batches(DEFAULT_BATCH)):
        if index * DEFAULT_BATCH >= SENSITIVITY_IMAGES:
            break
        result.append(feeds.feeds(graph, images, tokens, lengths))
    return result


def _sample_name(data: CalibrationData | None) -> str:
    return f"calibration data {data.describe()}" if data is not None else f"random inputs (seed {RANDOM_SEED})"


def _threshold_name(manifest: Manifest, graph: str) -> str | None:
    threshold = manifest.threshold
    return threshold.initializer if graph == Component.SCORER and threshold is not None else None


def _publish(folder: Path, results: Iterable[GraphResult], change: Callable[[Manifest], None]) -> Manifest:
    """Write every result's files (each atomically), then the manifest that lists them."""
    for result in results:
        for relative, data in result.payloads.items():
            atomic_write_bytes(folder / relative, data)
    return update_manifest(folder, change)


def _record_variants(m: Manifest, precision: Precision, results: list[GraphResult], say: Log) -> None:
    """Enter each result's graph (saying what it replaced) beside the variants of the graphs not remade."""
    previous = m.variants(precision)
    graphs = dict(previous.graphs) if previous is not None else {}
    for result in results:
        report_replacement(graphs.get(result.graph), result.entry, f"{precision} {result.graph}", say)
        m.record_file(result.entry.file, result.entry.sha256)
        graphs[result.graph] = result.entry
    made = {"graphs": graphs, "created": timestamp(), "versions": tool_versions()}
    if precision == Precision.FP16:
        m.precisions.fp16 = Fp16Graphs(**made)  # type: ignore[arg-type]
    else:
        m.precisions.int8 = Int8Graphs(**made)  # type: ignore[arg-type]


def _open_data(bundle: Path, manifest: Manifest, options: PrecisionOptions) -> CalibrationData:
    assert options.calib_data is not None
    return open_calibration_data(
        bundle, manifest, options.calib_data, options.split, options.samples, options.min_samples
    )


# -- fp16 --------------------------------------------------------------------------


def _fp16_graph(folder: Path, manifest: Manifest, graph: str, data: CalibrationData | None, feeds: FeedMaker,
                options: PrecisionOptions, say: Log) -> GraphResult:
    started = time.perf_counter()
    source_entry = manifest.graph(graph)
    source = onnx.load(str(bundle_file(folder, manifest, source_entry.file)))
    sample = _sample_feeds(manifest, data, graph, feeds)
    chosen = choose_islands(source, sample, _threshold_name(manifest, graph), options.sensitivity)
    assert chosen.model is not None
    verify_precision_graph(chosen.model, f"fp16 {graph}")
    relative = precision_file(Precision.FP16, graph)
    payload = chosen.model.SerializeToString()
    entry = Fp16Graph(file=relative, sha256=sha256_bytes(payload), source_sha256=source_entry.sha256,
                      islands=chosen.islands, max_abs_error=chosen.final_error, sample=_sample_name(data))
    say(
        f"fp16 {graph}: {len(chosen.islands)} FP32 island(s) "
        f"({', '.join(f'{i.node} [{i.reason}]' for i in chosen.islands) or 'none'}), "
        f"max abs error {chosen.final_error:.2e} ({time.perf_counter() - started:.1f}s)"
    )
    return GraphResult(graph, entry, {relative: payload})


def make_fp16(bundle: str | Path, options: PrecisionOptions | None = None, log: Log | None = None) -> Manifest:
    """Write ``precision/fp16/<graph>.onnx`` for every graph with measured FP32 islands; return the manifest."""
    options = options or PrecisionOptions()
    say = _say(log)
    folder = Path(bundle)
    manifest = _open_verified(folder)
    data = _open_data(folder, manifest, options) if options.calib_data is not None else None
    feeds = FeedMaker(folder, manifest)
    results = [_fp16_graph(folder, manifest, graph, data, feeds, options, say) for graph in manifest.graphs]

    return _publish(folder, results, lambda m: _record_variants(m, Precision.FP16, results, say))


# -- int8 --------------------------------------------------------------------------


@dataclass
class Int8Plan:
    """How the int8 pass gets its ranges: from new calibration on ``data``, or from the bundle's saved ones."""

    calibrating: bool
    method: str
    data: CalibrationData | None


def saved_calibration(bundle: Path, manifest: Manifest, method: str | None = None) -> list[str]:
    """Why the bundle's saved calibration cannot be reused (empty when it can)."""
    saved = manifest.calibration
    if saved is None:
        return ["the bundle holds no calibration statistics"]
    reasons = []
    if method is not None and saved.method != method:
        reasons.append(f"it was calibrated with '{saved.method}', not '{method}'")
    for graph, graph_entry in manifest.graphs.items():
        entry = saved.graphs.get(graph)
        if entry is None and not _needs_calibration(bundle, manifest, graph_entry):
            continue
        if entry is None:
            reasons.append(f"no statistics for {graph}")
        elif entry.source_sha256 != graph_entry.sha256:
            reasons.append(f"{graph} changed since calibration")
        elif not _intact(bundle, manifest, entry.file):
            reasons.append(f"{entry.file} is missing or changed")
    return reasons


def _intact(bundle: Path, manifest: Manifest, name: str) -> bool:
    try:
        bundle_file(bundle, manifest, name)
    except ItmrtError:
        return False
    return True


def _needs_calibration(bundle: Path, manifest: Manifest, graph_entry: GraphEntry) -> bool:
    source = onnx.load(str(bundle_file(bundle, manifest, graph_entry.file)))
    return bool(quantizable_nodes(source, [note.node for note in excluded_nodes(source)]))


def _plan_int8(
    folder: Path, manifest: Manifest, options: PrecisionOptions, force_calibration: bool, say: Log
) -> Int8Plan:
    reasons = saved_calibration(folder, manifest, options.method if options.calib_data is not None else None)
    calibrating = force_calibration or options.recalibrate or bool(reasons)
    if calibrating and options.calib_data is None:
        raise ItmrtError(
            f"int8 needs calibration ({reasons[0]}); pass --calib-data DIR or run `itmrt calibrate BUNDLE --data DIR`"
        )
    data = _open_data(folder, manifest, options) if options.calib_data is not None else None
    if calibrating:
        assert data is not None
        say(f"calibrating with {options.method} on {data.describe()}")
        return Int8Plan(True, options.method, data)
    assert manifest.calibration is not None
    say(f"using the bundle's saved calibration ({manifest.calibration.method}, {manifest.calibration.samples} images): "
        "no recalibration")
    return Int8Plan(False, manifest.calibration.method, data)


def fp16_islands(manifest: Manifest, graph: str, source: onnx.ModelProto, data: CalibrationData | None,
                 feeds: FeedMaker, options: PrecisionOptions) -> tuple[list[NodeNote], str]:
    """The FP32 islands of ``graph``'s fp16 variant, and where they came from: the bundle's fp16 variant when it
    was made from this graph, else those the previous int8 variant of this graph took (a rebuild from saved
    calibration makes the same graph), else measured exactly as :func:`make_fp16` measures them."""
    source_sha256 = manifest.graph(graph).sha256
    made = manifest.variant(Precision.FP16, graph)
    if isinstance(made, Fp16Graph) and made.source_sha256 == source_sha256:
        return list(made.islands), f"the fp16 variant ({made.file})"
    previous = manifest.variant(Precision.INT8, graph)
    if isinstance(previous, Int8Graph) and previous.source_sha256 == source_sha256 and previous.floats == "float16":
        return list(previous.islands), str(previous.islands_from)
    sample = _sample_feeds(manifest, data, graph, feeds)
    chosen = choose_islands(source, sample, _threshold_name(manifest, graph), options.sensitivity)
    return chosen.islands, f"measured as for the fp16 variant on {_sample_name(data)}"


def _int8_graph(folder: Path, manifest: Manifest, graph: str, plan: Int8Plan, feeds: FeedMaker,
                options: PrecisionOptions, say: Log) -> GraphResult:
    """One int8 graph: Q/DQ on the products' inputs, float16 elsewhere with the fp16 variant's FP32 islands."""
    started = time.perf_counter()
    source_entry = manifest.graph(graph)
    source = onnx.load(str(bundle_file(folder, manifest, source_entry.file)))
    exclude = excluded_nodes(source)
    excluded_names = [note.node for note in exclude]
    islands, islands_from = fp16_islands(manifest, graph, source, plan.data, feeds, options)
    products = quantizable_nodes(source, excluded_names)
    ranges_file = calibration_file(graph)
    ranges: bytes | None = None
    quantized, keep_float32 = source, [island.node for island in islands]
    if products:
        reader = (calibration_reader(plan.data, feeds, graph, options.batch_size, options.progress)
                  if plan.calibrating and plan.data is not None else None)
        saved = None if reader is not None else bundle_file(folder, manifest, ranges_file)
        quantized, ranges, added = quantize_graph(source, plan.method, saved or folder / ranges_file, reader,
                                                  excluded_names)
        keep_float32 += [*added, *products]
    model = convert_to_fp16(quantized, keep_float32)
    _verify_int8(model, graph)
    summary = quantization_summary(model)
    sample: Sequence[Feeds] = _sample_feeds(manifest, plan.data, graph, feeds)
    error = output_error(run_model(source, sample), model, sample)
    relative = precision_file(Precision.INT8, graph)
    payload = model.SerializeToString()
    entry = Int8Graph(
        file=relative, sha256=sha256_bytes(payload), source_sha256=source_entry.sha256,
        calibration=ranges_file if products else None, method=plan.method if products else None,
        quantized_nodes=summary.quantized_nodes, per_channel=summary.per_channel, qdq_pairs=summary.qdq_pairs,
        excluded_nodes=exclude, symmetric=True, max_abs_error=error, sample=_sample_name(plan.data),
        floats="float16", islands=islands, islands_from=islands_from,
    )
    say(
        f"int8 {graph}: {len(summary.quantized_nodes)} quantized product(s), {summary.qdq_pairs} Q/DQ pairs, "
        f"{len(exclude)} excluded, float16 elsewhere with {len(islands)} FP32 island(s) ({islands_from}), "
        f"max abs error {error:.2e} ({time.perf_counter() - started:.1f}s)"
    )
    if ranges is None:
        return GraphResult(graph, entry, {relative: payload})
    ranges_entry = CalibrationFile(file=ranges_file, sha256=sha256_bytes(ranges), source_sha256=source_entry.sha256)
    return GraphResult(graph, entry, {relative: payload, ranges_file: ranges}, ranges_entry)


def _verify_int8(model: onnx.ModelProto, graph: str) -> None:
    """The checks every graph gets, then the int8 ones: zero points 0 and TensorRT's Q/DQ placement rules."""
    verify_precision_graph(model, f"int8 {graph}")
    problems = zero_point_problems(model) + placement_problems(model)
    if problems:
        raise ItmrtError(f"int8 {graph}: {problems[0]}")


def _record_int8(m: Manifest, results: list[GraphResult], plan: Int8Plan, say: Log) -> None:
    if plan.calibrating:
        assert plan.data is not None
        if m.calibration is not None:
            say("calibration: replaced the bundle's previous statistics")
        graphs = {result.graph: result.calibration for result in results if result.calibration is not None}
        m.calibration = CalibrationRecord(
            method=plan.method, split=plan.data.split, data=str(plan.data.data_dir.resolve()),
            samples=plan.data.num_samples, data_fingerprint=plan.data.fingerprint, created=timestamp(), graphs=graphs,
        )
        for entry in graphs.values():
            m.record_file(entry.file, entry.sha256)
    _record_variants(m, Precision.INT8, results, say)


def _make_int8(folder: Path, options: PrecisionOptions, say: Log, force_calibration: bool) -> Manifest:
    """Plan (calibrate or reuse the saved ranges) -> one result per graph -> write the files and the manifest."""
    manifest = _open_verified(folder)
    plan = _plan_int8(folder, manifest, options, force_calibration, say)
    feeds = FeedMaker(folder, manifest)
    results = [_int8_graph(folder, manifest, graph, plan, feeds, options, say) for graph in manifest.graphs]
    return _publish(folder, results, lambda m: _record_int8(m, results, plan, say))


def calibrate(bundle: str | Path, options: PrecisionOptions, log: Log | None = None) -> Manifest:
    """Calibrate on ``options.calib_data`` and write the int8 graphs; return the manifest."""
    if options.calib_data is None:
        raise ItmrtError("calibration needs data: pass --data DIR (or --calib-data DIR to build)")
    return _make_int8(Path(bundle), options, _say(log), force_calibration=True)


def make_int8(bundle: str | Path, options: PrecisionOptions | None = None, log: Log | None = None) -> Manifest:
    """Write the int8 graphs, from the bundle's saved calibration when it matches, else by calibrating."""
    return _make_int8(Path(bundle), options or PrecisionOptions(), _say(log), force_calibration=False)


def make_precision_graphs(
    bundle: str | Path, precision: str, options: PrecisionOptions | None = None, log: Log | None = None
) -> Manifest:
    """The graphs ``build`` compiles: fp32 (the export's, verified), fp16 or int8 (made here)."""
    precision = parse_choice(Precision, precision, "precision")
    if precision == Precision.FP16:
        return make_fp16(bundle, options, log)
    if precision == Precision.INT8:
        return make_int8(bundle, options, log)
    folder = Path(bundle)
    manifest = _open_verified(folder)
    for graph, entry in manifest.graphs.items():
        verify_precision_graph(onnx.load(str(bundle_file(folder, manifest, entry.file))), f"fp32 {graph}")
    _say(log)(f"fp32: {len(manifest.graphs)} export graphs verified")
    return manifest
