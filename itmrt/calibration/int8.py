"""INT8 Q/DQ graphs from calibration, with ONNX Runtime's quantization tools.

What TensorRT 10/11 compile from explicit quantization, and how it is made:

- ``QuantFormat.QDQ``: QuantizeLinear/DequantizeLinear pairs around the
  quantized ops; the rest of the graph stays float32.
- Symmetric int8 activations and weights (``ActivationSymmetric`` /
  ``WeightSymmetric``), so every zero point is 0 (TensorRT's requirement);
  :func:`zero_point_problems` proves it on the written graph.
- Per-channel weights along the output channel (MatMul weight axis 1, Conv
  axis 0), which TensorRT supports; biases stay float (``QuantizeBias`` off:
  TensorRT's DequantizeLinear takes no int32 input); Q/DQ on the products'
  inputs only.
- Only the heavy products (``MatMul``, ``Gemm``, ``Conv``) are quantized.
  Softmax, norms, reductions, NAAF's threshold subtraction and its comparisons
  stay float by construction; a product whose result feeds a branch
  comparison directly (NAAF's propagated decision) is listed in
  ``nodes_to_exclude``.
- Activation ranges come from a calibration pass (entropy, percentile or
  min-max) over a streamed sample of the user's data, run here with ORT's
  calibrators and explicit histogram sizes (:data:`HISTOGRAM_OPTIONS`):
  ``quantize_static`` would build the entropy calibrator with 128 bins for 128
  quantized levels, which leaves KL no threshold to choose but the full range,
  so "entropy" would silently equal min-max. The ranges are saved
  (``calibration_cache_path``: a JSON ``TensorsData``) and the bundle keeps the
  file as ``calibration/<graph>.json``; a rebuild passes it back and does not
  read the data again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization import CalibrationMethod as OrtCalibrationMethod

from itmrt.bundle.manifest import NodeNote
from itmrt.bundle.names import parse_choice
from itmrt.calibration import CalibrationMethod as Method
from itmrt.errors import ItmrtError, first_line
from itmrt.io import parse_json

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
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
PASS_THROUGH_OPS = frozenset({"Identity", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Flatten"})
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
) -> tuple[onnx.ModelProto, bytes]:
    """Q/DQ int8 graph of ``model`` and the calibration ranges (ORT's TensorsData JSON) it used.

    With ``reader``, calibrate; without it, quantize from the ranges saved at
    ``cache_path``. Nothing is written to the bundle here: the caller writes
    the graph and the ranges together with the manifest.
    """
    _require_calibration_cache()
    if reader is None and not cache_path.is_file():
        raise ItmrtError(f"no calibration statistics at {cache_path}; run `itmrt calibrate BUNDLE --data DIR` first")
    with tempfile.TemporaryDirectory(prefix=".itmrt-int8-") as work:
        source = Path(work) / "model.onnx"
        target = Path(work) / "model.int8.onnx"
        cache = Path(work) / "ranges.json"
        onnx.save(model, str(source))
        if reader is None:
            shutil.copyfile(cache_path, cache)
        else:
            _calibrate(source, method, reader, cache, Path(work) / "augmented.onnx")
        check_ranges(cache.read_bytes(), cache_path.name)
        with _quiet_quantizer(), _one_line("quantize the graph"):
            quantize_static(
                str(source),
                str(target),
                calibration_data_reader=None,  # the ranges come from the cache written above
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=calibration_method(method),
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "QuantizeBias": False,
                    # Q/DQ on the products' inputs only (TensorRT's recommended placement): a Q/DQ on
                    # their outputs would round the float result once more for no speed.
                    "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                },
                calibration_cache_path=str(cache),
            )
        return onnx.load(str(target)), cache.read_bytes()


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


def _require_calibration_cache() -> None:
    """Saved calibration ranges need ORT's calibration cache (quantize_static's ``calibration_cache_path``)."""
    import inspect

    import onnxruntime

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise ItmrtError(
            f"INT8 graphs need an onnxruntime whose quantize_static saves calibration ranges (calibration_cache_path; "
            f"itmrt is tested with 1.32); this machine has {onnxruntime.__version__}: upgrade onnxruntime, or "
            "calibrate on another machine and copy the bundle here"
        )


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
    dequantized = {node.output[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}
    quantized = [node.name for node in model.graph.node
                 if node.op_type in QUANTIZED_OPS and all(name in dequantized for name in node.input[:2])]
    per_channel = any(_per_channel(model, node) for node in dequantized.values())
    return QuantizationSummary(quantized, per_channel, qdq_pairs(model))
