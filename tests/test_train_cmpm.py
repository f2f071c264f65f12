"""CMPM trainer: identity batches, learning on a tiny synthetic set, checkpoints, resume, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from itmrt.data.images import ImageCaptionSplit, load_vocabulary
from itmrt.errors import CheckpointError, ItmrtError
from itmrt.families.checkpoints import load_native
from itmrt.families.cmpm.model import CMPMModel
from itmrt.families.cmpm.trainer import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    LAST_STATE,
    BatchProgress,
    CMPMTrainConfig,
    evaluate_cmpm,
    identity_batches,
    train_cmpm,
)
from itmrt.models.native import save_native
from itmrt.synthetic.identity_images import make_synthetic_image_dataset

TINY: dict[str, Any] = {"word_dim": 16, "lstm_hidden": 16, "embed_size": 16, "batch_size": 16, "num_threads": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cmpm") / "data"
    return make_synthetic_image_dataset(folder, {"train": 16, "dev": 4}, image_size=32, captions_per_image=2, seed=0)


def test_identity_batches_cover_every_sample_once_and_group_identities() -> None:
    labels = np.repeat(np.arange(10), 4)[np.random.default_rng(0).permutation(40)]
    batches = identity_batches(labels, batch_size=8, samples_per_identity=2, rng=np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(40))
    assert all(len(b) == 8 for b in batches)
    # Consecutive pairs share an identity, so every batch has repeated labels.
    for batch in batches:
        pairs = labels[batch].reshape(-1, 2)
        assert np.all(pairs[:, 0] == pairs[:, 1])
    again = identity_batches(labels, 8, 2, np.random.default_rng(1))
    other = identity_batches(labels, 8, 2, np.random.default_rng(2))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
    assert [len(b) for b in identity_batches(np.arange(5), 4, 1, np.random.default_rng(0))] == [4]  # lone tail dropped


def test_training_lowers_loss_and_raises_recall(data_dir: Path, tmp_path: Path) -> None:
    """Against a control run with a vanishing learning rate: same batches, same BatchNorm statistics updates."""

    def run(out: str, learning_rate: float, progress=None):  # noqa: ANN001, ANN202
        config = CMPMTrainConfig(data_dir=data_dir, out_dir=tmp_path / out, epochs=10, learning_rate=learning_rate,
                                 lr_schedule="constant", val_split="train", val_every=5, seed=0, **TINY)
        return train_cmpm(config, progress=progress)

    steps: list[BatchProgress] = []
    trained = run("trained", 3e-3, steps.append)
    control = run("control", 1e-9)
    assert [s.global_step for s in steps] == list(range(1, 41))
    assert {s.batches_per_epoch for s in steps} == {4} and steps[-1].epoch == 10
    assert [int(h["epoch"]) for h in trained.history] == list(range(11))
    assert [("rsum" in h) for h in trained.history] == [True, False, False, False, False, True] + [False] * 4 + [True]

    def late_loss(history: list[dict[str, float]]) -> float:
        return float(np.mean([h["train_loss"] for h in history[-2:]]))

    assert late_loss(trained.history) < late_loss(control.history) - 3.0
    assert late_loss(trained.history) < trained.history[1]["train_loss"] - 3.0
    assert trained.history[-1]["rsum"] > control.history[-1]["rsum"] + 50.0
    assert trained.history[-1]["rsum"] > trained.history[0]["rsum"] + 50.0
    # model_best is the best validated epoch, and evaluating it reproduces its history entry.
    best = load_native(trained.best_checkpoint)
    assert isinstance(best, CMPMModel)
    assert trained.best_rsum == max(h["rsum"] for h in trained.history[1:] if "rsum" in h)
    split = ImageCaptionSplit.open(data_dir, "train")
    table = evaluate_cmpm(best, split, load_vocabulary(data_dir))
    assert table["rsum"] == pytest.approx(trained.history[trained.best_epoch]["rsum"])
    assert best.vocab_sha256 == load_vocabulary(data_dir).sha256  # recorded, so export refuses another vocabulary


class _Interrupt(Exception):
    pass


def _stop_at(epoch: int):  # noqa: ANN202 - a small callback factory
    def callback(progress: BatchProgress) -> None:
        if progress.epoch == epoch:
            raise _Interrupt

    return callback


def test_resume_after_interruption_matches_an_uninterrupted_run(data_dir: Path, tmp_path: Path) -> None:
    def config(out: Path, resume: bool = False) -> CMPMTrainConfig:
        return CMPMTrainConfig(data_dir=data_dir, out_dir=out, epochs=3, use_cmpc=True, cmpc_label_smoothing=0.1,
                               seed=5, resume=resume, **TINY)

    straight = train_cmpm(config(tmp_path / "straight"))
    with pytest.raises(_Interrupt):
        train_cmpm(config(tmp_path / "cut"), progress=_stop_at(2))
    state = torch.load(tmp_path / "cut" / LAST_STATE, weights_only=True)
    assert state["epoch"] == 1 and state["cmpc_weight"].shape == (16, 16)
    resumed = train_cmpm(config(tmp_path / "cut", resume=True))

    first = load_file(tmp_path / "straight" / LAST_CHECKPOINT)
    second = load_file(tmp_path / "cut" / LAST_CHECKPOINT)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    end_straight = torch.load(tmp_path / "straight" / LAST_STATE, weights_only=True)
    end_cut = torch.load(tmp_path / "cut" / LAST_STATE, weights_only=True)
    assert torch.equal(end_straight["cmpc_weight"], end_cut["cmpc_weight"])
    assert end_cut["epoch"] == 3 and end_cut["global_step"] == end_straight["global_step"]
    keys = ("epoch", "train_loss", "rsum", "t2i_r1")
    assert [[h.get(k) for k in keys] for h in resumed.history] == [[h.get(k) for k in keys] for h in straight.history]
    assert (tmp_path / "cut" / BEST_CHECKPOINT).is_file()


def test_refusals(data_dir: Path, tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "data_dir": data_dir, "epochs": 1, "max_steps_per_epoch": 1, "validate_initial": False, **TINY
    }
    with pytest.raises(ItmrtError, match="32x32 but the model takes 64x64"):
        train_cmpm(CMPMTrainConfig(out_dir=tmp_path / "a", image_size=64, **base))
    foreign = tmp_path / "foreign.safetensors"
    save_native(
        foreign, CMPMModel(vocab_size=10, word_dim=8, lstm_hidden=8, embed_size=8, width_mult=0.25, image_size=32)
    )
    with pytest.raises(ItmrtError, match="vocabulary has .* words but the model's embedding has 10"):
        train_cmpm(CMPMTrainConfig(out_dir=tmp_path / "b", init_checkpoint=foreign, **base))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train_cmpm(CMPMTrainConfig(out_dir=tmp_path / "c", resume=True, **base))

    train_cmpm(CMPMTrainConfig(out_dir=tmp_path / "d", **base))
    with pytest.raises(ItmrtError, match="already holds a training run"):
        train_cmpm(CMPMTrainConfig(out_dir=tmp_path / "d", **base))
    with pytest.raises(CheckpointError, match="architecture"):
        train_cmpm(CMPMTrainConfig(out_dir=tmp_path / "d", resume=True, **{**base, "embed_size": 32}))
    save_native(tmp_path / "d" / LAST_CHECKPOINT,
                CMPMModel(vocab_size=10, word_dim=8, lstm_hidden=8, embed_size=8, width_mult=0.25, image_size=32))
    with pytest.raises(CheckpointError, match="does not belong"):
        train_cmpm(CMPMTrainConfig(out_dir=tmp_path / "d", resume=True, **base))
    with pytest.raises(ItmrtError, match="optimizer"):
        train_cmpm(CMPMTrainConfig(out_dir=tmp_path / "e", optimizer="sgd", **base))
