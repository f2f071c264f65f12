"""``itmrt report compare A B``: changes between two reports; exit status 1 on a regression (for CI)."""

from __future__ import annotations

from pathlib import Path

import typer

from itmrt.cli import flags
from itmrt.cli.app import app

report_app = typer.Typer(help="Work with parity and bench reports.", no_args_is_help=True)
app.add_typer(report_app, name="report")


@report_app.command("compare")
def compare_command(
    before: Path = typer.Argument(..., help="Report A (report.json, or its folder): the baseline."),
    after: Path = typer.Argument(..., help="Report B: the run to judge."),
    max_throughput_drop: float = typer.Option(0.1, "--max-throughput-drop", callback=flags.finite("--max-throughput-drop", 0.0, 1.0), help="Allowed throughput fall, as a fraction (0.1 = 10%)."),
    max_recall_drop: float = typer.Option(1.0, "--max-recall-drop", callback=flags.finite("--max-recall-drop", 0.0, 600.0), help="Allowed fall of any R@K or rsum, in points."),
) -> None:
    """Print what changed from A to B; exit 1 when throughput or recall fell beyond the tolerances."""
    from itmrt.reports.compare import compare_reports
    from itmrt.reports.schema import read_report

    comparison = compare_reports(read_report(before), read_report(after), max_throughput_drop, max_recall_drop)
    typer.echo(comparison.text())
    if comparison.regressed:
        raise typer.Exit(1)
