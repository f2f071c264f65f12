"""`itmrt demo` end to end on the shipped model (the README's first command)."""

from __future__ import annotations

import json

import pytest

from itmrt.demo import SHIPPED_NAAF, SHIPPED_SCAN, run_demo, shipped_model
from itmrt.errors import ItmrtError


def test_demo_runs_the_pipeline_and_writes_a_summary(tmp_path):
    if shipped_model(SHIPPED_NAAF) is None:
        pytest.skip("no shipped model in itmrt/assets: the demo would train one (minutes)")
    lines: list[str] = []
    result = run_demo(tmp_path / "demo", log=lines.append)
    assert set(result.recall) == {"torch", "ort:fp32", "ort:fp16", "ort:int8"}
    assert result.recall["ort:fp32"] == pytest.approx(result.recall["torch"])
    fp32 = result.parity["ort:fp32"]
    # Within 1e-5 except the rare pair where a similarity sits within float rounding of the frozen
    # threshold and NAAF's mask flips (2 of 50,000 pairs on the shipped model); rankings unaffected.
    assert fp32["pairs_over_1e-5"] <= 1e-4 * fp32["pairs"] and fp32["max_abs_error"] < 1e-3
    assert fp32["t2i_top1_agreement"] == 1.0
    assert abs(result.parity["ort:fp16"]["rsum_change"]) <= 1.0
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["recall"]["torch"]["rsum"] == result.recall["torch"]["rsum"]
    assert (tmp_path / "demo" / "bundle" / "manifest.json").is_file()
    assert any(line.startswith("latency (ort:fp32") for line in lines)

    # NAAF's point: example queries name an object one image of a pair lacks; NAAF's and SCAN's
    # mismatched-word accuracies are printed beside the recall table.
    if shipped_model(SHIPPED_SCAN) is None:
        return
    assert set(result.mismatch) == {"NAAF (bundle, fp32)", "SCAN (PyTorch)"}
    naaf, scan = result.mismatch["NAAF (bundle, fp32)"], result.mismatch["SCAN (PyTorch)"]
    assert naaf["own_image"]["count"] == scan["own_image"]["count"] > 0
    assert naaf["own_image"]["accuracy"] > scan["own_image"]["accuracy"]
    assert result.examples
    for example in result.examples:
        assert example["missing"] in example["caption"].split() and " no " not in f" {example['caption']} "
        assert set(example["top3"]) == set(result.mismatch)
    assert "torch scan" in result.baseline_recall
    assert any(line.startswith("mismatched words") for line in lines)
    assert any("itmrt explain" in line for line in lines)
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["mismatched_words"] == result.mismatch


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ItmrtError, match="not made by itmrt demo"):
        run_demo(tmp_path / "mine", log=lambda _m: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
