"""``itmrt report compare``: flags throughput and recall drops beyond the tolerances (CI exit status)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from itmrt.errors import ItmrtError
from itmrt.reports.bench import BenchOptions, run_bench, write_bench
from itmrt.reports.compare import compare_reports
from itmrt.reports.parity_report import ParityOptions, run_parity
from itmrt.reports.runtime_variants import parse_variants

from cli_helpers import run_cli
from reports_helpers import make_bundle_and_data


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("compare")
    bundle, data = make_bundle_and_data(folder, images=4)
    bench = run_bench(bundle, BenchOptions(variants=parse_variants("ort:fp32"), batch_sizes=(2,), captions=2, images=2,
                                           warmup=0, repeats=2, threads=1))
    parity = run_parity(
        bundle, data, ParityOptions(against="ort:fp32", variants=parse_variants("ort:fp32"), threads=1)
    ).report
    return {"bench": bench, "parity": parity}


def _slower(report: dict, stage: str, factor: float) -> dict:
    changed = copy.deepcopy(report)
    for row in changed["variants"][0]["results"]:
        if row["stage"] == stage:
            row["throughput"] = {k: v * factor for k, v in row["throughput"].items()}
    return changed


def test_throughput_drop_beyond_tolerance_is_a_regression(reports: dict[str, dict]) -> None:
    bench = reports["bench"]
    assert not compare_reports(bench, bench).regressed
    halved = _slower(bench, "end_to_end", 0.5)
    result = compare_reports(bench, halved, max_throughput_drop=0.1)
    assert result.regressed and len(result.regressions) == 1 and "end_to_end batch 2" in result.regressions[0]
    assert not compare_reports(bench, halved, max_throughput_drop=0.6).regressed
    assert not compare_reports(bench, _slower(bench, "end_to_end", 0.95), max_throughput_drop=0.1).regressed


def test_recall_drop_beyond_tolerance_is_a_regression(reports: dict[str, dict]) -> None:
    parity = reports["parity"]
    assert not compare_reports(parity, parity).regressed
    worse = copy.deepcopy(parity)
    worse["variants"][0]["recall"]["t2i_r5"] -= 2.0
    worse["variants"][0]["recall"]["rsum"] -= 2.0
    result = compare_reports(parity, worse, max_recall_drop=1.0)
    assert [r.split()[1] for r in result.regressions] == ["t2i_r5", "rsum"]
    assert not compare_reports(parity, worse, max_recall_drop=2.5).regressed


def test_a_variant_that_stops_running_is_a_regression(reports: dict[str, dict]) -> None:
    bench = reports["bench"]
    gone = copy.deepcopy(bench)
    gone["variants"][0].update(status="not_run", reason="no engine", results=[])
    assert compare_reports(bench, gone).regressed
    with pytest.raises(ItmrtError, match="same kind"):
        compare_reports(bench, reports["parity"])


def test_cli_compare_exit_status(reports: dict[str, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_bench(copy.deepcopy(reports["bench"]), a, plots=False)
    write_bench(_slower(reports["bench"], "score", 0.5), b, plots=False)
    same = run_cli(capsys, "report", "compare", str(a / "report.json"), str(a / "report.json"))
    assert same.code == 0 and "no regression" in same.out
    slower = run_cli(capsys, "report", "compare", str(a), str(b), "--max-throughput-drop", "0.2")
    assert slower.code == 1 and "REGRESSION" in slower.out and "score batch 2" in slower.out
    tolerant = run_cli(capsys, "report", "compare", str(a), str(b), "--max-throughput-drop", "0.9")
    assert tolerant.code == 0
    (tmp_path / "junk.json").write_text(json.dumps({"kind": "other"}))
    junk = run_cli(capsys, "report", "compare", str(a), str(tmp_path / "junk.json"))
    assert junk.code == 2 and "not an itmrt report" in junk.err
