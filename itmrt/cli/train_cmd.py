"""``itmrt train``: train a small NAAF or SCAN (precomputed features) or CMPM (images) model."""

from __future__ import annotations

from pathlib import Path

import typer

from itmrt.cli.app import app


@app.command("train")
def train_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder: {train,dev}_ims.npy + _caps.txt (+ vocab.json) for naaf/scan."),
    out: Path = typer.Option(..., "--out", help="Run folder for checkpoints, history.json and thresholds.png."),
    family: str = typer.Option("naaf", "--family", help="naaf, scan or cmpm."),
    vocab: Path | None = typer.Option(None, "--vocab", help="Vocabulary JSON (default: DATA/vocab.json)."),
    epochs: int = typer.Option(8, "--epochs", min=1, help="Number of passes over the training captions."),
    batch_size: int = typer.Option(64, "--batch-size", min=2, help="Captions per batch (hardest negatives come from the batch)."),
    learning_rate: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    embed_size: int = typer.Option(128, "--embed-size", help="Joint embedding size d (released models: 1024)."),
    word_dim: int = typer.Option(64, "--word-dim", help="Word embedding size (released models: 300)."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and batch order (runs are repeatable)."),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Train a model itmrt can deploy; checkpoints use the authors' released layout.

    NAAF also learns its similarity threshold (thres, thres_safe in the checkpoint's
    opt) and plots its trajectory to OUT/thresholds.png.
    """
    from itmrt.cli.progress import progress_bars

    if family == "cmpm":
        from itmrt.train.cmpm_trainer import CMPMTrainConfig, train_cmpm

        config = CMPMTrainConfig(data_dir=str(data), out_dir=str(out), epochs=epochs, batch_size=batch_size,
                                 learning_rate=learning_rate, embed_size=embed_size, seed=seed, device=device,
                                 vocab=str(vocab) if vocab else None)
        with progress_bars(progress) as bars:
            result = train_cmpm(config, resume=resume, progress=bars, log=typer.echo)
    else:
        from itmrt.train.trainer import TrainConfig, train

        tconfig = TrainConfig(family=family, data_dir=str(data), out_dir=str(out), vocab=str(vocab) if vocab else None,
                              epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                              embed_size=embed_size, word_dim=word_dim, seed=seed, device=device)
        with progress_bars(progress) as bars:
            result = train(tconfig, resume=resume, progress=bars, log=typer.echo)
    typer.echo(f"best validation rsum {result.best_rsum:.1f}; checkpoints in {out}")
