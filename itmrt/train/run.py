"""``itmrt train`` as a function: one request, the trainer for the family's kind of data.

Families of precomputed region features (NAAF, SCAN) train with
:mod:`itmrt.train.trainer`, families of images (CMPM) with
:mod:`itmrt.families.cmpm.trainer`; options left unset take that trainer's small
recipe defaults (:data:`itmrt.train.recipes.SMALL_TRAINING`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itmrt.bundle.names import IMAGES, REGION_FEATURES
from itmrt.families import get

Bars = Callable[[str, int], Callable[[int], None]]
Log = Callable[[str], None]


@dataclass(kw_only=True)
class TrainRequest:
    """What ``itmrt train`` was asked; ``None`` takes the trainer's default for the family."""

    family: str
    data: Path
    out: Path
    vocab: Path | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    embed_size: int | None = None
    lr_decay_epoch: int | None = None
    word_dim: int = 64
    cmpc: bool = False
    seed: int = 0
    device: str = "cpu"
    resume: bool = False


def _train_regions(request: TrainRequest, bars: Bars | None, log: Log) -> float:
    from itmrt.train.recipes import SMALL_TRAINING
    from itmrt.train.trainer import TrainConfig, train

    # The recipe's settings (they learn a positive thres_safe on the synthetic data); TrainConfig's for other families.
    small = {**{key: getattr(TrainConfig, key) for key in ("epochs", "batch_size", "learning_rate", "embed_size")},
             "lr_decay_epoch": None, **SMALL_TRAINING.get(request.family, {})}
    decay = request.lr_decay_epoch if request.lr_decay_epoch is not None else (
        small["lr_decay_epoch"] if request.epochs is None else None)
    config = TrainConfig(
        family=request.family, data_dir=str(request.data), out_dir=str(request.out),
        vocab=str(request.vocab) if request.vocab else None, epochs=request.epochs or small["epochs"],
        batch_size=request.batch_size or small["batch_size"],
        learning_rate=request.learning_rate or small["learning_rate"],
        lr_decay_epoch=decay, embed_size=request.embed_size or small["embed_size"], word_dim=request.word_dim,
        seed=request.seed, device=request.device,
    )
    return train(config, resume=request.resume, progress=bars, log=log).best_rsum


def _train_images(request: TrainRequest, bars: Bars | None, log: Log) -> float:
    from itmrt.families.cmpm.trainer import BatchProgress, CMPMTrainConfig, train_cmpm

    defaults = CMPMTrainConfig(data_dir=request.data, out_dir=request.out)
    config = CMPMTrainConfig(
        data_dir=request.data, out_dir=request.out, epochs=request.epochs or defaults.epochs,
        batch_size=request.batch_size or defaults.batch_size,
        learning_rate=request.learning_rate or defaults.learning_rate,
        embed_size=request.embed_size or defaults.embed_size, word_dim=request.word_dim, use_cmpc=request.cmpc,
        seed=request.seed, device=request.device, resume=request.resume,
    )
    advance: dict[int, Any] = {}

    def on_batch(step: BatchProgress) -> None:
        if bars is None:
            return
        if step.epoch not in advance:
            advance[step.epoch] = bars(f"epoch {step.epoch}/{config.epochs}", step.batches_per_epoch)
        advance[step.epoch](1)

    result = train_cmpm(config, progress=on_batch)
    for record in result.history:
        log(", ".join(f"{k} {v:.3g}" for k, v in record.items()))
    return result.best_rsum


TRAINERS: dict[str, Callable[[TrainRequest, Bars | None, Log], float]] = {
    REGION_FEATURES: _train_regions,
    IMAGES: _train_images,
}
"""The trainer of each kind of image input (a family spec's ``image_input``)."""


def train_family(request: TrainRequest, bars: Bars | None = None, log: Log = print) -> float:
    """Train a model of ``request.family``; returns the best validation rsum."""
    return TRAINERS[get(request.family).image_input](request, bars, log)
