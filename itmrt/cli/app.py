"""The ``itmrt`` command line: a thin typer layer over the Python API.

Each command lives in its own module under ``itmrt/cli/`` and registers itself
on :data:`app`; heavy libraries (torch, onnx) are imported inside the command
functions so ``itmrt --help`` stays fast and torch-free commands never load it.
"""

from __future__ import annotations

import sys

import typer

from itmrt import __version__
from itmrt.errors import ItmrtError

app = typer.Typer(
    name="itmrt",
    help=(
        "Take image-text matching models (NAAF, SCAN, CMPM/CMPC) from a PyTorch "
        "checkpoint to verified ONNX Runtime / TensorRT deployment."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"itmrt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """itmrt: export, build, infer, and report on image-text matching models."""


# Command modules register themselves on ``app`` when imported.
from itmrt.cli import commands  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 2."""
    try:
        app(args=argv, standalone_mode=True)
    except ItmrtError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
