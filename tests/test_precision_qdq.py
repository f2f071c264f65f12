"""Q/DQ placement: each product input quantized once at its origin, before any reshape or transpose; no
dequantized tensor feeds an elementwise op; the int8 graph is the fp16 variant's mixed-precision graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from itmrt.precision.calib_data import ort_session
from itmrt.precision.fp16 import float32_nodes
from itmrt.precision.precision_graphs import PrecisionOptions, calibrate, make_fp16
from itmrt.precision.qdq import (
    insert_qdq,
    placement_problems,
    quantized_products,
    symmetric_scale,
    trace_origin,
)

from tests.calibration_helpers import make_data, make_naaf_bundle


def _graph() -> onnx.ModelProto:
    """x [2, 3, 4] -> Reshape [6, 4] -> MatMul with a constant w [4, 5]; x also feeds a Mul (elementwise);
    y [6, 6] -> Transpose -> MatMul with x's reshape (a second product reading the same origin)."""
    make = helper.make_node
    nodes = [
        make("Reshape", ["x", "shape"], ["x_flat"], name="flatten_x"),
        make("MatMul", ["x_flat", "w"], ["xw"], name="product_w"),
        make("Mul", ["x", "x"], ["x_sq"], name="square"),
        make("Transpose", ["y"], ["y_t"], name="transpose_y", perm=[1, 0]),
        make("MatMul", ["y_t", "x_flat"], ["yx"], name="product_y"),
    ]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 6])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
         for name, shape in (("xw", [6, 5]), ("x_sq", [2, 3, 4]), ("yx", [6, 4]))],
        [numpy_helper.from_array(np.array([6, 4], dtype=np.int64), "shape"),
         numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


RANGES = {"x_flat": (-2.0, 1.5), "y_t": (-1.0, 3.0)}


def test_each_origin_is_quantized_once_and_only_products_read_it() -> None:
    model = _graph()
    quantized, added = insert_qdq(model, ["product_w", "product_y"], RANGES)
    onnx.checker.check_model(quantized, full_check=True)
    ops = [node.op_type for node in quantized.graph.node]
    assert ops.count("QuantizeLinear") == 2  # x and y, once each: not x_flat and y_t again
    assert ops.count("DequantizeLinear") == 3  # x, y and the weight
    assert placement_problems(quantized) == []
    assert sorted(quantized_products(quantized)) == ["product_w", "product_y"]
    square = next(node for node in quantized.graph.node if node.name == "square")
    assert list(square.input) == ["x", "x"]  # the elementwise op reads the float tensor
    q_inputs = {node.input[0] for node in quantized.graph.node if node.op_type == "QuantizeLinear"}
    assert q_inputs == {"x", "y"}  # quantized before the reshape and the transpose
    assert set(added) >= {"flatten_x__int8_path", "transpose_y__int8_path"}
    scale = next(init for init in quantized.graph.initializer if init.name == "x__scale")
    assert float(numpy_helper.to_array(scale)) == pytest.approx(2.0 / 127)
    weight_scale = next(init for init in quantized.graph.initializer if init.name == "w__scale")
    assert numpy_helper.to_array(weight_scale).shape == (5,)  # one scale per output column
    assert "w" not in {init.name for init in quantized.graph.initializer}  # stored as int8 only

    rng = np.random.default_rng(1)
    feeds = {
        "x": rng.uniform(-2, 1.5, (2, 3, 4)).astype(np.float32),
        "y": rng.uniform(-1, 3, (6, 6)).astype(np.float32),
    }
    exact = ort_session(model.SerializeToString()).run(None, feeds)
    approx = ort_session(quantized.SerializeToString()).run(None, feeds)
    np.testing.assert_array_equal(exact[1], approx[1])  # the Mul saw float x
    for a, b in ((exact[0], approx[0]), (exact[2], approx[2])):
        assert 0 < np.abs(a - b).max() < 0.1


def test_the_old_placement_is_flagged() -> None:
    """ONNX Runtime's quantize_static placement: a pair on every product input, after the reshape, and the
    dequantized tensor shared with an elementwise op."""
    make = helper.make_node
    scale = numpy_helper.from_array(np.array(0.02, dtype=np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "z")
    nodes = [
        make("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_x"),
        make("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x"),
        make("Reshape", ["xd", "shape"], ["x_flat"], name="flatten_x"),
        make("QuantizeLinear", ["x_flat", "s", "z"], ["fq"], name="q_flat"),
        make("DequantizeLinear", ["fq", "s", "z"], ["fd"], name="dq_flat"),
        make("Mul", ["xd", "xd"], ["x_sq"], name="square"),
    ]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("x_sq", TensorProto.FLOAT, [2, 3, 4]),
                               helper.make_tensor_value_info("fd", TensorProto.FLOAT, [6, 4])],
                              [scale, zero, numpy_helper.from_array(np.array([6, 4], dtype=np.int64), "shape")])
    problems = placement_problems(helper.make_model(graph))
    assert any("quantized twice" in p for p in problems)
    assert any("feeds Mul square" in p for p in problems)


def test_trace_and_scale_helpers() -> None:
    model = _graph()
    assert trace_origin(model, "x_flat") == ("x", ("flatten_x",))
    assert trace_origin(model, "xw") == ("xw", ())
    assert symmetric_scale(-0.5, 0.25) == pytest.approx(0.5 / 127)
    assert symmetric_scale(0.0, 0.0) > 0
    with pytest.raises(ValueError, match="no calibrated range"):
        insert_qdq(model, ["product_y"], {})


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qdq")
    data = make_data(folder / "data")
    bundle = make_naaf_bundle(folder, data)
    options = PrecisionOptions(calib_data=data, method="minmax", samples=24, min_samples=8, batch_size=8,
                               progress=False)
    make_fp16(bundle, options)
    calibrate(bundle, options)
    return bundle


def test_int8_graphs_are_the_fp16_graphs_with_qdq_products(calibrated: Path, tmp_path: Path) -> None:
    import json

    bundle = Path(shutil.copytree(calibrated, tmp_path / "bundle"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    fp16 = manifest["precisions"]["fp16"]["graphs"]
    for graph, entry in manifest["precisions"]["int8"]["graphs"].items():
        assert entry["floats"] == "float16"
        assert entry["islands"] == fp16[graph]["islands"] and "fp16 variant" in entry["islands_from"]
        model = onnx.load(str(bundle / entry["file"]))
        assert placement_problems(model) == []
        islands = {island["node"] for island in entry["islands"]}
        qdq_region = {node.name for node in model.graph.node
                      if node.op_type in ("QuantizeLinear", "DequantizeLinear") or "__int8_path" in node.name}
        unexpected = set(float32_nodes(model)) - islands - qdq_region - set(entry["quantized_nodes"])
        assert not unexpected, f"{graph}: float32 outside the islands and the quantized products: {unexpected}"
    scorer = manifest["precisions"]["int8"]["graphs"]["scorer"]
    assert scorer["qdq_pairs"] == 4 and len(scorer["quantized_nodes"]) == 4
