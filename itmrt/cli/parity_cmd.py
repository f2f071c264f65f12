"""``itmrt parity``: compare a bundle's deployed variants with the PyTorch (or ONNX Runtime fp32) reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli.app import app
from itmrt.cli.flags import ScorerChoice
from itmrt.cli.outputs import check_report_folder
from itmrt.reports.runtime_variants import DEFAULT_PARITY_VARIANTS


@app.command("parity")
@flags.output_group("plots", "overwrite", "progress", overwrite=flags.overwrite("a report already in --report"))
def parity_command(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `itmrt export`."),
    data: Path = typer.Option(..., "--data", help="Folder holding {split}_ims.npy and {split}_caps.txt."),
    split: str = typer.Option("test", "--split", help="Which split to compare on."),
    against: str = typer.Option("torch", "--against", help="Reference: torch (the bundle's source checkpoint; needs torch) or ort:fp32."),
    variants: str = typer.Option(DEFAULT_PARITY_VARIANTS, "--variants", help="backend:precision list; ones this machine or bundle lacks are reported as not run."),
    max_images: int | None = typer.Option(None, "--max-images", min=1, max=limits.MAX_COUNT, help="Use only the first N images (and their captions)."),
    decision_images: int = typer.Option(100, "--decision-images", min=1, max=limits.MAX_COUNT, help="Images (with their captions) NAAF decision flips are counted on."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="The source checkpoint, when it moved since export (sha256-checked)."),
    report: Path = flags.report_folder("report.json, report.md, PNGs, score matrices"),
    tol_score: float | None = typer.Option(None, "--tol-score-max-abs", callback=flags.finite("--tol-score-max-abs", 0.0, 1e6), help="Override: largest allowed end-to-end score error."),
    tol_rsum: float | None = typer.Option(None, "--tol-rsum-delta", callback=flags.finite("--tol-rsum-delta", 0.0, 600.0), help="Override: largest allowed |rsum - reference rsum|."),
    tol_top1: float | None = typer.Option(None, "--tol-top1-min", callback=flags.finite("--tol-top1-min", 0.0, 1.0), help="Override: smallest allowed tie-tolerant top-1 agreement (0..1; a candidate within the score tolerance of the best counts as agreeing)."),
    tol_flips: float | None = typer.Option(None, "--tol-flip-rate", callback=flags.finite("--tol-flip-rate", 0.0, 1.0), help="Override: largest allowed NAAF decision flip rate."),
    threads: int = flags.threads(),
    scorer: ScorerChoice | None = flags.scorer(),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
    strict: bool = typer.Option(False, "--strict", help="Exit with status 1 when a measured variant fails its tolerances."),
) -> None:
    """Tensor, decision and retrieval parity of every variant, with pass/fail against tolerances.

    Tolerances are the bundle's own (its family's, recorded in manifest.json at export); the defaults,
    for bundles that record none (score max abs / |rsum delta| / top-1 min / flip rate):
    fp32 1e-4 / 0.5 / 0.99 / 1e-3; fp16 1e-2 / 1.0 / 0.95 / 1e-2; int8 5e-2 / 3.0 / 0.85 / 5e-2.
    The --tol-* options override either.
    """
    import sys

    from itmrt.cli.progress import progress_bars
    from itmrt.reports.parity_report import ParityOptions, run_parity, write_parity
    from itmrt.reports.runtime_variants import parse_variants

    overrides = {key: value for key, value in (
        ("score_max_abs", tol_score), ("rsum_abs_delta", tol_rsum), ("top1_agreement_min", tol_top1), ("flip_rate_max", tol_flips),
    ) if value is not None}
    options = ParityOptions(
        split=split, against=against, variants=parse_variants(variants), max_images=max_images,
        decision_images=decision_images, tolerances=overrides, checkpoint=checkpoint, threads=threads, scorer=scorer,
    )
    check_report_folder(report, outputs.overwrite, {"bundle": bundle, "data folder": data, "checkpoint": checkpoint})
    with progress_bars(outputs.progress, lines_when_logged=True) as bars:
        run = run_parity(bundle, data, options, bars, command=["itmrt", *sys.argv[1:]])
    write_parity(run, report, outputs.plots)
    for entry in run.report["variants"]:
        if entry["status"] != "ok":
            typer.echo(f"{entry['name']}: {entry['status'].replace('_', ' ')}: {entry['reason']}")
            continue
        delta = entry["recall_delta"]["rsum"]
        error = entry["tensors"]["end_to_end"]["max_abs"]
        ties = entry.get("threshold_ties")
        at_threshold = (f", {ties['max_abs_off_threshold']:.2e} off the threshold ({ties['tie_pairs']} pairs at it)"
                        if ties and ties["tie_pairs"] else "")
        typer.echo(f"{entry['name']}: {'pass' if entry['passed'] else 'FAIL'} (rsum {entry['recall']['rsum']:.1f}, "
                   f"delta {delta:+.2f}; score max abs error {error:.2e}{at_threshold})")
    typer.echo(f"report written to {report}/report.json and report.md")
    if strict and not run.report["passed"]:
        raise typer.Exit(1)
