"""``itmrt index``: encode a gallery's images once and store the embeddings beside a manifest."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from itmrt.cli.app import app


@app.command("index")
def index_command(
    bundle: Path = typer.Argument(..., help="The bundle whose image encoder embeds the gallery."),
    images: Path = typer.Option(..., "--images", help="Image features .npy (region features; CMPM: images x 3 x H x W)."),
    out: Path = typer.Option(..., "--out", help="Gallery folder to create."),
    backend: str = typer.Option("ort", "--backend", help="ort (ONNX Runtime) or trt (native TensorRT engines)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or int8 (the bundle must hold that variant)."),
    providers: str | None = typer.Option(None, "--providers", help="ONNX Runtime providers, comma-separated (tensorrt,cuda,cpu)."),
    threads: int = typer.Option(0, "--threads", min=0, help="ONNX Runtime intra-op threads (0: one per core)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Images per encoder batch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing gallery at --out."),
) -> None:
    """Write GALLERY/image_embeddings.npy (memory-mapped when searched) and GALLERY/gallery.json tying it to the bundle."""
    from itmrt.runtime.api import load
    from itmrt.runtime.gallery import load_features

    started = time.perf_counter()
    provider_list = [p.strip() for p in providers.split(",") if p.strip()] if providers else None
    runtime = load(bundle, backend, precision, provider_list, threads, batch_size=batch_size)
    gallery = runtime.index(load_features(images), out, overwrite=overwrite, source=str(images))
    typer.echo(
        f"indexed {len(gallery)} images ({backend}/{precision}) into {out} in {time.perf_counter() - started:.1f}s; "
        f"embeddings {tuple(gallery.embeddings.shape)}"
    )
