"""``itmrt bench``: statistics equal those of the saved timings, schema, plot, not-run variants, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from itmrt.reports.bench import STAGES, BenchOptions, latency_stats, run_bench, write_bench
from itmrt.reports.runtime_variants import parse_variants
from itmrt.reports.schema import read_report, schema_problems

from cli_helpers import run_cli
from reports_helpers import is_png
from runtime_helpers import make_bundle

BATCHES = (1, 3)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bench"))[0]


@pytest.fixture(scope="module")
def bench_out(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    options = BenchOptions(variants=parse_variants("ort:fp32,ort:fp16,trt:fp16"), batch_sizes=BATCHES, captions=4,
                           images=4, warmup=1, repeats=5, threads=1)
    report = run_bench(bundle, options, command=["itmrt", "bench", "test"])
    out = write_bench(report, tmp_path_factory.mktemp("bench_report"))
    return out, json.loads((out / "report.json").read_text())


def test_percentiles_equal_numpy_percentiles_of_the_saved_timings(bench_out: tuple[Path, dict]) -> None:
    _, report = bench_out
    (entry,) = [v for v in report["variants"] if v["status"] == "ok"]
    assert {(r["batch_size"], r["stage"]) for r in entry["results"]} == {(b, s) for b in BATCHES for s in STAGES}
    for row in entry["results"]:
        ms = np.array(row["timings_s"]) * 1e3
        assert len(ms) == 5
        for q in (50, 90, 99):
            assert row["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(ms, q))
        assert row["latency_ms"]["min"] == pytest.approx(ms.min())
        assert row["latency_ms"]["max"] == pytest.approx(ms.max())
        mean_s = ms.mean() / 1e3
        if row["stage"] == "image_encode":
            assert row["throughput"]["images_per_s"] == pytest.approx(row["batch_size"] / mean_s)
        else:
            assert row["throughput"]["captions_per_s"] == pytest.approx(row["batch_size"] / mean_s)
        if row["stage"] in ("score", "top_k", "rank", "end_to_end"):
            assert row["throughput"]["pairs_per_s"] == pytest.approx(row["batch_size"] * 4 / mean_s)
    assert entry["rss_peak_bytes"] > 10 * 2**20


def test_latency_stats_of_known_timings() -> None:
    stats = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010])
    assert stats["min"] == pytest.approx(1.0) and stats["max"] == pytest.approx(10.0)
    assert stats["p50"] == pytest.approx(3.0) and stats["mean"] == pytest.approx(4.0)
    assert stats["p90"] == pytest.approx(7.6)  # linear interpolation between 4 and 10 ms


def test_report_validates_records_environment_and_not_run(bench_out: tuple[Path, dict]) -> None:
    out, report = bench_out
    assert schema_problems(report) == []
    read_report(out / "report.json")
    status = {v["name"]: v for v in report["variants"]}
    assert status["ort:fp16"]["status"] == "not_run" and "fp16" in status["ort:fp16"]["reason"]
    assert status["trt:fp16"]["status"] == "not_run"
    env = report["environment"]
    assert env["versions"]["onnxruntime"] and env["cpu"]["logical_cpus"] >= 1
    assert "avx512_vnni" in env["cpu"]["features"]
    markdown = (out / "report.md").read_text()
    assert "| end_to_end | 3 |" in markdown and "trt:fp16" in markdown
    bad = json.loads(json.dumps(report))
    bad["variants"][0]["results"][0]["timings_s"] = []
    assert schema_problems(bad)


def test_latency_plot_is_a_png(bench_out: tuple[Path, dict]) -> None:
    out, report = bench_out
    assert report["plots"] == ["latency_vs_batch.png"]
    assert is_png(out / "latency_vs_batch.png")


def test_cli_bench(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    result = run_cli(capsys, "bench", str(bundle), "--variants", "ort:fp32", "--batch-sizes", "2", "--captions", "2",
                     "--images", "2", "--warmup", "0", "--repeats", "2", "--no-plots", "--no-progress", "--report",
                     str(out))
    assert result.code == 0, result.err
    assert "ort:fp32 end to end, batch 2" in result.out
    assert read_report(out)["settings"]["batch_sizes"] == [2]
    bad = run_cli(capsys, "bench", str(bundle), "--batch-sizes", "1,x", "--report", str(out))
    assert bad.code == 2 and "--batch-sizes" in bad.err
