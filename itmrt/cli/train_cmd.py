"""``itmrt train``: train a small NAAF or SCAN (precomputed features) or CMPM (images) model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt.cli import flags
from itmrt.cli.app import app


@app.command("train")
@flags.output_group("progress")
def train_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder. naaf/scan: {train,dev}_ims.npy + _caps.txt; "
                              "cmpm: {train,dev}_images.npy + _caps.txt + _labels.npy; both with vocab.json."),
    out: Path = typer.Option(..., "--out", help="Run folder for checkpoints and history.json (NAAF: thresholds.png)."),
    family: str = typer.Option("naaf", "--family", help="naaf, scan or cmpm (or another registered family)."),
    vocab: Path | None = typer.Option(None, "--vocab", help="naaf/scan: vocabulary JSON (default: DATA/vocab.json)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, max=10000, help="Passes over the training captions (default: naaf/scan 12, cmpm 12)."),
    batch_size: int | None = flags.batch_size(None, "Captions per batch; negatives come from the batch (default: naaf/scan 64, cmpm 32).", minimum=2),
    learning_rate: float | None = typer.Option(None, "--lr", callback=flags.finite("--lr", 0.0, 10.0, low_open=True), help="Learning rate (default: naaf/scan 2e-3 for the small models, released full-size runs used 5e-4; cmpm 5e-3)."),
    embed_size: int | None = typer.Option(None, "--embed-size", min=1, max=65536, help="Joint embedding size (default: naaf/scan 128, cmpm 64; released models 1024)."),
    lr_decay_epoch: int | None = typer.Option(None, "--lr-decay-epoch", min=1, max=10000, help="naaf/scan: multiply the learning rate by 0.1 from this epoch on (default: 8 when --epochs is not given; released runs: 10 of 20)."),
    word_dim: int = typer.Option(64, "--word-dim", min=1, max=65536, help="Word embedding size (released models: 300)."),
    cmpc: bool = typer.Option(False, "--cmpc", help="cmpm: add the CMPC classification loss."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed for initialisation and batch order (runs are repeatable)."),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
) -> None:
    """Train a model itmrt can deploy. NAAF/SCAN checkpoints use the authors' released layout.

    NAAF also learns its similarity threshold (thres, thres_safe in the checkpoint's
    opt) and plots its trajectory to OUT/thresholds.png.
    """
    from itmrt.cli.progress import progress_bars
    from itmrt.train.run import TrainRequest, train_family

    request = TrainRequest(family=family, data=data, out=out, vocab=vocab, epochs=epochs, batch_size=batch_size,
                           learning_rate=learning_rate, embed_size=embed_size, lr_decay_epoch=lr_decay_epoch,
                           word_dim=word_dim, cmpc=cmpc, seed=seed, device=device, resume=resume)
    with progress_bars(outputs.progress) as bars:
        best_rsum = train_family(request, bars, log=typer.echo)
    typer.echo(f"best validation rsum {best_rsum:.1f}; checkpoints in {out}")
