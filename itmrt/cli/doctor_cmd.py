"""``itmrt doctor``: what this machine can run (ONNX Runtime providers, TensorRT, pycuda, GPU, CPU features)."""

from __future__ import annotations

import json

import typer

from itmrt.cli.app import app


@app.command("doctor")
def doctor_command(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Report onnxruntime's execution providers, TensorRT and pycuda versions, GPUs and CPU features (VNNI, BF16)."""
    from itmrt.engine.doctor import diagnose, format_report

    report = diagnose()
    typer.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_report(report))
