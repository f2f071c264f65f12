"""INT8 Q/DQ graphs from calibration: ONNX Runtime's calibrators for the ranges, itmrt's own Q/DQ placement.

What TensorRT 10/11 compile from explicit quantization, and how it is made:

- QuantizeLinear/DequantizeLinear pairs on the heavy products' inputs only
  (``MatMul``, ``Gemm``, ``Conv``), each origin quantized once before any
  reshape or transpose, no dequantized tensor feeding an elementwise op
  (:mod:`itmrt.precision.qdq`, which names TensorRT's rules). ONNX Runtime's
  ``quantize_static`` placed a pair on every product input separately - the
  same data quantized twice, with two scales, around a reshape or transpose -
  and let a dequantized tensor feed elementwise Muls; TensorRT leaves such
  DequantizeLinear layers unfused and rounds twice.
- Symmetric int8 with every zero point 0 (TensorRT's requirement):
  activations ``amax / 127`` from the calibrated range, constant weights per
  output channel (MatMul weight axis 1, Conv axis 0); biases stay float
  (TensorRT's DequantizeLinear takes no int32 input).
  :func:`zero_point_problems` proves the zero points on the written graph.
- Softmax, norms, reductions, NAAF's threshold subtraction and its comparisons
  are not products and are never quantized; a product whose result feeds a
  branch comparison directly (NAAF's propagated decision) is excluded.
- The rest of the graph is the fp16 variant's: float16 with the same FP32
  islands (:func:`itmrt.precision.precision_graphs.make_int8`). The Q/DQ
  pairs, the data movement between them and the products, and the products
  themselves stay float32-typed (opset 17's QuantizeLinear takes float32),
  so a strongly typed TensorRT network fuses each DequantizeLinear into its
  product and runs everything else where the fp16 engine does.
- Activation ranges come from a calibration pass (entropy, percentile or
  min-max) over a streamed sample of the user's data, run with ORT's
  calibrators and explicit histogram sizes (:data:`HISTOGRAM_OPTIONS`): ORT's
  default for entropy is 128 bins for 128 quantized levels, which leaves KL no
  threshold to choose but the full range, so "entropy" would silently equal
  min-max. The ranges are saved (ORT's ``TensorsData`` JSON) and the bundle
  keeps the file as ``calibration/<graph>.json``; a rebuild passes it back and
  does not read the data again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization import CalibrationMethod as OrtCalibrationMethod

from itmrt.bundle.manifest import NodeNote
from itmrt.bundle.names import parse_choice
from itmrt.documents import parse_json
from itmrt.errors import ItmrtError, first_line
from itmrt.precision import CalibrationMethod as Method
from itmrt.precision.qdq import PASS_THROUGH_OPS, QUANTIZED_OPS, insert_qdq, quantized_products

ORT_METHODS: dict[str, OrtCalibrationMethod] = {
    Method.ENTROPY.value: OrtCalibrationMethod.Entropy,
    Method.PERCENTILE.value: OrtCalibrationMethod.Percentile,
    Method.MINMAX.value: OrtCalibrationMethod.MinMax,
}
HISTOGRAM_OPTIONS: dict[str, dict[str, float]] = {
    # TensorRT's entropy calibrator's sizes: a 2048-bin histogram searched for the 128-level
    # threshold with the least KL divergence.
    Method.ENTROPY.value: {"num_bins": 2048, "num_quantized_bins": 128},
    Method.PERCENTILE.value: {"num_bins": 2048, "percentile": 99.999},
    Method.MINMAX.value: {},
}
COMPARISON_OPS = frozenset({"Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Equal"})


def calibration_method(name: str) -> OrtCalibrationMethod:
    """ONNX Runtime's calibrator for a method name (a one-line error naming the choices for another name)."""
    return ORT_METHODS[parse_choice(Method, name, "calibration method").value]


def excluded_nodes(model: onnx.ModelProto) -> list[NodeNote]:
    """Products whose output reaches a float comparison through reshaping ops only (a branch decision)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def feeds_comparison(tensor: str, depth: int = 0) -> bool:
        for consumer in consumers.get(tensor, []):
            if consumer.op_type in COMPARISON_OPS:
                return True
            if consumer.op_type in PASS_THROUGH_OPS and depth < 8 and any(
                feeds_comparison(o, depth + 1) for o in consumer.output
            ):
                return True
        return False

    return [
        NodeNote(node=node.name, op=node.op_type, reason="decides a branch (feeds a comparison)")
        for node in model.graph.node
        if node.op_type in QUANTIZED_OPS and any(feeds_comparison(output) for output in node.output)
    ]


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ORT's quantizer logs advice on the root logger and its calibrators print progress to stdout;
    keep the CLI readable."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def quantize_graph(
    model: onnx.ModelProto,
    method: str,
    cache_path: Path,
    reader: CalibrationDataReader | None,
    exclude: list[str],
) -> tuple[onnx.ModelProto, bytes, list[str]]:
    """Q/DQ int8 graph of ``model`` (float32 elsewhere), the calibration ranges (ORT's TensorsData JSON) it
    used, and the names of the nodes the placement added.

    With ``reader``, calibrate; without it, quantize from the ranges saved at
    ``cache_path``. Nothing is written to the bundle here: the caller writes
    the graph and the ranges together with the manifest.
    """
    if reader is None and not cache_path.is_file():
        raise ItmrtError(f"no calibration statistics at {cache_path}; run `itmrt calibrate BUNDLE --data DIR` first")
    if reader is None:
        ranges = cache_path.read_bytes()
    else:
        with tempfile.TemporaryDirectory(prefix=".itmrt-int8-") as work:
            source, cache = Path(work) / "model.onnx", Path(work) / "ranges.json"
            onnx.save(model, str(source))
            _calibrate(source, method, reader, cache, Path(work) / "augmented.onnx")
            ranges = cache.read_bytes()
    check_ranges(ranges, cache_path.name)
    with _one_line("place the Q/DQ pairs"):
        quantized, added = insert_qdq(model, quantizable_nodes(model, exclude), parse_ranges(ranges))
    return quantized, ranges, added


def parse_ranges(ranges: bytes) -> dict[str, tuple[float, float]]:
    """``{tensor: (lowest, highest)}`` from ORT's TensorsData JSON (numbers, or numpy-array records)."""
    def number(value: object) -> float:
        if isinstance(value, dict):
            value = value.get("data")
        if isinstance(value, list):
            value = value[0] if value else 0.0
        return float(value)  # type: ignore[arg-type]

    data = parse_json(ranges).get("data", {})
    return {name: (number(entry["lowest"]), number(entry["highest"])) for name, entry in data.items()}


def check_ranges(ranges: bytes, name: str) -> None:
    """Refuse activation ranges that are not finite JSON numbers: quantization would divide by them
    (ONNX Runtime stops with an assertion, "scale issue")."""
    try:
        parse_json(ranges)
    except (ValueError, RecursionError):
        raise ItmrtError(
            f"the INT8 activation ranges ({name}) are NaN or infinite: the calibration data drives the graph out of "
            "float range (values far larger than the model's inputs); calibrate on data like the model's inputs"
        ) from None


@contextmanager
def _one_line(doing: str) -> Iterator[None]:
    """ONNX Runtime's quantization tools fail with their own exception types: one line naming what failed."""
    try:
        yield
    except ItmrtError:
        raise
    except Exception as exc:  # noqa: BLE001 - AssertionError, ValueError, ORT's own types
        raise ItmrtError(f"ONNX Runtime could not {doing}: {first_line(exc) or type(exc).__name__}; "
                         "check the calibration data") from None


def _calibrate(model_path: Path, method: str, reader: CalibrationDataReader, cache: Path, augmented: Path) -> None:
    """Run ``method``'s calibrator over ``reader`` and save the ranges as ORT's TensorsData JSON at ``cache``."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    with _quiet_quantizer():
        calibrator = create_calibrator(
            model_path, list(QUANTIZED_OPS), augmented_model_path=str(augmented),
            calibrate_method=calibration_method(method), extra_options=dict(HISTOGRAM_OPTIONS[Method(method).value]),
        )
        with _one_line("calibrate the graph"):
            calibrator.collect_data(reader)
            save_tensors_data(calibrator.compute_data(), cache)
    del calibrator


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def qdq_pairs(model: onnx.ModelProto) -> int:
    return sum(1 for node in model.graph.node if node.op_type == "DequantizeLinear")


def zero_point_problems(model: onnx.ModelProto) -> list[str]:
    """Every QuantizeLinear/DequantizeLinear must have an int8 zero point of 0 (TensorRT's explicit quantization)."""
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{node.op_type} '{node.name}': no zero point (defaults to uint8)")
            continue
        zero_point = _initializer(model, node.input[2])
        if zero_point is None:
            problems.append(f"{node.op_type} '{node.name}': zero point '{node.input[2]}' is not a constant")
        elif zero_point.dtype != np.int8 or np.any(zero_point != 0):
            problems.append(
                f"{node.op_type} '{node.name}': zero point {zero_point.dtype} "
                f"{zero_point.ravel()[:4].tolist()} is not int8 0"
            )
    return problems


def quantizable_nodes(model: onnx.ModelProto, exclude: list[str]) -> list[str]:
    """Nodes that :func:`quantize_graph` would quantize (none: the graph stays float32, nothing to calibrate)."""
    return [node.name for node in model.graph.node if node.op_type in QUANTIZED_OPS and node.name not in exclude]


@dataclass
class QuantizationSummary:
    """Which nodes compute on dequantized int8 inputs, whether any weight is per-channel, how many Q/DQ pairs."""

    quantized_nodes: list[str]
    per_channel: bool
    qdq_pairs: int


def _per_channel(model: onnx.ModelProto, dequantize: onnx.NodeProto) -> bool:
    scale = _initializer(model, dequantize.input[1])
    return any(attr.name == "axis" for attr in dequantize.attribute) and scale is not None and scale.size > 1


def quantization_summary(model: onnx.ModelProto) -> QuantizationSummary:
    """What :func:`quantize_graph` made of a graph (recorded in its manifest entry)."""
    dequantized = [node for node in model.graph.node if node.op_type == "DequantizeLinear"]
    per_channel = any(_per_channel(model, node) for node in dequantized)
    return QuantizationSummary(quantized_products(model), per_channel, qdq_pairs(model))
