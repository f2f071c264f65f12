"""``itmrt build``: precision graphs for ONNX Runtime, then TensorRT engines where TensorRT is installed."""

from __future__ import annotations

from pathlib import Path

import typer

from itmrt.cli import options
from itmrt.cli.app import app
from itmrt.cli.options import CalibrationMethod, Precision
from itmrt.errors import ItmrtError


def parse_axis_ranges(values: list[str]) -> dict[str, tuple[int, int, int]]:
    """``AXIS=MIN:OPT:MAX`` strings -> ``{axis: (min, opt, max)}``."""
    ranges = {}
    for value in values:
        axis, _, spec = value.partition("=")
        parts = spec.split(":")
        if not axis or len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
            raise ItmrtError(f"--shape '{value}' is not AXIS=MIN:OPT:MAX (e.g. batch_captions=1:32:128)")
        low, mid, high = (int(part) for part in parts)
        ranges[axis.strip()] = (low, mid, high)
    return ranges


@app.command("build")
def build_command(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `itmrt export`."),
    precision: Precision = options.precision(Precision.FP16, "The precision of the graphs and engines to build."),
    calib_data: Path | None = typer.Option(None, "--calib-data", help="Calibration data (int8 without saved calibration); for fp16 the islands are measured on it."),
    split: str = typer.Option("train", "--split", help="Split of --calib-data."),
    method: CalibrationMethod = options.calibration_method(),
    samples: int = typer.Option(256, "--samples", min=1, help="Calibration images."),
    workspace: int | None = typer.Option(None, "--workspace", min=1, help="TensorRT workspace limit in MB (small boards)."),
    shape: list[str] = typer.Option([], "--shape", help="Override a profile axis: AXIS=MIN:OPT:MAX (repeatable; axes: batch_images, batch_captions, max_length)."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="TensorRT timing cache file, read and updated."),
    progress: bool = options.progress(),
) -> None:
    """Make and verify the precision graphs (ONNX Runtime runs them anywhere), then build one TensorRT
    engine per graph. Without TensorRT it stops after the graphs and says that no engine was built."""
    from itmrt.calibration.build import build_bundle
    from itmrt.calibration.precision_graphs import PrecisionOptions
    from itmrt.engine.build import EngineOptions

    ranges = parse_axis_ranges(shape)
    options = PrecisionOptions(calib_data=calib_data, split=split, method=method, samples=samples, progress=progress)
    outcome = build_bundle(bundle, precision, options, EngineOptions(workspace, ranges, timing_cache), log=typer.echo)
    if not outcome.engines_built:
        typer.echo(f"no TensorRT engine was built: {outcome.no_engine_reason}.")
        typer.echo(f"The verified {precision} graphs run in ONNX Runtime (`--backend ort`); run `itmrt build` again on the target GPU for engines.")
        return
    typer.echo(f"{bundle}: {precision} engines built")
