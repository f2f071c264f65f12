"""``itmrt make-small-models``: the recipe behind the small models the demo and tests use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt.cli import flags
from itmrt.cli.app import app


@app.command("make-small-models")
@flags.output_group("progress", "overwrite", overwrite=flags.overwrite("model files already in --out"))
def make_small_models_command(
    out: Path = typer.Option(..., "--out", help="Folder for naaf_small.pth.tar, scan_small.pth.tar, "
                             "cmpm_small.safetensors and recipe.json (the shipped ones live in itmrt/assets)."),
    families: str = typer.Option("naaf,scan,cmpm", "--families", help="Comma-separated subset of naaf, scan, cmpm."),
    work: Path | None = typer.Option(None, "--work", help="Folder for the synthetic data and training runs (default: a temp folder)."),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu or cuda."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
) -> None:
    """Generate the synthetic datasets and train a small NAAF, SCAN and CMPM on them, deterministically."""
    from itmrt.cli.progress import progress_bars
    from itmrt.errors import ItmrtError
    from itmrt.train.recipes import SHIPPED_FILES, make_small_models

    chosen = tuple(f.strip() for f in families.split(",") if f.strip())
    unknown = [f for f in chosen if f not in SHIPPED_FILES]
    if unknown or not chosen:
        raise ItmrtError(f"--families takes a subset of {', '.join(SHIPPED_FILES)}, not {families!r}")
    with progress_bars(outputs.progress) as bars:
        written = make_small_models(out, chosen, work, device, progress=bars, log=typer.echo, overwrite=outputs.overwrite)
    for family, path in written.items():
        typer.echo(f"{family}: {path}")
