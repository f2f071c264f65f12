"""``itmrt calibrate``: INT8 calibration of a bundle on the user's data (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from itmrt.calibration import DEFAULT_METHOD
from itmrt.cli.app import app


@app.command("calibrate")
def calibrate_command(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `itmrt export`."),
    data: Path = typer.Option(..., "--data", help="Calibration data folder (precomputed features + captions; images for CMPM)."),
    split: str = typer.Option("train", "--split", help="Which split of --data to sample."),
    method: str = typer.Option(DEFAULT_METHOD, "--method", help="Range estimation: percentile (the central 99.999% of values), entropy (KL, TensorRT-style) or minmax. Measured on the shipped models, entropy clips too much: NAAF rsum -1.9, CMPM -153."),
    samples: int = typer.Option(256, "--samples", min=1, help="Images (with their captions) to calibrate on."),
    min_samples: int = typer.Option(32, "--min-samples", min=1, help="Refuse a split with fewer images than this."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per calibration batch."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Collect activation ranges on a sample of --data, save them in the bundle (calibration/<graph>.json)
    and write the INT8 Q/DQ graphs (precision/int8/). `itmrt build --precision int8` then reuses them."""
    from itmrt.calibration.int8 import calibration_method
    from itmrt.calibration.precision_graphs import PrecisionOptions, calibrate

    calibration_method(method)  # an unknown name fails before any work
    options = PrecisionOptions(
        calib_data=data, split=split, method=method, samples=samples, min_samples=min_samples,
        batch_size=batch_size, progress=progress,
    )
    calibrate(bundle, options, log=typer.echo)
    typer.echo(f"{bundle}: int8 graphs written; calibration saved in {bundle / 'calibration'}")
