"""A bundle opens and is searched where only the base install is present: a fresh venv with ``pip install .`` (no
extras: numpy, onnx, onnxruntime, typer, tqdm; no torch), through the Python API and the CLI.

Slow (a venv and an install, about a minute or two; bounded by timeouts): the packages come from the configured
index, as a user's install would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # to export the bundle here (the base venv never sees torch)

from runtime_helpers import make_bundle, random_captions, region_features  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("search_without_torch.py")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _run(command: list[str], timeout: int, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def _base_venv(root: Path) -> Path:
    """A venv holding ``pip install .`` of a copy of this checkout (so the checkout gets no build files)."""
    source = root / "src"
    shutil.copytree(REPO / "itmrt", source / "itmrt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], 120)
    assert made.returncode == 0, made.stderr
    installed = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)], 900)
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"the base dependencies cannot be installed here: {installed.stderr.strip().splitlines()[-1]}")
    assert installed.returncode == 0, installed.stderr[-2000:]
    return venv


def test_a_bundle_opens_and_is_searched_with_only_the_base_install(tmp_path: Path) -> None:
    from itmrt.runtime import load

    bundle, _, _ = make_bundle(tmp_path / "made")
    features, captions = region_features(8, seed=5), random_captions(6, seed=6)
    np.save(tmp_path / "features.npy", features)
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    venv = _base_venv(tmp_path)
    python, env = str(venv / "bin" / "python"), {**os.environ, "PYTHONPATH": ""}

    no_torch = _run([python, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"], 60, env=env)
    assert no_torch.stdout.strip() == "True", "the base venv must not see torch"

    # the Python API, run from outside the checkout so the installed package is the one imported
    searched = _run([python, str(SCRIPT), str(bundle), str(tmp_path / "features.npy"), str(tmp_path / "captions.txt"),
                     str(tmp_path / "api")], 300, env=env, cwd=tmp_path)
    assert searched.returncode == 0, searched.stderr
    found = json.loads(searched.stdout.splitlines()[-1])
    runtime = load(bundle, threads=1)
    expected = runtime.search_text_to_image(captions, runtime.encode_images(features), k=3)
    assert Path(found["itmrt"]).is_relative_to(venv), found["itmrt"]  # the installed package, not this checkout
    assert found["torch_side_imported"] == [] and found["top3"] == expected.indices.tolist()
    np.testing.assert_allclose(found["scores"], expected.scores, rtol=1e-5, atol=1e-6)

    # the CLI: check, index, infer against the gallery
    itmrt = str(venv / "bin" / "itmrt")
    for command in (
        [itmrt, "check", str(bundle)],
        [itmrt, "index", str(bundle), "--images", str(tmp_path / "features.npy"), "--out", str(tmp_path / "gallery"),
         "--threads", "1"],
        [itmrt, "infer", str(tmp_path / "gallery"), "--captions", str(tmp_path / "captions.txt"), "--top-k", "3",
         "--threads", "1", "--out", str(tmp_path / "results.jsonl")],
    ):
        ran = _run(command, 300, env=env, cwd=tmp_path)
        assert ran.returncode == 0, f"{' '.join(command[1:3])}: {ran.stderr}"
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by_caption = [line["images"] for line in lines if line["query"] == "caption"]
    assert by_caption == expected.indices.tolist()

    # itmrt parity: against the bundle's own fp32 graphs it runs; against PyTorch it says in one line what to install
    from calibration_helpers import make_data, make_naaf_bundle

    data = make_data(tmp_path / "data", images=12)
    parity_bundle = make_naaf_bundle(tmp_path / "parity", data)
    parity = [itmrt, "parity", str(parity_bundle), "--data", str(data), "--split", "train", "--variants", "ort:fp32",
              "--no-plots", "--no-progress", "--threads", "1"]
    ran = _run([*parity, "--against", "ort:fp32", "--report", str(tmp_path / "report")], 300, env=env, cwd=tmp_path)
    assert ran.returncode == 0 and "ort:fp32: pass" in ran.stdout, ran.stderr
    refused = _run([*parity, "--report", str(tmp_path / "report_torch")], 300, env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "pip install 'itmrt[export]'" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr

