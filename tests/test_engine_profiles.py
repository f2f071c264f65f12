"""Optimisation profiles sized for a device (estimated by ONNX shape inference on a real exported scorer),
the TF32 emulation, and the layer summary read from TensorRT's engine-inspector JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from itmrt.bundle.manifest import read_manifest
from itmrt.engine.build import EngineOptions, engine_ranges
from itmrt.engine.layers import parse_layer_json, summarize_layers
from itmrt.engine.profiles import BOARDS, estimate_peaks, fit_ranges, largest_intermediate, manifest_ranges
from itmrt.precision.tf32 import tf32_emulation_graph, tf32_max_error, tf32_record

from runtime_helpers import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("profiles"))[0]


def test_largest_intermediate_is_the_scorers_similarity_tensor(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    d = manifest["dims"]["embed_size"]
    size, name = largest_intermediate(
        bundle / "scorer.onnx", {"image_embeddings": [8, 10, d], "caption_embeddings": [16, 12, d], "lengths": [16]}
    )
    assert size == 8 * 16 * 12 * 10 * 4, name  # [images, captions, words, regions] float32


def test_a_board_halves_the_batch_maxima_until_the_budget_holds(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    graphs = {g: (entry.file, entry) for g, entry in manifest.graphs.items()}
    ranges = {}
    for entry in manifest.graphs.values():
        ranges.update(manifest_ranges(entry))
    full = max(estimate_peaks(bundle, graphs, ranges).values())
    fitted, peak = fit_ranges(bundle, graphs, ranges, full // 4)
    assert peak <= full // 4
    assert (
        fitted["batch_images"][2] * fitted["batch_captions"][2] * 4
        <= ranges["batch_images"][2] * ranges["batch_captions"][2]
    )
    assert fitted["max_length"] == ranges["max_length"]  # captions are never cut to fit
    for axis in ("batch_images", "batch_captions"):
        low, opt, high = fitted[axis]
        assert 1 <= low <= opt <= high
    tiny, _ = fit_ranges(bundle, graphs, ranges, 1)
    assert tiny["batch_images"][2] == tiny["batch_images"][0] and tiny["batch_captions"][2] == tiny["batch_captions"][0]


def test_engine_ranges_apply_the_board_then_the_command_line(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = read_manifest(bundle)
    monkeypatch.setitem(BOARDS, "test-board", BOARDS["orin-nano"].__class__("test", 1, True, 0, 512))
    messages: list[str] = []
    ranges = engine_ranges(bundle, manifest, "fp32", EngineOptions(board="test-board"), messages.append)
    assert ranges["batch_images"][2] == 1 and ranges["batch_captions"][2] == 1 and "board test-board" in messages[0]
    overridden = engine_ranges(
        bundle,
        manifest,
        "fp32",
        EngineOptions(board="test-board", axis_ranges={"batch_images": (1, 2, 4)}),
        messages.append,
    )
    assert overridden["batch_images"] == (1, 2, 4) and overridden["batch_captions"][2] == 1
    plain = engine_ranges(bundle, manifest, "fp32", EngineOptions(), messages.append)
    assert plain["batch_images"] == (1, 16, 16)  # the export's ranges (max_batch 16)


def test_tf32_emulation_rounds_every_product_and_changes_the_outputs(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    model = onnx.load(str(bundle / "scorer.onnx"))
    emulated, products = tf32_emulation_graph(model)
    assert products == sum(1 for node in model.graph.node if node.op_type in ("MatMul", "Gemm", "Conv"))
    assert products > 0
    onnx.checker.check_model(emulated)
    rng = np.random.default_rng(0)
    d = manifest["dims"]["embed_size"]
    feeds = {
        "image_embeddings": rng.standard_normal((3, 10, d)).astype(np.float32),
        "caption_embeddings": rng.standard_normal((4, 6, d)).astype(np.float32),
        "lengths": np.array([6, 5, 3, 1], np.int32),
    }
    messages: list[str] = []
    error = tf32_max_error(model, [feeds])
    assert 1e-6 < error < 1e-1  # 11 significant bits: about 2^-11 relative per operand
    assert {g: r.to_json() for g, r in tf32_record(bundle, manifest, EngineOptions(), messages.append).items()} == {
        g: {"enabled": False} for g in manifest["graphs"]
    }
    recorded = tf32_record(bundle, manifest, EngineOptions(tf32=True), lambda _m: None)
    assert recorded["scorer"].enabled and recorded["scorer"].max_abs_error_fp32_graph > 0  # type: ignore[operator]


LAYERS = {
    "Layers": [
        {
            "Name": "image_embeddings_quantize",
            "LayerType": "Scale",
            "Inputs": [
                {"Name": "image_embeddings", "Dimensions": [8, 10, 32], "Format/Datatype": "Row major linear FP32"}
            ],
            "Outputs": [{"Name": "q", "Dimensions": [8, 10, 32], "Format/Datatype": "Row major Int8 format"}],
        },
        {
            "Name": "sims_matmul + weights_dq",
            "LayerType": "CaskGemmMatrixMultiply",
            "Inputs": [{"Name": "q", "Dimensions": [8, 10, 32], "Format/Datatype": "Row major Int8 format"}],
            "Outputs": [{"Name": "sims", "Dimensions": [8, 10, 12], "Format/Datatype": "Row major linear FP32"}],
        },
        {
            "Name": "scores_reduce",
            "LayerType": "Reduce",
            "Inputs": [{"Name": "sims", "Dimensions": [8, 10, 12], "Format/Datatype": "Row major linear FP32"}],
            "Outputs": [{"Name": "scores", "Dimensions": [8, 12], "Format/Datatype": "Row major linear FP32"}],
        },
    ],
    "Bindings": ["image_embeddings", "scores"],
}


def test_layer_summary_finds_unfused_qdq_and_int8_matmuls() -> None:
    data = parse_layer_json(json.dumps(LAYERS))
    summary = summarize_layers(data, ["sims_matmul", "gram_matmul"])
    assert summary["detailed"] and summary["layers"] == 3
    assert summary["layer_types"] == {"CaskGemmMatrixMultiply": 1, "Reduce": 1, "Scale": 1}
    assert summary["unfused_qdq"] == [{"layer": "image_embeddings_quantize", "role": "quantize"}]
    assert summary["int8_layers"] == 1
    assert summary["matmuls"][0]["int8"] is True and summary["matmuls"][0]["layer"] == "sims_matmul + weights_dq"
    assert summary["matmuls"][1] == {
        "node": "gram_matmul",
        "layer": None,
        "layer_type": None,
        "input_formats": [],
        "int8": None,
    }
    names_only = summarize_layers(parse_layer_json(json.dumps({"Layers": ["a", "b"]})))
    assert names_only == {"layers": 2, "detailed": False}
    with pytest.raises(TypeError):
        parse_layer_json("[1, 2]")
