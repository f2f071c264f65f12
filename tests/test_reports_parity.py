"""``itmrt parity``: numbers recomputed independently from the saved score matrices, tolerances, schema, plots, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from itmrt.metrics.recall import recall_table
from itmrt.reports import agreement, parity_report
from itmrt.reports.parity_report import ParityOptions, apply_tolerances, run_parity, write_parity
from itmrt.reports.runtime_variants import parse_variants
from itmrt.reports.schema import read_report, schema_problems

from cli_helpers import run_cli
from reports_helpers import is_png, make_bundle_and_data

ASSETS = Path(__file__).resolve().parents[1] / "itmrt" / "assets"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parity_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("parity")
    bundle, data = make_bundle_and_data(folder)
    options = ParityOptions(against="torch", variants=parse_variants("ort:fp32,ort:int8,trt:fp16"), threads=1)
    run = run_parity(bundle, data, options, command=["itmrt", "parity", "test"])
    out = write_parity(run, folder / "report")
    return out, json.loads((out / "report.json").read_text())


def test_recall_and_errors_equal_ones_recomputed_from_saved_matrices(parity_out: tuple[Path, dict]) -> None:
    out, report = parity_out
    reference = np.load(out / report["reference"]["scores_file"])
    assert reference.shape == (8, 40)
    assert report["reference"]["recall"] == pytest.approx(recall_table(reference))
    (entry,) = [v for v in report["variants"] if v["status"] == "ok"]
    scores = np.load(out / entry["scores_file"])
    recall = recall_table(scores)
    assert entry["recall"] == pytest.approx(recall)
    assert entry["recall_delta"]["rsum"] == pytest.approx(recall["rsum"] - report["reference"]["recall"]["rsum"])
    diff = np.abs(scores.astype(np.float64) - reference.astype(np.float64))
    end = entry["tensors"]["end_to_end"]
    assert end["max_abs"] == pytest.approx(diff.max())
    assert end["mean_abs"] == pytest.approx(diff.mean())
    assert tuple(end["worst_index"]) == np.unravel_index(np.argmax(diff), diff.shape)
    assert 0 < end["max_abs"] < 1e-5  # float32 ONNX Runtime against float32 PyTorch: rounding only


def test_retrieval_agreement_equals_one_recomputed_by_hand(parity_out: tuple[Path, dict]) -> None:
    out, report = parity_out
    (entry,) = [v for v in report["variants"] if v["status"] == "ok"]
    reference = np.load(out / report["reference"]["scores_file"]).astype(np.float64)
    scores = np.load(out / entry["scores_file"]).astype(np.float64)
    for direction, (ref, got) in {"i2t": (reference, scores), "t2i": (reference.T, scores.T)}.items():
        top1 = np.mean(ref.argmax(axis=1) == got.argmax(axis=1))
        overlap = np.mean(
            [len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / min(10, ref.shape[1]) for a, b in zip(ref, got)]
        )
        ranks = lambda m: np.argsort(np.argsort(-m, axis=1, kind="stable"), axis=1, kind="stable")  # noqa: E731
        rho = [np.corrcoef(a, b)[0, 1] for a, b in zip(ranks(ref), ranks(got))]
        measured = entry["retrieval"][direction]
        assert measured["top1_agreement"] == pytest.approx(top1)
        assert measured["top10_overlap"] == pytest.approx(overlap)
        assert measured["spearman_mean"] == pytest.approx(np.mean(rho))


def test_spearman_detects_a_reordering() -> None:
    reference = np.arange(12, dtype=np.float64).reshape(2, 6)
    got = reference.copy()
    got[0] = got[0][::-1]  # row 0 ranked backwards: rho = -1
    result = agreement.retrieval_agreement(reference, got, k=3)["i2t"]
    assert result["spearman_min"] == pytest.approx(-1.0)
    assert result["spearman_mean"] == pytest.approx(0.0)
    assert result["top1_agreement"] == 0.5
    assert result["top3_overlap"] == pytest.approx(0.5)


def test_top1_swaps_within_the_score_tolerance_are_ties_not_disagreements() -> None:
    # query 0: its two best candidates differ by 1e-7 in the reference and the variant swaps them;
    # query 1: the variant's top-1 sits 0.3 below the reference's best, a real disagreement.
    reference = np.array([[0.5, 0.5 + 1e-7, 0.1], [0.9, 0.6, 0.2]], dtype=np.float64)
    got = np.array([[0.5 + 1e-7, 0.5, 0.1], [0.6, 0.9, 0.2]], dtype=np.float64)
    direction = agreement.retrieval_agreement(reference, got, k=2)["i2t"]
    assert direction["top1_agreement"] == 0.0
    assert direction["top1_gaps"] == pytest.approx([0.3, 1e-7])
    assert agreement.top1_agreement_within(direction, 1e-4) == 0.5
    assert agreement.top1_agreement_within(direction, 1e-8) == 0.0
    assert agreement.top1_agreement_within(direction, 0.5) == 1.0
    # the parity check uses the precision's score tolerance as the tie band
    entry = {
        "tensors": {"end_to_end": {"max_abs": 1e-7, "nonfinite": 0}},
        "recall_delta": {"rsum": 0.0},
        "retrieval": {"i2t": direction, "t2i": agreement.retrieval_agreement(reference, got, k=2)["t2i"]},
    }
    tolerances = {"score_max_abs": 1e-4, "rsum_abs_delta": 0.5, "top1_agreement_min": 0.5, "flip_rate_max": 1e-3}
    (top1_check,) = [c for c in parity_report.evaluate_checks(entry, tolerances) if c["name"].startswith("top-1")]
    assert top1_check["value"] == 0.5 and top1_check["passed"]
    tolerances["top1_agreement_min"] = 0.99
    (top1_check,) = [c for c in parity_report.evaluate_checks(entry, tolerances) if c["name"].startswith("top-1")]
    assert not top1_check["passed"]


def test_variants_the_machine_or_bundle_lacks_are_reported_not_run(parity_out: tuple[Path, dict]) -> None:
    out, report = parity_out
    status = {v["name"]: v for v in report["variants"]}
    assert status["ort:fp32"]["status"] == "ok"
    assert status["ort:int8"]["status"] == "not_run" and "int8" in status["ort:int8"]["reason"]
    assert status["trt:fp16"]["status"] == "not_run"
    markdown = (out / "report.md").read_text()
    assert "## Not run" in markdown and "trt:fp16" in markdown


def test_pass_fail_flips_when_a_tolerance_is_tightened_below_the_measured_error(parity_out: tuple[Path, dict]) -> None:
    _, report = parity_out
    (entry,) = [v for v in report["variants"] if v["status"] == "ok"]
    ties = entry["threshold_ties"]
    error = ties["max_abs_off_threshold"] if ties else entry["tensors"]["end_to_end"]["max_abs"]
    assert entry["passed"] and report["passed"]
    tightened = apply_tolerances(copy.deepcopy(report), {"score_max_abs": error / 2})
    (judged,) = [v for v in tightened["variants"] if v["status"] == "ok"]
    failed = [c for c in judged["checks"] if not c["passed"]]
    assert [c["name"].split(" (")[0] for c in failed] == ["end-to-end score max abs error"]
    assert not judged["passed"] and not tightened["passed"]
    loosened = apply_tolerances(copy.deepcopy(report), {"score_max_abs": error * 2})
    assert loosened["passed"]


def test_decision_flips_match_a_direct_reading_of_the_spec() -> None:
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    tokens = unit(rng.standard_normal((5, 8)))
    regions = unit(rng.standard_normal((3, 4, 8)))
    positive, negative = agreement.naaf_decisions(tokens, regions, threshold=0.1)
    for image in range(3):
        s = tokens @ regions[image].T
        r = (s - 0.1).max(axis=1)
        for i in range(5):
            w = np.exp(5 * tokens[i] @ tokens.T)
            q = (w / w.sum()) @ r
            assert negative[i, image] == (q < 0)
            assert np.array_equal(positive[i, image], s[i] - 0.1 > 0)
    moved = unit(tokens + 0.2 * rng.standard_normal(tokens.shape))
    flips = agreement.naaf_decision_flips([tokens], regions, [moved], regions, 0.1)
    expected = np.count_nonzero(agreement.naaf_decisions(moved, regions, 0.1)[0] != positive)
    assert flips["region_flips"] == expected > 0
    assert flips["region_flip_rate"] == pytest.approx(expected / positive.size)


def test_report_validates_and_plots_are_pngs(parity_out: tuple[Path, dict]) -> None:
    out, report = parity_out
    assert schema_problems(report) == []
    assert read_report(out)["kind"] == "parity"
    assert sorted(report["plots"]) == ["recall_by_variant.png", "score_errors.png"]
    for name in report["plots"]:
        assert is_png(out / name)
    broken = copy.deepcopy(report)
    del broken["variants"][0]["tensors"]
    assert schema_problems(broken)


def test_cli_parity_against_ort_fp32_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, data = make_bundle_and_data(tmp_path, images=4)
    out = tmp_path / "report"
    result = run_cli(capsys, "parity", str(bundle), "--data", str(data), "--against", "ort:fp32",
                     "--variants", "ort:fp32", "--no-plots", "--no-progress", "--report", str(out))
    assert result.code == 0, result.err
    assert "ort:fp32: pass" in result.out
    report = read_report(out / "report.json")
    assert report["variants"][0]["tensors"]["end_to_end"]["max_abs"] == 0.0
    bad = run_cli(capsys, "parity", str(bundle), "--data", str(data), "--variants", "onnx:fp8", "--report", str(out))
    assert bad.code == 2 and "unknown variant" in bad.err
    again = ["parity", str(bundle), "--data", str(data), "--against", "ort:fp32", "--variants", "ort:fp32",
             "--no-plots",
             "--no-progress", "--report", str(out)]
    refused = run_cli(capsys, *again)
    assert refused.code == 2 and "already holds a report; pass --overwrite" in refused.err
    assert run_cli(capsys, *again, "--overwrite").code == 0


@pytest.mark.slow
@pytest.mark.skipif(not (ASSETS / "naaf_small.pth.tar").is_file(), reason="no trained small NAAF in itmrt/assets")
def test_trained_small_naaf_parity(tmp_path: Path) -> None:
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.train.recipes import make_region_data

    data = make_region_data(tmp_path / "data")
    bundle = tmp_path / "bundle"
    export_bundle(ASSETS / "naaf_small.pth.tar", data / "vocab.json", bundle, ExportOptions(num_regions=36))
    run = run_parity(bundle, data, ParityOptions(variants=parse_variants("ort:fp32"), max_images=50))
    (entry,) = run.report["variants"]
    assert entry["passed"], entry["checks"]
    assert run.report["reference"]["recall"]["rsum"] > 100  # a trained model, not chance


def test_threshold_ties_leave_out_pairs_with_a_similarity_at_the_threshold() -> None:
    from itmrt.reports.agreement import threshold_ties

    rng = np.random.default_rng(0)
    regions = rng.standard_normal((3, 4, 8))
    tokens = [rng.standard_normal((2, 8)) for _ in range(5)]
    reference = rng.standard_normal((3, 5))
    got = reference + 1e-7
    t = float(tokens[2][1] @ regions[1, 3])  # pair (image 1, caption 2) has a similarity exactly at the threshold
    got[1, 2] += 0.3  # ... and the largest error: a mask flip
    got[0, 4] += 0.02  # an ordinary pair with the next largest error
    result = threshold_ties(reference, got, tokens, regions, t)
    assert result["tie_pairs"] == 1 and result["pairs_examined"] == 2
    assert result["max_abs_off_threshold"] == pytest.approx(0.02, abs=1e-6)
    # Moved off the threshold, the same pair counts again.
    ties = threshold_ties(reference, got, tokens, regions, t + 0.01)
    assert ties["max_abs_off_threshold"] == pytest.approx(0.3, abs=1e-6)
