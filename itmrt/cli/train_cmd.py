"""``itmrt train``: train a small NAAF or SCAN (precomputed features) or CMPM (images) model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt.cli.app import app
from itmrt.errors import ItmrtError

FAMILIES = ("naaf", "scan", "cmpm")


@app.command("train")
def train_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder. naaf/scan: {train,dev}_ims.npy + _caps.txt; "
                              "cmpm: {train,dev}_images.npy + _caps.txt + _labels.npy; both with vocab.json."),
    out: Path = typer.Option(..., "--out", help="Run folder for checkpoints and history.json (NAAF: thresholds.png)."),
    family: str = typer.Option("naaf", "--family", help="naaf, scan or cmpm."),
    vocab: Path | None = typer.Option(None, "--vocab", help="naaf/scan: vocabulary JSON (default: DATA/vocab.json)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Passes over the training captions (default: naaf/scan 12, cmpm 12)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=2, help="Captions per batch; negatives come from the batch (default: naaf/scan 64, cmpm 32)."),
    learning_rate: float | None = typer.Option(None, "--lr", help="Learning rate (default: naaf/scan 2e-3 for the small models, released full-size runs used 5e-4; cmpm 5e-3)."),
    embed_size: int | None = typer.Option(None, "--embed-size", help="Joint embedding size (default: naaf/scan 128, cmpm 64; released models 1024)."),
    lr_decay_epoch: int | None = typer.Option(None, "--lr-decay-epoch", min=1, help="naaf/scan: multiply the learning rate by 0.1 from this epoch on (default: 8 when --epochs is not given; released runs: 10 of 20)."),
    word_dim: int = typer.Option(64, "--word-dim", help="Word embedding size (released models: 300)."),
    cmpc: bool = typer.Option(False, "--cmpc", help="cmpm: add the CMPC classification loss."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and batch order (runs are repeatable)."),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Train a model itmrt can deploy. NAAF/SCAN checkpoints use the authors' released layout.

    NAAF also learns its similarity threshold (thres, thres_safe in the checkpoint's
    opt) and plots its trajectory to OUT/thresholds.png.
    """
    from itmrt.cli.progress import progress_bars

    if family not in FAMILIES:
        raise ItmrtError(f"unknown --family {family!r}: choose one of {', '.join(FAMILIES)}")
    result: Any
    if family == "cmpm":
        from itmrt.train.cmpm_trainer import CMPMTrainConfig, train_cmpm

        defaults = CMPMTrainConfig(data_dir=data, out_dir=out)
        config = CMPMTrainConfig(data_dir=data, out_dir=out, epochs=epochs or defaults.epochs,
                                 batch_size=batch_size or defaults.batch_size,
                                 learning_rate=learning_rate or defaults.learning_rate,
                                 embed_size=embed_size or defaults.embed_size, word_dim=word_dim,
                                 use_cmpc=cmpc, seed=seed, device=device, resume=resume)
        with progress_bars(progress) as bars:
            advance: dict[int, Any] = {}

            def on_batch(step: Any) -> None:
                if step.epoch not in advance:
                    advance[step.epoch] = bars(f"epoch {step.epoch}/{config.epochs}", step.batches_per_epoch)
                advance[step.epoch](1)

            result = train_cmpm(config, progress=on_batch)
        for record in result.history:
            typer.echo(", ".join(f"{k} {v:.3g}" for k, v in record.items()))
    else:
        from itmrt.train.trainer import TrainConfig, train

        from itmrt.train.recipes import SMALL_TRAINING

        small = SMALL_TRAINING[family]  # the recipe's settings: they learn a positive thres_safe on the synthetic data
        decay = lr_decay_epoch if lr_decay_epoch is not None else (small["lr_decay_epoch"] if epochs is None else None)
        tconfig = TrainConfig(family=family, data_dir=str(data), out_dir=str(out), vocab=str(vocab) if vocab else None,
                              epochs=epochs or small["epochs"], batch_size=batch_size or small["batch_size"],
                              learning_rate=learning_rate or small["learning_rate"], lr_decay_epoch=decay,
                              embed_size=embed_size or small["embed_size"], word_dim=word_dim, seed=seed, device=device)
        with progress_bars(progress) as bars:
            result = train(tconfig, resume=resume, progress=bars, log=typer.echo)
    typer.echo(f"best validation rsum {result.best_rsum:.1f}; checkpoints in {out}")
