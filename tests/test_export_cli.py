"""``itmrt export`` and ``itmrt check`` on the command line: progress lines, exit status 2, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from itmrt.cli.app import app
from itmrt.families.released import matcher_from_opt, save_released_checkpoint
from itmrt.text.vocab import Vocabulary

VOCAB = 30
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    opt = {"vocab_size": VOCAB, "img_dim": 24, "embed_size": 16, "word_dim": 8, "thres_safe": 0.2}
    checkpoint = tmp_path / "naaf.pth.tar"
    save_released_checkpoint(checkpoint, matcher_from_opt(opt, "naaf"))
    vocab = tmp_path / "vocab.json"
    Vocabulary.from_words(f"w{i}" for i in range(VOCAB - 4)).to_json(vocab)
    return checkpoint, vocab


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "itmrt", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )


def test_export_then_check(files: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, vocab = files
    out = tmp_path / "bundle"
    result = CliRunner().invoke(
        app, ["export", str(checkpoint), "--vocab", str(vocab), "--out", str(out), "--num-regions", "5", "--threshold",
              "0.3"]
    )
    assert result.exit_code == 0, result.output
    assert "TensorRT 10 op check: 3 graphs pass" in result.output
    assert "frozen threshold 0.3 (--threshold override)" in result.output
    assert "parity (ONNX Runtime CPU vs PyTorch), worst abs error: image_encoder" in result.output
    assert "export finished in" in result.output
    assert json.loads((out / "manifest.json").read_text())["threshold"]["source"] == "--threshold override"

    checked = CliRunner().invoke(app, ["check", str(out)])
    assert checked.exit_code == 0, checked.output
    assert "ok: scorer.onnx" in checked.output and "naaf bundle verified" in checked.output


def test_errors_exit_2_with_one_line(files: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, vocab = files
    missing = run_cli("export", str(tmp_path / "missing.pth.tar"), "--vocab", str(vocab), "--out", str(tmp_path / "b"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'missing.pth.tar'} does not exist"]

    small_vocab = tmp_path / "small.json"
    Vocabulary.from_words(["a"]).to_json(small_vocab)
    wrong = run_cli("export", str(checkpoint), "--vocab", str(small_vocab), "--out", str(tmp_path / "b"))
    assert wrong.returncode == 2
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1 and "has 5 words but the checkpoint's embedding has 30 rows" in lines[0]
    assert not (tmp_path / "b").exists()

    not_a_bundle = run_cli("check", str(tmp_path))
    assert not_a_bundle.returncode == 2
    assert not_a_bundle.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no manifest.json: it is not a complete itmrt bundle; export it again"
    ]


def test_check_reports_each_problem(files: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, vocab = files
    out = tmp_path / "bundle"
    assert CliRunner().invoke(app, ["export", str(checkpoint), "--vocab", str(vocab), "--out", str(out)]).exit_code == 0
    (out / "text_encoder.onnx").unlink()
    result = run_cli("check", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "file 'text_encoder.onnx': missing",
        f"error: bundle {out} failed 1 check(s) (listed above)",
    ]


def test_help_lists_the_options() -> None:
    result = CliRunner().invoke(app, ["export", "--help"])
    assert result.exit_code == 0
    for option in ("--vocab", "--out", "--threshold", "--opset", "--overwrite", "--max-batch", "--max-length"):
        assert option in result.output
