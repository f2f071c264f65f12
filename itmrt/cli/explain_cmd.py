"""``itmrt explain``: NAAF's score of one image and one caption, word by word (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from itmrt.cli import flags
from itmrt.cli.app import app
from itmrt.cli.outputs import check_outputs


@app.command("explain")
@flags.output_group("overwrite", overwrite=flags.overwrite("existing --png / --json files"))
@flags.runtime_group("precision", precision=flags.precision(help_text=(
    "Encoders and scorer at fp32, fp16 or int8 (the bundle must hold that variant); the word terms are computed in "
    "float64 from those encoders' outputs, so below fp32 the scorer's score differs by its own rounding.")))
def explain_command(
    bundle: Path = typer.Argument(..., help="A NAAF bundle folder (from `itmrt export`)."),
    images: Path = typer.Option(..., "--images", help="Where the image comes from: a region-features .npy "
                                "(images x regions x img_dim, as `itmrt index` takes) or a gallery folder made "
                                "with this bundle by `itmrt index`."),
    image: int = typer.Option(..., "--image", min=0, help="Which image: its 0-based row in --images (the features "
                              "file's first axis, or the gallery's order, which is its features file's)."),
    caption: str = typer.Option(..., "--caption", help="The caption to explain, as free text."),
    runtime: Any = None,  # the runtime options (flags.runtime_group): one RuntimeOptions
    negative_branch: bool = typer.Option(True, "--negative-branch/--no-negative-branch", help="--no-negative-branch "
                                         "explains the paper's ablation: every word's negative term set to 0 (the "
                                         "scorer's score stays the full model's)."),
    png: Path | None = typer.Option(None, "--png", help="Also draw the word x region similarity matrix with the "
                                    "threshold marked (needs matplotlib, from the reports extra)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the explanation as JSON."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
) -> None:
    """Take NAAF's score of one image and one caption apart, word by word.

    Per word: its best region and that similarity, the similarity minus the threshold, the
    propagated decision q (the negative branch fires when q < 0: a word the image does not
    hold), and its three contributions to the score - negative, positive from the aggregated
    region features, positive from relevance - each divided by the caption's token count, so
    that all of them add up to the score. The bundle's scorer scores the same pair, and both
    numbers are printed.
    """
    from itmrt.runtime.api import load
    from itmrt.runtime.explain import explain
    from itmrt.runtime.gallery import is_gallery, load_features, read_gallery

    check_outputs({"--png": png, "--json": json_path}, outputs.overwrite,
                  {"bundle": bundle, "image features or gallery": images})
    if png is not None:
        from itmrt.optional import require

        require("matplotlib", "itmrt explain --png")
    precision = runtime.precision
    runtime = load(bundle, runtime, warn=lambda message: typer.echo(f"warning: {message}", err=True))
    source = read_gallery(images) if is_gallery(images) else load_features(images)
    result = explain(runtime, source, image, caption, negative_branch=negative_branch)
    typer.echo(f"image {image} of {images}, caption \"{caption}\" ({precision}; threshold {result.threshold:.4f}"
               f"{'' if negative_branch else '; negative branch off'})")
    typer.echo(result.table())
    typer.echo(f"score (sum of the contributions): {result.score:.6f}; the bundle's scorer: {result.scorer_score:.6f}")
    if json_path is not None:
        from itmrt.publish import atomic_write_text

        atomic_write_text(json_path, json.dumps(result.to_dict(), indent=2) + "\n", overwrite=outputs.overwrite)
    if png is not None:
        from itmrt.reports.plots import similarity_matrix

        similarity_matrix(result, png, overwrite=outputs.overwrite)
        typer.echo(f"wrote {png}")
