"""CMPM precision variants: calibration from *images* (not region features) on the shipped trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from itmrt.bundle.trt_ops import check_trt_compat
from itmrt.data.images import ImageCaptionSplit, preprocess_images
from itmrt.errors import DataError
from itmrt.export.bundle import ExportOptions, export_bundle
from itmrt.metrics.recall import identity_recall_table
from itmrt.precision.int8 import zero_point_problems
from itmrt.precision.precision_graphs import PrecisionOptions, calibrate
from itmrt.runtime import load
from itmrt.synthetic.identity_images import make_synthetic_image_dataset

from tests.calibration_helpers import make_data

ASSETS = Path(__file__).resolve().parents[1] / "itmrt" / "assets"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shipped CMPM exported to a bundle, and a small image split drawn like its training data."""
    folder = tmp_path_factory.mktemp("cmpm_int8")
    data = make_synthetic_image_dataset(folder / "data", {"train": 24, "test": 24}, seed=5, image_size=64)
    bundle = folder / "bundle"
    export_bundle(
        ASSETS / "cmpm_small.safetensors", data / "vocab.json", bundle, ExportOptions(max_batch=32, max_length=24)
    )
    return bundle, data


def test_image_calibration_makes_symmetric_qdq_graphs_that_keep_recall(setup: tuple[Path, Path]) -> None:
    bundle, data = setup
    lines: list[str] = []
    options = PrecisionOptions(
        calib_data=data, method="percentile", samples=32, min_samples=8, batch_size=8, progress=False
    )
    manifest = calibrate(bundle, options, log=lines.append)
    assert manifest["calibration"]["samples"] == 32  # 24 identities x 2 images: 32 of the 48 images sampled
    image_entry = manifest["precisions"]["int8"]["graphs"]["image_encoder"]
    assert image_entry["quantized_nodes"] and image_entry["per_channel"] is True
    model = onnx.load(str(bundle / image_entry["file"]))
    assert sum(node.op_type == "QuantizeLinear" for node in model.graph.node) > 10  # the convolutions run in int8
    assert zero_point_problems(model) == []
    assert check_trt_compat(model, "image_encoder").ok

    # Held-out images: int8 stays close to fp32 and keeps the identity recall.
    split = ImageCaptionSplit.open(data, "test")
    pixels = preprocess_images(np.asarray(split.images))
    tables, scores = {}, {}
    for precision in ("fp32", "int8"):
        runtime = load(bundle, precision=precision, warn=lambda _message: None)
        scores[precision] = runtime.score(runtime.encode_images(pixels), runtime.encode_captions(split.captions))
        tables[precision] = identity_recall_table(scores[precision], split.image_labels, split.caption_labels)
    assert tables["fp32"]["rsum"] > 300  # the shipped model is trained: far above chance on this split
    assert abs(tables["int8"]["rsum"] - tables["fp32"]["rsum"]) <= 8.0
    assert 0 < np.abs(scores["int8"] - scores["fp32"]).max() < 0.5  # quantised, and not wildly off


def test_region_features_are_refused_for_an_image_bundle(setup: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, _ = setup
    regions = make_data(tmp_path / "regions")
    with pytest.raises(DataError) as caught:
        calibrate(bundle, PrecisionOptions(calib_data=regions, samples=8, min_samples=8, batch_size=8, progress=False))
    assert "\n" not in str(caught.value)
