"""TensorRT 10 op check: the shipped table, passing graphs, and readable failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from itmrt.bundle.trt_ops import OPS_TABLE, check_trt_compat, load_op_table
from itmrt.errors import ItmrtError
from itmrt.families.naaf.graphs import naaf_scorer_graph
from itmrt.families.scan.graphs import scan_scorer_graph


def make_model(nodes: list, inputs: list, outputs: list, opset: int = 17, initializers: list | None = None):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_shipped_table_equals_the_shared_copy(shared_dir: Path) -> None:
    assert OPS_TABLE.read_bytes() == (shared_dir / "data" / "tensorrt10_onnx_ops.tsv").read_bytes()


def test_table_parsing() -> None:
    table = load_op_table()
    assert table["GRU"].supported and table["GRU"].types == {"FP32", "FP16", "BF16"}
    assert not table["Bernoulli"].supported
    assert "INT64" in table["ConstantOfShape"].types  # the source's "INF64" typo is read as INT64
    assert table["Selu"].types == {"FP32", "FP16", "BF16"}  # trailing comma ignored
    assert len(table) > 150


def test_exported_scorers_pass() -> None:
    for model in (
        naaf_scorer_graph(8, 0.1, 20.0, 5.0, 17), scan_scorer_graph(8, "i2t", "softmax", "Max", 4.0, 6.0, 20)
    ):
        result = check_trt_compat(model, "scorer.onnx")
        assert result.ok, result.message()
        assert result.ops["Less"] >= 1 and result.ops["MatMul"] >= 2


def test_unsupported_op_is_reported_with_op_and_node_name() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu_ok"),
        helper.make_node("Bernoulli", ["r"], ["y"], name="coin_flip"),
    ]
    result = check_trt_compat(make_model(nodes, [x], [y]), "bad.onnx")
    assert not result.ok
    assert result.problems == ["op 'Bernoulli' (node 'coin_flip'): not supported by TensorRT 10's ONNX parser"]
    with pytest.raises(
        ItmrtError, match=r"^bad.onnx will not compile with TensorRT 10: op 'Bernoulli' \(node 'coin_flip'\)"
    ):
        result.raise_for_problems()


def test_unsupported_type_is_reported() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3])
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Add", ["x64", "x64"], ["y"], name="double_add"),
    ]
    result = check_trt_compat(make_model(nodes, [x], [y]))
    assert len(result.problems) == 4  # Cast's output, Add's two inputs and its output
    assert result.problems[0].startswith("op 'Cast' (node 'to_double'): output 0 'x64' is FP64; supported: ")
    assert "op 'Add' (node 'double_add'): input 0 'x64' is FP64" in result.message()


def test_index_inputs_are_checked_against_their_own_types() -> None:
    table = helper.make_tensor("table", TensorProto.FLOAT, [5, 2], np.arange(10, dtype=np.float32))
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32, [3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 2])
    good = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["out"], name="lookup")], [ids], [out], initializers=[table]
    )
    assert check_trt_compat(good).ok  # int32 indices are fine although Gather's data types are listed


def test_custom_domain_and_opset_out_of_range() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    plugin = helper.make_node("MyPlugin", ["x"], ["y"], name="plugin", domain="com.example")
    model = make_model([plugin], [x], [y])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    result = check_trt_compat(model)
    assert any("custom domain 'com.example'" in p for p in result.problems)
    relu = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [y], opset=21)
    relu.ir_version = 10
    assert any("opset 21 is outside TensorRT 10's 9-20" in p for p in check_trt_compat(relu).problems)
