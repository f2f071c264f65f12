"""``itmrt export``: a checkpoint and its vocabulary -> an ONNX bundle folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli.app import app
from itmrt.cli.outputs import check_outputs_apart


@app.command("export")
@flags.output_group("overwrite", overwrite=flags.overwrite("an existing bundle at --out"))
def export_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint: released NAAF/SCAN *.pth.tar or an itmrt *.safetensors (NAAF, SCAN, CMPM)."),
    vocab: Path = typer.Option(..., "--vocab", help="Vocabulary JSON the model was trained with; copied into the bundle."),
    out: Path = typer.Option(..., "--out", help="Bundle folder to create (must not exist, be empty, or be a bundle with --overwrite)."),
    threshold: float | None = typer.Option(
        None, "--threshold", callback=flags.finite("--threshold", -1.0, 1.0), help="NAAF only: freeze this threshold instead of the checkpoint's thres_safe (recorded in the manifest)."
    ),
    opset: int = typer.Option(17, "--opset", min=17, max=20, help="ONNX opset (17-20: TensorRT 10 parses up to 20)."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
    max_batch: int = typer.Option(128, "--max-batch", min=1, max=limits.MAX_BATCH, help="Largest image/caption batch in the shape ranges (TensorRT profiles)."),
    max_length: int = typer.Option(64, "--max-length", min=2, max=limits.MAX_TOKENS, help="Longest caption, in tokens with <start> and <end>, in the shape ranges."),
    num_regions: int = typer.Option(36, "--num-regions", min=1, max=limits.MAX_REGIONS, help="Regions per image of the precomputed features (NAAF/SCAN)."),
    tolerance: float | None = typer.Option(None, "--tolerance", callback=flags.finite("--tolerance", 0.0, 1.0, low_open=True), help="Largest ONNX Runtime vs PyTorch abs error accepted by the parity check (default: the family's, 1e-4 for NAAF, SCAN and CMPM)."),
) -> None:
    """Export a model to image_encoder.onnx, text_encoder.onnx, scorer.onnx, vocab.json and manifest.json.

    The graphs are checked against TensorRT 10's ONNX op table and run in ONNX
    Runtime (CPU) against PyTorch on captions of mixed lengths before anything
    is written; the bundle appears at --out only when every check passed.
    """
    import time

    from itmrt.export.bundle import ExportOptions, export_bundle

    started = time.perf_counter()
    options = ExportOptions(
        threshold=threshold,
        opset=opset,
        overwrite=outputs.overwrite,
        max_batch=max_batch,
        max_length=max_length,
        num_regions=num_regions,
        tolerance=tolerance,
    )
    check_outputs_apart({"--out": out}, {"checkpoint": checkpoint, "vocabulary": vocab})
    export_bundle(checkpoint, vocab, out, options, log=typer.echo)
    typer.echo(f"export finished in {time.perf_counter() - started:.1f}s")
