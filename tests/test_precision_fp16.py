"""FP16 variants: measured FP32 islands, manifest entries, TensorRT op check, ONNX Runtime accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from itmrt.bundle.check import check_bundle
from itmrt.bundle.trt_ops import check_trt_compat
from itmrt.documents import sha256_file
from itmrt.precision.calib_data import FeedMaker, ort_session, random_sample
from itmrt.precision.fp16 import convert_to_fp16, emulation_session, float32_nodes
from itmrt.precision.precision_graphs import make_fp16
from itmrt.precision.sensitivity import SensitivityOptions, choose_islands

from tests.calibration_helpers import THRESHOLD, make_data, make_naaf_bundle


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("fp16")
    bundle = make_naaf_bundle(folder, make_data(folder / "data"))
    manifest = make_fp16(bundle)
    return bundle, manifest


def test_fp16_graphs_are_recorded_verified_and_accurate(fp16_bundle: tuple[Path, dict]) -> None:
    bundle, manifest = fp16_bundle
    feeds = FeedMaker(bundle, manifest)
    images, tokens, lengths = random_sample(manifest, seed=7)
    for graph in ("image_encoder", "text_encoder", "scorer"):
        entry = manifest["precisions"]["fp16"]["graphs"][graph]
        assert entry["file"] == manifest.graph_file("fp16", graph) == f"precision/fp16/{graph}.onnx"
        assert entry["sha256"] == sha256_file(bundle / entry["file"]) == manifest["files"][entry["file"]]
        assert entry["source_sha256"] == manifest["graphs"][graph]["sha256"]
        model = onnx.load(str(bundle / entry["file"]))
        assert check_trt_compat(model, graph).ok
        assert any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer)
        # Inputs/outputs stay float32: callers feed the fp16 graph what they feed the fp32 one.
        assert [i.type.tensor_type.elem_type for i in model.graph.input] == [
            i.type.tensor_type.elem_type for i in onnx.load(str(bundle / manifest["graphs"][graph]["file"])).graph.input
        ]
        feed = feeds.feeds(graph, images, tokens, lengths)  # unseen inputs (another seed)
        reference = ort_session(bundle / manifest["graphs"][graph]["file"]).run(None, feed)[0]
        converted = ort_session(bundle / entry["file"]).run(None, feed)[0]
        assert converted.dtype == np.float32
        assert np.abs(converted - reference).max() <= 1e-2
    assert check_bundle(bundle).ok


def test_recurrent_nodes_stay_float32_for_tensorrts_gru_importer(fp16_bundle: tuple[Path, dict]) -> None:
    """TensorRT's GRU importer adds FP32 constants (initial state, 1 - z, padded-step zeros) to the loop it
    builds: every input of the GRU must be float32 for a strongly typed network to accept it."""
    bundle, manifest = fp16_bundle
    entry = manifest["precisions"]["fp16"]["graphs"]["text_encoder"]
    recurrent = [island for island in entry["islands"] if island["reason"] == "recurrent"]
    assert recurrent and {island["op"] for island in recurrent} == {"GRU"}
    model = onnx.load(str(bundle / entry["file"]))
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    grus = [node for node in model.graph.node if node.op_type == "GRU"]
    assert grus
    for node in grus:
        floats = [
            types.get(name) for name in [*node.input, *node.output] if name and types.get(name) != TensorProto.INT32
        ]
        assert floats and set(floats) == {TensorProto.FLOAT}, node.name


def test_naaf_decisions_stay_float32_with_the_exact_threshold(fp16_bundle: tuple[Path, dict]) -> None:
    bundle, manifest = fp16_bundle
    entry = manifest["precisions"]["fp16"]["graphs"]["scorer"]
    decisions = {island["node"]: island["op"] for island in entry["islands"] if island["reason"] == "decision"}
    assert "shifted_node" in decisions and decisions["shifted_node"] == "Sub"  # the threshold subtraction
    assert {"Less", "Greater"} <= set(decisions.values())
    model = onnx.load(str(bundle / entry["file"]))
    threshold = next(init for init in model.graph.initializer if init.name == manifest["threshold"]["initializer"])
    assert threshold.data_type == TensorProto.FLOAT and numpy_helper.to_array(threshold) == np.float32(THRESHOLD)
    computing_in_fp32 = set(float32_nodes(model))
    assert set(decisions) <= computing_in_fp32
    sims = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name.startswith("sims")]
    assert sims and not set(sims) & computing_in_fp32  # the heavy product is float16


def _single_chain_model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sensitivity_finds_overflowing_reductions() -> None:
    """A sum of squares of values near 300 overflows float16 (65504): it must stay float32."""
    model = _single_chain_model(
        [
            helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
            helper.make_node("ReduceSum", ["sq", "axes"], ["total"], name="sum_sq", keepdims=1),
            helper.make_node("Sqrt", ["total"], ["norm"], name="root"),
            helper.make_node("Div", ["x", "norm"], ["y"], name="normalise"),
        ],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    x = (300 + np.random.default_rng(0).standard_normal((4, 8))).astype(np.float32)
    naive = emulation_session(convert_to_fp16(model)).run(None, {"x": x})[0]
    assert not np.all(np.isfinite(naive)) or np.abs(naive).max() < 0.1  # overflow breaks the naive conversion
    result = choose_islands(model, [{"x": x}])
    reasons = {island.node: island.reason for island in result.islands}
    assert reasons.get("square") == "range" and reasons.get("sum_sq") == "range"
    assert result.final_error < 2e-3
    assert result.model is not None
    fixed = ort_session(result.model.SerializeToString()).run(None, {"x": x})[0]
    reference = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(fixed - reference).max() < 2e-3


def test_emulation_keeps_float16_rounding_that_plain_ort_loses() -> None:
    """ORT's CPU provider runs float16 Adds in float32 and drops the rounding; the emulation graph keeps it."""
    model = _single_chain_model(
        [helper.make_node("Add", ["x", "big"], ["shifted"], name="add_big"),
         helper.make_node("Sub", ["shifted", "big"], ["y"], name="sub_big")],
        [numpy_helper.from_array(np.array(1000.0, dtype=np.float32), "big")],
    )
    converted = convert_to_fp16(model, ["sub_big"])
    x = np.random.default_rng(2).uniform(-1, 1, (4, 8)).astype(np.float32)
    emulated = emulation_session(converted).run(None, {"x": x})[0]
    np.testing.assert_array_equal(emulated * 4, np.round(emulated * 4))  # float16 spacing near 1000 is 0.5
    assert np.abs(emulated - x).max() > 0.05


def test_sensitivity_measures_cancellation_error() -> None:
    """(x + 1000) - 1000 loses x's digits in float16 (spacing 0.5 near 1000): the Add is measured as sensitive."""
    model = _single_chain_model(
        [
            helper.make_node("Add", ["x", "big"], ["shifted"], name="add_big"),
            helper.make_node("Sub", ["shifted", "big2"], ["back"], name="sub_big"),
            helper.make_node("Mul", ["back", "half"], ["y"], name="scale"),
        ],
        [
            numpy_helper.from_array(np.array(1000.0, dtype=np.float32), "big"),
            numpy_helper.from_array(np.array(1000.0, dtype=np.float32), "big2"),
            numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        ],
    )
    x = np.random.default_rng(1).uniform(-1, 1, (4, 8)).astype(np.float32)
    result = choose_islands(model, [{"x": x}], options=SensitivityOptions(target_error=1e-3, node_tolerance=1e-3))
    assert result.node_errors["add_big"] > 0.05  # measured, not assumed
    assert result.node_errors["scale"] < 1e-3
    islands = {island.node: island for island in result.islands}
    assert islands["add_big"].reason == "error" and islands["add_big"].measured == result.node_errors["add_big"]
    assert "scale" not in islands
    assert result.final_error <= 1e-3
