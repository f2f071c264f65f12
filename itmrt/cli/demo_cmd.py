"""``itmrt demo``: the whole pipeline on built-in data, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from itmrt.cli.app import app


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("itmrt-demo"), "--out", help="Folder for the demo's data, bundle and summary "
                             "(replaced if an earlier demo made it; refused otherwise)."),
) -> None:
    """Synthetic data -> shipped small NAAF -> ONNX bundle -> precision variants -> retrieval, with parity and latency.

    Runs offline on a CPU in a few minutes; builds TensorRT engines too where TensorRT is installed.
    """
    from itmrt.demo import run_demo

    run_demo(out, log=typer.echo)
