"""``itmrt check``: verify a bundle's files, hashes and TensorRT readiness (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from itmrt.cli.app import app
from itmrt.errors import ItmrtError


@app.command("check")
def check_command(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `itmrt export`."),
) -> None:
    """Check every file's sha256 against the manifest and every graph against onnx.checker and
    TensorRT 10's ONNX op table; print one line per problem and exit with status 2 if any."""
    from itmrt.bundle.check import check_bundle

    result = check_bundle(bundle)
    for line in result.passed:
        typer.echo(f"ok: {line}")
    for line in result.problems:
        typer.echo(line, err=True)
    if not result.ok:
        raise ItmrtError(f"bundle {bundle} failed {len(result.problems)} check(s) (listed above)")
    typer.echo(f"{bundle}: {result.family} bundle verified")
