"""``itmrt index``: encode a gallery's images once and store the embeddings beside a manifest."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from itmrt.cli import options
from itmrt.cli.app import app
from itmrt.cli.options import BackendName, Precision
from itmrt.cli.outputs import warn_on_stderr


@app.command("index")
def index_command(
    bundle: Path = typer.Argument(..., help="The bundle whose image encoder embeds the gallery."),
    images: Path = typer.Option(..., "--images", help=(
        "Image features .npy (region features; CMPM: images x 3 x H x W), or for a CMPM bundle a folder of "
        "images or a text file listing image paths (JPEG, PNG, WebP).")),
    out: Path = typer.Option(..., "--out", help="Gallery folder to create."),
    backend: BackendName = options.backend(),
    precision: Precision = options.precision(),
    providers: str | None = options.providers(),
    threads: int = options.threads(),
    batch_size: int = options.batch_size(128, "Images per encoder batch."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help=(
        "Image files: leave out unreadable or truncated files (a warning each, and a count) instead of stopping.")),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help=(
        "Run every component once first, so the scorer's kernels are compiled (or loaded from their cache) "
        "before the gallery is searched.")),
    overwrite: bool = options.overwrite("an existing gallery at --out"),
) -> None:
    """Write GALLERY/image_embeddings.npy (memory-mapped when searched) and GALLERY/gallery.json tying it to the bundle.

    From image files the gallery also keeps each image's path as its id (GALLERY/image_ids.json).
    """
    from itmrt.runtime.api import load
    from itmrt.runtime.gallery import load_features
    from itmrt.runtime.image_files import is_image_listing, list_image_files

    started = time.perf_counter()
    runtime = load(bundle, backend=backend, precision=precision, providers=options.parse_providers(providers),
                   threads=threads, batch_size=batch_size, warn=warn_on_stderr)
    warm = f"; warm-up {runtime.warmup():.1f}s" if warmup else ""
    if is_image_listing(images):
        files = list_image_files(images)
        gallery = runtime.index(files, out, overwrite=overwrite, source=str(images), skip_bad_images=skip_bad_images)
        skipped = len(files) - len(gallery)
        counted = f" ({skipped} unreadable skipped)" if skipped else ""
    else:
        gallery = runtime.index(load_features(images), out, overwrite=overwrite, source=str(images))
        counted = ""
    typer.echo(
        f"indexed {len(gallery)} images{counted} ({backend}/{precision}) into {out} in "
        f"{time.perf_counter() - started:.1f}s{warm}; embeddings {tuple(gallery.embeddings.shape)}"
    )
