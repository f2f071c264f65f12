"""``itmrt doctor``: what this machine can run (ONNX Runtime providers, TensorRT, pycuda, GPU, Jetson, CPU features)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from itmrt.cli import flags
from itmrt.cli.app import app


@app.command("doctor")
def doctor_command(
    bundle: Path | None = typer.Argument(None, help="A bundle: also check whether its TensorRT engines can run here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    device: int = flags.device("The CUDA device the runtime will use (numbered after CUDA_VISIBLE_DEVICES)."),
) -> None:
    """Report onnxruntime's execution providers, TensorRT and pycuda versions, the GPUs this process sees
    (CUDA_VISIBLE_DEVICES honoured), Jetson/JetPack, CPU features (VNNI, BF16); with a bundle, each engine's
    TensorRT version, GPU, device memory and whether it can run on the runtime's GPU."""
    from itmrt.reports.doctor import diagnose, format_report

    report = diagnose(device=device, bundle=bundle)
    typer.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_report(report))
