"""``benchmarks/gpu_acceptance.py --quick`` runs on any machine: what needs a GPU, TensorRT or onnxruntime-gpu is
listed as skipped with the reason, everything else runs, and one report folder comes out."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _acceptance(out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--quick"]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900, check=False)


@pytest.mark.slow
def test_quick_acceptance_run_reports_every_step(tmp_path: Path) -> None:
    out = tmp_path / "gpu_report"
    done = _acceptance(out)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "itmrt-gpu-acceptance" and report["quick"] is True
    steps = {step["name"]: step for step in report["steps"]}
    assert report["summary"]["failed"] == 0
    for step in report["steps"]:
        assert step["status"] in ("ok", "skipped"), step
        if step["status"] == "skipped":
            assert step["reason"], step
        if not step["gpu_bound"] and not step["name"].startswith("cmpm"):
            assert step["status"] == "ok", step  # everything that needs no GPU ran
    have_trt = importlib.util.find_spec("tensorrt") is not None
    for precision in ("fp32", "fp16", "int8"):
        engines = steps[f"naaf: {precision} TensorRT engines"]
        assert engines["gpu_bound"] and (engines["status"] == "ok") == have_trt
        assert steps[f"naaf: {precision} graphs"]["status"] == "ok"
    fp16 = steps["naaf: fp16 graphs"]["result"]["graphs"]["text_encoder"]["islands"]
    assert any("[recurrent]" in island for island in fp16)  # the GRU stays FP32 for TensorRT's importer
    parity = steps["naaf: parity against PyTorch"]["result"]["variants"]
    assert parity["ort:fp32"]["status"] == "ok" and parity["ort:fp32"]["score_max_abs"] < 1e-4
    assert (parity["trt:fp16"]["status"] == "ok") == have_trt
    cuda_step = steps["PyTorch reference on CUDA, Flickr30K size (1000 x 5000)"]
    if not _cuda():
        assert cuda_step["status"] == "skipped" and "CUDA" in cuda_step["reason"]
        cpu_run = steps["PyTorch reference on the CPU (8 x 16, reduced)"]["result"]
        assert cpu_run["batched_vs_loop"]["max_abs"] < 1e-4 and cpu_run["loop"]["pairs_per_s"] > 0
        memory = cpu_run["memory"]
        assert 0 < memory["peak_bytes"] <= 2 * memory["budget_bytes"]  # the tiled reference keeps its budget
    tf32 = steps["naaf: TF32 emulated (CPU)"]["result"]
    assert tf32["max_abs"] > 0 and tf32["emulated_products"]["scorer"] > 0
    markdown = (out / "report.md").read_text()
    assert all(name in markdown for name in steps) and "| skipped |" in markdown
    for sub in ("naaf_parity_torch", "naaf_parity_ort_cpu", "naaf_bench"):
        assert json.loads((out / sub / "report.json").read_text())["kind"] in ("parity", "bench")

    again = _acceptance(out)  # refused at once: the report is there
    assert again.returncode == 2 and "already holds a GPU acceptance report; pass --overwrite" in again.stderr
