"""``itmrt index``: encode a gallery's images once and store the embeddings beside a manifest."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from itmrt.cli import options
from itmrt.cli.app import app
from itmrt.cli.options import BackendName, Precision


@app.command("index")
def index_command(
    bundle: Path = typer.Argument(..., help="The bundle whose image encoder embeds the gallery."),
    images: Path = typer.Option(..., "--images", help="Image features .npy (region features; CMPM: images x 3 x H x W)."),
    out: Path = typer.Option(..., "--out", help="Gallery folder to create."),
    backend: BackendName = options.backend(),
    precision: Precision = options.precision(),
    providers: str | None = options.providers(),
    threads: int = options.threads(),
    batch_size: int = options.batch_size(128, "Images per encoder batch."),
    overwrite: bool = options.overwrite("an existing gallery at --out"),
) -> None:
    """Write GALLERY/image_embeddings.npy (memory-mapped when searched) and GALLERY/gallery.json tying it to the bundle."""
    from itmrt.runtime.api import load
    from itmrt.runtime.gallery import load_features

    started = time.perf_counter()
    runtime = load(bundle, backend=backend, precision=precision, providers=options.parse_providers(providers),
                   threads=threads, batch_size=batch_size)
    gallery = runtime.index(load_features(images), out, overwrite=overwrite, source=str(images))
    typer.echo(
        f"indexed {len(gallery)} images ({backend}/{precision}) into {out} in {time.perf_counter() - started:.1f}s; "
        f"embeddings {tuple(gallery.embeddings.shape)}"
    )
