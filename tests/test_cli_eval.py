"""`itmrt eval`: the recall table on a synthetic split, and one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from itmrt.families.matcher import CrossAttentionMatcher
from itmrt.families.released import save_released_checkpoint
from itmrt.synthetic.region_features import make_synthetic_dataset
from itmrt.text.vocab import Vocabulary

from cli_helpers import run_cli

IMG_DIM = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", {"test": 12}, seed=3, img_dim=IMG_DIM)


@pytest.fixture(scope="module")
def checkpoint(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vocab = Vocabulary.from_json(dataset / "vocab.json")
    opt = {"img_dim": IMG_DIM, "embed_size": 16, "word_dim": 8, "vocab_size": len(vocab), "thres_safe": 0.1,
           "precomp_enc_text_type": "basic"}
    path = tmp_path_factory.mktemp("ckpt") / "model_best.pth.tar"
    save_released_checkpoint(path, CrossAttentionMatcher.from_opt(opt, family="naaf"))
    return path


def _one_line_error(result) -> str:
    assert result.code == 2, (result.code, result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    return lines[0]


def test_eval_prints_recall_table_and_writes_json(capsys, dataset, checkpoint, tmp_path):
    out_json = tmp_path / "recall.json"
    scores_npy = tmp_path / "scores.npy"
    result = run_cli(capsys, "eval", str(checkpoint), "--vocab", str(dataset / "vocab.json"), "--data", str(dataset),
                     "--split", "test", "--json", str(out_json), "--scores-out", str(scores_npy), "--no-progress")
    assert result.code == 0, result.err
    assert "rsum" in result.out and "R@1" in result.out
    table = json.loads(out_json.read_text())["recall"]
    scores = np.load(scores_npy)
    assert scores.shape == (12, 60) and scores.dtype == np.float32
    from itmrt.metrics.recall import recall_table

    assert table == pytest.approx(recall_table(scores))
    assert f"{table['rsum']:.1f}" in result.out

    # Existing outputs are kept unless --overwrite: refused before any work, files untouched.
    before = out_json.read_bytes()
    args = ["eval", str(checkpoint), "--vocab", str(dataset / "vocab.json"), "--data", str(dataset), "--split", "test",
            "--json", str(out_json), "--no-progress"]
    assert "already exists; pass --overwrite" in _one_line_error(run_cli(capsys, *args))
    assert out_json.read_bytes() == before
    assert run_cli(capsys, *args, "--overwrite").code == 0


def test_eval_missing_split_files(capsys, dataset, checkpoint):
    line = _one_line_error(run_cli(capsys, "eval", str(checkpoint), "--vocab", str(dataset / "vocab.json"),
                                   "--data", str(dataset), "--split", "dev", "--no-progress"))
    assert "dev_caps.txt" in line or "dev_ims.npy" in line


def test_eval_feature_dims_do_not_match(capsys, dataset, checkpoint, tmp_path):
    other = make_synthetic_dataset(tmp_path / "wide", {"test": 3}, seed=3, img_dim=IMG_DIM * 2)
    line = _one_line_error(run_cli(capsys, "eval", str(checkpoint), "--vocab", str(dataset / "vocab.json"),
                                   "--data", str(other), "--no-progress"))
    assert str(IMG_DIM * 2) in line and str(IMG_DIM) in line


def test_eval_empty_captions_file(capsys, dataset, checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "test_caps.txt").write_text("")
    line = _one_line_error(run_cli(capsys, "eval", str(checkpoint), "--vocab", str(dataset / "vocab.json"),
                                   "--data", str(broken), "--no-progress"))
    assert "test_caps.txt" in line


def test_eval_caption_count_not_five_per_image(capsys, dataset, checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    lines = (broken / "test_caps.txt").read_text().splitlines()
    (broken / "test_caps.txt").write_text("\n".join(lines[:-2]) + "\n")
    line = _one_line_error(run_cli(capsys, "eval", str(checkpoint), "--vocab", str(dataset / "vocab.json"),
                                   "--data", str(broken), "--no-progress"))
    assert "5" in line


def test_eval_vocabulary_size_mismatch(capsys, dataset, checkpoint, vocab_dir):
    line = _one_line_error(run_cli(capsys, "eval", str(checkpoint), "--vocab",
                                   str(vocab_dir / "f30k_precomp_vocab.json"),
                                   "--data", str(dataset), "--no-progress"))
    assert "vocabulary" in line


def test_eval_missing_checkpoint(capsys, dataset, tmp_path):
    line = _one_line_error(run_cli(capsys, "eval", str(tmp_path / "nope.pth.tar"), "--vocab",
                                   str(dataset / "vocab.json"),
                                   "--data", str(dataset), "--no-progress"))
    assert "nope.pth.tar" in line


def test_eval_without_the_negative_branch_and_the_mismatched_word_table(capsys, dataset, tmp_path):
    """--no-negative-branch scores the ablation; --mismatched-words prints the confusable-pair comparisons."""
    from itmrt.metrics.mismatched_words import accuracy, comparisons, read_meta

    torch.manual_seed(0)
    vocab = Vocabulary.from_json(dataset / "vocab.json")
    opt = {"img_dim": IMG_DIM, "embed_size": 16, "word_dim": 8, "vocab_size": len(vocab), "thres_safe": 0.8,
           "precomp_enc_text_type": "basic"}  # a threshold that untrained similarities (about 0.7-0.8) straddle
    checkpoint = tmp_path / "naaf.pth.tar"
    save_released_checkpoint(checkpoint, CrossAttentionMatcher.from_opt(opt, family="naaf"))
    common = ["eval", str(checkpoint), "--vocab", str(dataset / "vocab.json"), "--data", str(dataset), "--no-progress"]
    full = run_cli(capsys, *common, "--scores-out", str(tmp_path / "full.npy"), "--mismatched-words",
                   "--json", str(tmp_path / "full.json"))
    ablated = run_cli(capsys, *common, "--scores-out", str(tmp_path / "ablated.npy"), "--no-negative-branch")
    assert full.code == 0 and ablated.code == 0, (full.err, ablated.err)
    with_branch, without = np.load(tmp_path / "full.npy"), np.load(tmp_path / "ablated.npy")
    assert np.all(without >= with_branch - 1e-6) and np.any(without > with_branch + 1e-4)  # the negative terms are <= 0
    assert "mismatched words" in full.out and "'no X'" in full.out and "mismatched" not in ablated.out
    saved = json.loads((tmp_path / "full.json").read_text())
    assert saved["negative_branch"] is True
    assert saved["mismatched_words"] == accuracy(with_branch, comparisons(read_meta(dataset, "test")))


def test_eval_refuses_what_has_no_negative_branch_or_no_meta(capsys, dataset, tmp_path):
    torch.manual_seed(0)
    vocab = Vocabulary.from_json(dataset / "vocab.json")
    opt = {"img_dim": IMG_DIM, "embed_size": 16, "word_dim": 8, "vocab_size": len(vocab)}
    scan = tmp_path / "scan.pth.tar"
    save_released_checkpoint(scan, CrossAttentionMatcher.from_opt(opt, family="scan"))
    line = _one_line_error(run_cli(capsys, "eval", str(scan), "--vocab", str(dataset / "vocab.json"),
                                   "--data", str(dataset), "--no-negative-branch", "--no-progress"))
    assert "only NAAF has a negative branch" in line
    bare = tmp_path / "bare"
    shutil.copytree(dataset, bare)
    (bare / "test_meta.json").unlink()
    line = _one_line_error(run_cli(capsys, "eval", str(scan), "--vocab", str(dataset / "vocab.json"),
                                   "--data", str(bare), "--mismatched-words", "--no-progress"))
    assert "test_meta.json does not exist" in line
