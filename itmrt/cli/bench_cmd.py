"""``itmrt bench``: latency and throughput of a bundle's variants per stage and batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli.app import app
from itmrt.cli.flags import ScorerChoice
from itmrt.cli.outputs import check_report_folder
from itmrt.errors import ItmrtError
from itmrt.reports.runtime_variants import DEFAULT_BENCH_VARIANTS


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ItmrtError(f"--batch-sizes must be comma-separated integers (e.g. 1,8,32,128), not {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > limits.MAX_BATCH:
        raise ItmrtError(f"--batch-sizes must be integers from 1 to {limits.MAX_BATCH} (e.g. 1,8,32,128), not {text!r}")
    return sizes


@app.command("bench")
@flags.output_group("plots", "overwrite", "progress", overwrite=flags.overwrite("a report already in --report"))
def bench_command(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `itmrt export`."),
    variants: str = typer.Option(DEFAULT_BENCH_VARIANTS, "--variants", help="backend:precision list; ones this machine or bundle lacks are reported as not run."),
    batch_sizes: str = typer.Option("1,8,32,128", "--batch-sizes", help="Captions (or images) per call."),
    captions: int = typer.Option(128, "--captions", min=1, max=limits.MAX_BATCH, help="Synthetic captions in the pool."),
    images: int = typer.Option(64, "--images", min=1, max=limits.MAX_BATCH, help=(
        "Gallery size that captions are scored against (made and held in memory whole).")),
    warmup: int = typer.Option(3, "--warmup", min=0, max=limits.MAX_CALLS, help="Untimed calls before timing."),
    repeats: int = typer.Option(20, "--repeats", min=1, max=limits.MAX_CALLS, help="Timed calls per stage and batch size."),
    top_k: int = typer.Option(10, "--top-k", min=1, max=limits.MAX_COUNT, help="Results kept per query."),
    threads: int = flags.threads(),
    scorer: ScorerChoice | None = flags.scorer(),
    report: Path = flags.report_folder("report.json, report.md, latency_vs_batch.png"),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
) -> None:
    """Per stage (tokenise, text encode, image encode, score, top-k) and end to end: latency percentiles, throughput, memory."""
    import sys

    from itmrt.cli.progress import progress_bars
    from itmrt.reports.bench import BenchOptions, run_bench, write_bench
    from itmrt.reports.runtime_variants import parse_variants

    options = BenchOptions(
        variants=parse_variants(variants), batch_sizes=_batch_sizes(batch_sizes), captions=captions, images=images,
        warmup=warmup, repeats=repeats, top_k=top_k, threads=threads, scorer=scorer,
    )
    check_report_folder(report, outputs.overwrite, {"bundle": bundle})
    with progress_bars(outputs.progress, lines_when_logged=True) as bars:
        result = run_bench(bundle, options, bars, command=["itmrt", *sys.argv[1:]])
    write_bench(result, report, outputs.plots)
    for entry in result["variants"]:
        if entry["status"] != "ok":
            typer.echo(f"{entry['name']}: {entry['status'].replace('_', ' ')}: {entry['reason']}")
            continue
        for row in entry["results"]:
            if row["stage"] == "end_to_end":
                typer.echo(f"{entry['name']} end to end, batch {row['batch_size']}: p50 {row['latency_ms']['p50']:.2f} ms, "
                           f"{row['throughput']['captions_per_s']:.0f} captions/s")
    reduced = [e["name"] for e in result["variants"]
               if e["status"] == "ok" and e["backend"] == "ort" and e["precision"] in ("fp16", "int8")]
    if reduced and "CUDAExecutionProvider" not in result["environment"].get("onnxruntime_providers", []):
        typer.echo(f"note: {', '.join(reduced)} ran on the CPU, where FP16 and INT8 graphs are slower than FP32 "
                   "(casts around the reduced-precision nodes; no FP16 arithmetic, INT8 gains need VNNI): they are "
                   "made for TensorRT on a GPU, and here only show that they run and how close they score")
    typer.echo(f"report written to {report}/report.json and report.md")
