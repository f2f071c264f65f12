"""Export parity on the shipped trained models (issue: <= 1e-5 through ONNX Runtime, identical top-10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from itmrt.demo import shipped_model
from itmrt.export.bundle import ExportOptions, export_bundle
from itmrt.synthetic.region_features import vocabulary_json
from itmrt.text.vocab import Vocabulary
from itmrt.train.recipes import SHIPPED_FILES


@pytest.mark.parametrize("family", ["naaf", "scan", "cmpm"])
def test_shipped_models_export_within_1e5(family: str, tmp_path: Path) -> None:
    checkpoint = shipped_model(SHIPPED_FILES[family])
    if checkpoint is None:
        pytest.skip(f"{SHIPPED_FILES[family]} is not in itmrt/assets")
    vocab = tmp_path / "vocab.json"
    Vocabulary(vocabulary_json()["word2idx"]).to_json(vocab)  # the synthetic data's vocabulary they were trained with
    manifest = export_bundle(checkpoint, vocab, tmp_path / "bundle", ExportOptions())
    parity = manifest["parity"]
    assert parity["top10_identical"] is True
    for graph, error in parity["max_abs_error"].items():
        assert error <= 1e-5, (graph, error)


def test_shipped_naaf_learned_a_positive_threshold_and_the_bundle_freezes_it(tmp_path: Path) -> None:
    """The recipe's NAAF ends with thres_safe = mean+ - 3 std+ > 0 (not reset to 0), stored in the released opt."""
    checkpoint = shipped_model(SHIPPED_FILES["naaf"])
    if checkpoint is None:
        pytest.skip("naaf_small.pth.tar is not in itmrt/assets")
    from itmrt.families.checkpoints import load_checkpoint

    opt = load_checkpoint(checkpoint).opt
    assert 0.0 < opt["thres_safe"] < opt["thres"] < 1.0
    vocab = tmp_path / "vocab.json"
    Vocabulary(vocabulary_json()["word2idx"]).to_json(vocab)
    manifest = export_bundle(checkpoint, vocab, tmp_path / "bundle", ExportOptions())
    assert manifest["threshold"]["value"] == pytest.approx(opt["thres_safe"])
