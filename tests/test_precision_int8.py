"""INT8 Q/DQ graphs: calibration from streamed data, saved ranges reused, zero points 0, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from itmrt.bundle.check import check_bundle
from itmrt.bundle.manifest import read_manifest
from itmrt.bundle.trt_ops import check_trt_compat
from itmrt.errors import DataError, ItmrtError, VocabularyError
from itmrt.precision.calib_data import FeedMaker, open_calibration_data, ort_session
from itmrt.precision.int8 import zero_point_problems
from itmrt.precision.precision_graphs import PrecisionOptions, calibrate, make_int8

from tests.calibration_helpers import make_data, make_naaf_bundle


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("int8")
    data = make_data(folder / "data")
    return folder, data, make_naaf_bundle(folder, data)


@pytest.fixture()
def bundle(setup: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(setup[2], tmp_path / "bundle"))


def test_calibrated_int8_graphs_are_symmetric_qdq_and_reused(setup: tuple[Path, Path, Path], bundle: Path) -> None:
    _, data, _ = setup
    lines: list[str] = []
    options = PrecisionOptions(
        calib_data=data, method="minmax", samples=24, min_samples=8, batch_size=8, progress=False
    )
    manifest = calibrate(bundle, options, log=lines.append)
    calibration = manifest["calibration"]
    assert calibration["method"] == "minmax" and calibration["samples"] == 24
    image = manifest["precisions"]["int8"]["graphs"]["image_encoder"]
    scorer = manifest["precisions"]["int8"]["graphs"]["scorer"]
    assert image["per_channel"] is True and image["quantized_nodes"]
    assert any(name.startswith("sims") for name in scorer["quantized_nodes"])  # the similarity product runs in int8
    assert [e["node"] for e in scorer["excluded_nodes"]] == ["propagated_node"]  # it decides NAAF's branch
    text = manifest["precisions"]["int8"]["graphs"]["text_encoder"]
    # GRU: nothing to quantize; it runs in float16 with the GRU kept float32, as in the fp16 variant
    assert text["qdq_pairs"] == 0 and text["floats"] == "float16"
    assert [island["node"] for island in text["islands"]] == ["gru_l0_node"]
    assert "FP32 island(s)" in " ".join(lines)
    for graph in ("image_encoder", "scorer"):
        entry = manifest["precisions"]["int8"]["graphs"][graph]
        model = onnx.load(str(bundle / entry["file"]))
        assert zero_point_problems(model) == []
        assert sum(node.op_type == "QuantizeLinear" for node in model.graph.node) > 0
        assert check_trt_compat(model, graph).ok
        ranges = json.loads((bundle / calibration["graphs"][graph]["file"]).read_text())
        assert ranges["CLS"] == "TensorsData" and ranges["data"]
        assert entry["max_abs_error"] < 0.5
    assert check_bundle(bundle).ok

    # A rebuild without data quantizes from the saved ranges: same graphs, no calibration pass.
    lines.clear()
    again = make_int8(bundle, PrecisionOptions(progress=False), log=lines.append)
    assert any("no recalibration" in line for line in lines)
    for graph in ("image_encoder", "scorer"):
        assert (again["precisions"]["int8"]["graphs"][graph]["sha256"]
                == manifest["precisions"]["int8"]["graphs"][graph]["sha256"])

    # The int8 scorer runs in ORT and stays close to fp32 on calibration-like data.
    calib = open_calibration_data(bundle, again, data, "train", 8, 1)
    images, tokens, lengths = next(calib.paired_batches(8))
    feeds = FeedMaker(bundle, again).feeds("scorer", images, tokens, lengths)
    reference = ort_session(bundle / "scorer.onnx").run(None, feeds)[0]
    quantized = ort_session(bundle / scorer["file"]).run(None, feeds)[0]
    assert np.abs(quantized - reference).max() < 0.1


def test_int8_without_saved_calibration_needs_data(bundle: Path) -> None:
    with pytest.raises(ItmrtError, match="--calib-data DIR"):
        make_int8(bundle, PrecisionOptions(progress=False))


def test_calibration_folder_must_match_the_bundle(setup: tuple[Path, Path, Path], bundle: Path, tmp_path: Path) -> None:
    folder, data, _ = setup
    manifest = read_manifest(bundle)
    wrong_dims = make_data(tmp_path / "wide", img_dim=48)
    with pytest.raises(DataError, match="regions x 48 features") as dims_error:
        open_calibration_data(bundle, manifest, wrong_dims, min_samples=8)
    other_vocab = tmp_path / "vocab_mismatch"
    shutil.copytree(data, other_vocab)
    vocab = json.loads((other_vocab / "vocab.json").read_text())
    word = next(w for w in vocab["word2idx"] if not w.startswith("<"))
    index = vocab["word2idx"].pop(word)
    vocab["word2idx"]["zzz"] = index
    vocab["idx2word"][str(index)] = "zzz"
    (other_vocab / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(VocabularyError, match="not the bundle's vocabulary") as vocab_error:
        open_calibration_data(bundle, manifest, other_vocab, min_samples=8)
    with pytest.raises(DataError, match="needs at least 100") as few_error:
        calibrate(bundle, PrecisionOptions(calib_data=data, min_samples=100, progress=False))
    for error in (dims_error, vocab_error, few_error):
        assert "\n" not in str(error.value)
    with pytest.raises(ItmrtError, match="unknown calibration method"):
        calibrate(bundle, PrecisionOptions(calib_data=data, method="mean", min_samples=8, progress=False))


def test_entropy_clips_ranges_that_minmax_keeps(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Entropy is a real KL search (a 2048-bin histogram), not min-max in disguise (ORT's 128/128 default)."""
    _, data, source = setup
    highest = {}
    for method in ("entropy", "minmax"):
        bundle = Path(shutil.copytree(source, tmp_path / method))
        options = PrecisionOptions(
            calib_data=data, method=method, samples=24, min_samples=8, batch_size=8, progress=False
        )
        manifest = calibrate(bundle, options)
        ranges = json.loads((bundle / manifest["calibration"]["graphs"]["image_encoder"]["file"]).read_text())["data"]

        def top(entry: dict) -> float:
            value = entry["highest"]
            return float(value["data"][0] if isinstance(value, dict) else value)

        highest[method] = {name: top(entry) for name, entry in ranges.items()}
    shared = sorted(set(highest["entropy"]) & set(highest["minmax"]))
    assert shared
    assert all(highest["entropy"][name] <= highest["minmax"][name] + 1e-6 for name in shared)
    assert any(highest["entropy"][name] < 0.9 * highest["minmax"][name] for name in shared)
