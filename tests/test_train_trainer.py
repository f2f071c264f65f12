"""The NAAF/SCAN trainer: released-layout checkpoints, thresholds, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from itmrt.families.released import load_released_checkpoint
from itmrt.synthetic.region_features import make_synthetic_dataset
from itmrt.train.trainer import BEST_CHECKPOINT, LAST_CHECKPOINT, TrainConfig, train

from cli_helpers import run_cli

IMG_DIM = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("d") / "syn", {"train": 24, "dev": 6}, seed=1, img_dim=IMG_DIM
    )


def _config(data: Path, out: Path, family: str = "naaf", epochs: int = 2) -> TrainConfig:
    return TrainConfig(family=family, data_dir=str(data), out_dir=str(out), epochs=epochs, batch_size=16,
                       embed_size=16, word_dim=8, max_val_images=6, seed=5)


@pytest.mark.parametrize("family", ["naaf", "scan"])
def test_training_writes_released_layout_checkpoints(data, tmp_path, family):
    result = train(_config(data, tmp_path / "run", family), log=lambda _m: None)
    assert [r.epoch for r in result.history] == [0, 1]
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        model = load_released_checkpoint(tmp_path / "run" / name)
        assert model.family == family and model.image_encoder.img_dim == IMG_DIM
    content = torch.load(tmp_path / "run" / LAST_CHECKPOINT, weights_only=False)
    assert set(content) >= {"model", "opt", "epoch", "best_rsum", "Eiters"}
    assert isinstance(content["model"], list) and len(content["model"]) == 2
    if family == "naaf":
        opt = vars(content["opt"])
        assert opt["thres_safe"] == result.history[-1].thres_safe and "thres" in opt
        assert float(model.scorer.threshold) == pytest.approx(opt["thres_safe"])
        assert (tmp_path / "run" / "thresholds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 2 and "rsum" in history[-1]["recall"]


def test_interrupted_run_resumes_to_the_same_weights(data, tmp_path):
    straight = train(_config(data, tmp_path / "straight", epochs=2), log=lambda _m: None)
    train(_config(data, tmp_path / "split", epochs=1), log=lambda _m: None)  # "interrupted" after epoch 1
    resumed = train(_config(data, tmp_path / "split", epochs=2), resume=True, log=lambda _m: None)
    assert [r.epoch for r in resumed.history] == [0, 1]
    a = load_released_checkpoint(straight.last_checkpoint).state_dict()
    b = load_released_checkpoint(resumed.last_checkpoint).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cli_refuses_mismatched_data_on_resume(capsys, data, tmp_path):
    train(_config(data, tmp_path / "run", epochs=1), log=lambda _m: None)
    wide = make_synthetic_dataset(tmp_path / "wide", {"train": 6, "dev": 6}, seed=1, img_dim=IMG_DIM * 2)
    result = run_cli(capsys, "train", "--data", str(wide), "--out", str(tmp_path / "run"), "--resume",
                     "--epochs", "2", "--no-progress")
    assert result.code == 2 and result.err.count("\n") == 1 and "64" in result.err and "32" in result.err


def test_cli_refuses_a_vocabulary_made_for_other_data(capsys, data, tmp_path, vocab_dir):
    result = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"),
                     "--vocab", str(vocab_dir / "coco_precomp.json"), "--no-progress")
    # The synthetic words are ordinary English, so most of them are in COCO's vocabulary: this one is accepted.
    # A vocabulary with none of the words must be refused.
    bad = tmp_path / "tiny_vocab.json"
    bad.write_text(json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "zebra": 4}}))
    result = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run2"), "--vocab", str(bad),
                     "--no-progress")
    assert result.code == 2 and "not in the vocabulary" in result.err and result.err.count("\n") == 1


def test_cli_refuses_a_non_empty_output_folder_without_resume(capsys, data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress")
    assert result.code == 2 and "not empty" in result.err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_cli_defaults_are_the_recipe_settings(capsys, data, tmp_path):
    """Without --lr, NAAF trains with the recipe's rate (the one that learns a positive thres_safe), decay as given."""
    from itmrt.train.recipes import SMALL_TRAINING

    out = tmp_path / "run"
    result = run_cli(capsys, "train", "--data", str(data), "--out", str(out), "--epochs", "1", "--lr-decay-epoch", "1",
                     "--embed-size", "16", "--word-dim", "8", "--no-progress")
    assert result.code == 0, result.err
    opt = vars(torch.load(out / LAST_CHECKPOINT, weights_only=False)["opt"])
    assert opt["learning_rate"] == SMALL_TRAINING["naaf"]["learning_rate"]
    assert opt["lr_update"] == 1
