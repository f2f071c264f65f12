"""``itmrt sample-data``: a small synthetic dataset to try every command on, without data of your own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli.app import app


@app.command("sample-data")
@flags.output_group("overwrite", overwrite=flags.overwrite("a dataset already at --out"))
def sample_data_command(
    out: Path = typer.Option(..., "--out", help="Folder to create: {split}_ims.npy, {split}_caps.txt, {split}_meta.json, vocab.json."),
    images: int = typer.Option(100, "--images", min=2, max=limits.MAX_SAMPLE_IMAGES, help="Test images (dev and train get half as many each); 36 regions x 2048 floats, 0.3 MB an image (refused at once when the disk has no room)."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
) -> None:
    """Write synthetic region features and captions (test, dev and train splits, 5 captions an image) drawn like
    the shipped small models' training data, and their vocabulary: input for export, index, infer, serve,
    eval, calibrate, build, parity and bench."""
    from itmrt.train.recipes import make_sample_data

    folder = make_sample_data(out, images, overwrite=outputs.overwrite)
    typer.echo(f"wrote {folder}: test {images} images, dev and train {max(1, images // 2)} each, vocab.json")
