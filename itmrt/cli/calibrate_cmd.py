"""``itmrt calibrate``: INT8 calibration of a bundle on the user's data (no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli.app import app
from itmrt.cli.flags import CalibrationMethod


@app.command("calibrate")
@flags.output_group("progress")
def calibrate_command(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `itmrt export`."),
    data: Path = typer.Option(..., "--data", help="Calibration data folder (precomputed features + captions; images for CMPM)."),
    split: str = typer.Option("train", "--split", help="Which split of --data to sample."),
    method: CalibrationMethod = flags.calibration_method(),
    samples: int = typer.Option(256, "--samples", min=1, max=limits.MAX_COUNT, help="Images (with their captions) to calibrate on."),
    min_samples: int = typer.Option(32, "--min-samples", min=1, max=limits.MAX_COUNT, help="Refuse a split with fewer images than this."),
    batch_size: int = flags.batch_size(16, "Images per calibration batch."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
) -> None:
    """Collect activation ranges on a sample of --data, save them in the bundle (calibration/<graph>.json)
    and write the INT8 Q/DQ graphs (precision/int8/). `itmrt build --precision int8` then reuses them."""
    from itmrt.precision.precision_graphs import PrecisionOptions, calibrate

    settings = PrecisionOptions(
        calib_data=data, split=split, method=method, samples=samples, min_samples=min_samples,
        batch_size=batch_size, progress=outputs.progress,
    )
    calibrate(bundle, settings, log=typer.echo)
    typer.echo(f"{bundle}: int8 graphs written; calibration saved in {bundle / 'calibration'}")
