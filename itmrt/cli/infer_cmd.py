"""``itmrt infer``: retrieval with a bundle, a gallery, or (for comparison) the PyTorch checkpoint.

Every path writes the same outputs: ``results.jsonl`` (one line per caption
query with its top-k images, one per image query with its top-k captions) and,
with ``--scores-out``, the ``images x captions`` float32 score matrix - so any
two paths (checkpoint vs bundle, fp32 vs int8, ORT vs TensorRT) compare on the
command line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from itmrt.cli import options
from itmrt.cli.app import app
from itmrt.cli.options import BackendName, OnLong, Precision
from itmrt.cli.outputs import check_new_files
from itmrt.errors import ItmrtError


def _say_warning(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def results_jsonl(captions: list[str], t2i: Any, i2t: Any) -> str:
    """One JSON line per caption query (best images) then per image query (best captions)."""
    import json

    lines = []
    for j, caption in enumerate(captions):
        ids, scores = t2i.indices[j], t2i.scores[j]
        lines.append(json.dumps({"query": "caption", "index": j, "caption": caption,
                                 "images": [int(x) for x in ids], "scores": [float(s) for s in scores]}))
    for i in range(i2t.indices.shape[0]):
        lines.append(json.dumps({"query": "image", "index": i,
                                 "captions": [int(x) for x in i2t.indices[i]], "scores": [float(s) for s in i2t.scores[i]]}))
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, scores_out: Path | None, captions: list[str], t2i: Any, i2t: Any, scores: Any) -> None:
    from itmrt.io import atomic_save_float32_npy, atomic_write_text

    if scores_out is not None:
        atomic_save_float32_npy(scores_out, scores)
    atomic_write_text(out, results_jsonl(captions, t2i, i2t))


def _reference_scores(checkpoint: Path, vocab_path: Path, images_path: Path, captions: list[str],
                      max_length: int | None, on_long: str, batch_size: int) -> Any:
    """The PyTorch reference's score matrix (images x captions); the only path that imports torch."""
    from itmrt.families import family_of
    from itmrt.families.checkpoints import load_checkpoint
    from itmrt.models.evaluate import load_vocabulary_for, reference_scores
    from itmrt.runtime.encoders import tokenize
    from itmrt.runtime.gallery import load_features

    model = load_checkpoint(checkpoint).eval()
    vocab = load_vocabulary_for(model, vocab_path)
    features = load_features(images_path)
    ids = tokenize(vocab, captions, max_length, on_long, _say_warning)
    family_of(model).check_reference_images(model, features, str(images_path))
    return reference_scores(model, features, ids, vocab.pad_id, batch_size)


def _check_request(out: Path, scores_out: Path | None, overwrite: bool, shortlist: int | None, top_k: int) -> None:
    check_new_files([out, scores_out], overwrite)
    if scores_out is not None and scores_out.resolve() == out.resolve():
        raise ItmrtError("--out and --scores-out name the same file")
    if shortlist is not None:
        from itmrt.runtime.shortlist import check_shortlist

        check_shortlist(shortlist, top_k)
        if scores_out is not None:
            raise ItmrtError("--shortlist scores only candidate pairs, not the full matrix; drop --shortlist or --scores-out")


def _bundle_of(source: Path, gallery_path: Path | None, images: Path | None) -> tuple[Path, Path | None]:
    """(bundle folder, gallery folder or None) for a bundle or gallery given as the source."""
    from itmrt.bundle.folder import is_bundle
    from itmrt.runtime.gallery import is_gallery, read_gallery

    if is_gallery(source):
        if gallery_path is not None:
            raise ItmrtError("give either a gallery as the source or --gallery, not both")
        gallery_path, bundle_path = source, read_gallery(source).bundle_path
    elif is_bundle(source):
        bundle_path = source
    elif not source.exists():
        raise ItmrtError(f"{source} does not exist; give a bundle folder, a gallery folder or a checkpoint file")
    else:
        raise ItmrtError(f"{source} is neither an itmrt bundle, a gallery nor a checkpoint file")
    if (gallery_path is None) == (images is None):
        raise ItmrtError("give exactly one of --images FEATS.npy or a gallery (as the source or --gallery)")
    return bundle_path, gallery_path


@dataclass(frozen=True)
class _Outputs:
    out: Path
    scores_out: Path | None
    top_k: int


def _infer_checkpoint(checkpoint: Path, vocab: Path | None, images: Path | None, captions: list[str],
                      outputs: _Outputs, max_length: int | None, on_long: str, batch_size: int) -> tuple[str, str]:
    """The PyTorch reference path; returns what to print before and after its time."""
    from itmrt.runtime.tiled import top_k_of_matrix

    if vocab is None:
        raise ItmrtError(f"{checkpoint} is a checkpoint: pass --vocab (the vocabulary it was trained with)")
    if images is None:
        raise ItmrtError("a checkpoint needs --images (galleries belong to bundles)")
    scores = _reference_scores(checkpoint, vocab, images, captions, max_length, on_long, batch_size)
    t2i, i2t = top_k_of_matrix(scores, outputs.top_k)
    _write_outputs(outputs.out, outputs.scores_out, captions, t2i, i2t, scores)
    return f"PyTorch reference: {scores.shape[0]} images x {scores.shape[1]} captions", ""


def _infer_bundle(runtime: Any, gallery_path: Path | None, images: Path | None, captions: list[str],
                  outputs: _Outputs, shortlist: int | None, progress: bool) -> tuple[str, str]:
    """The runtime path (a bundle, or its gallery); returns what to print before and after its time."""
    from itmrt.cli.progress import progress_bars
    from itmrt.runtime.gallery import load_features

    if gallery_path is not None:
        image_set: Any = runtime.open_gallery(gallery_path)
        n_images = len(image_set)
    else:
        assert images is not None
        image_set = runtime.encode_images(load_features(images), source=str(images))
        n_images = image_set.shape[0]
    encoded = runtime.encode_captions(captions)
    with progress_bars(progress and shortlist is None) as bars:
        result = runtime.rank(image_set, encoded, outputs.top_k, keep_scores=outputs.scores_out is not None,
                              shortlist=shortlist, progress=bars("score (captions)", len(captions)))
    _write_outputs(outputs.out, outputs.scores_out, captions, result.t2i, result.i2t, result.scores)
    how = (f"shortlist of {shortlist} per query" if shortlist is not None and result.tiles == 0
           else f"{result.tiles} tiles of {result.tile_shape[0]} x {result.tile_shape[1]}")
    return f"{runtime.backend_name}/{runtime.precision}: {n_images} images x {len(captions)} captions", f" ({how})"


@app.command("infer")
def infer_command(
    source: Path = typer.Argument(..., help="A bundle folder, a gallery folder (from `itmrt index`), or a checkpoint file (needs --vocab)."),
    captions_path: Path = typer.Option(..., "--captions", help="Captions file: UTF-8, one caption per line."),
    images: Path | None = typer.Option(None, "--images", help="Image features .npy (region features; CMPM: images x 3 x H x W)."),
    gallery_path: Path | None = typer.Option(None, "--gallery", help="With a bundle: search this gallery instead of --images."),
    vocab: Path | None = typer.Option(None, "--vocab", help="Checkpoint only: the vocabulary JSON the model was trained with."),
    backend: BackendName = options.backend(),
    precision: Precision = options.precision(),
    providers: str | None = options.providers(),
    threads: int = options.threads(),
    top_k: int = typer.Option(10, "--top-k", min=1, help="Results per query."),
    max_length: int | None = typer.Option(None, "--max-length", min=2, help="Caption token limit (default: the bundle's profile maximum)."),
    on_long: OnLong = options.on_long(),
    batch_size: int = options.batch_size(128, "Images / captions per encoder batch."),
    memory_mb: int = typer.Option(32, "--memory-mb", min=1, help="Memory budget of one scoring tile, in MB."),
    out: Path = typer.Option(..., "--out", help="results.jsonl to write."),
    scores_out: Path | None = typer.Option(None, "--scores-out", help="Also write the images x captions score matrix (float32 .npy)."),
    overwrite: bool = options.overwrite("existing output files"),
    progress: bool = options.progress(),
    shortlist: int | None = typer.Option(None, "--shortlist", min=1, help="Bundle/gallery only: rerank each query's K best candidates by a cheap global score instead of scoring every pair (K >= --top-k; no --scores-out)."),
) -> None:
    """Rank images for every caption and captions for every image; write results.jsonl (and scores)."""
    from itmrt.data.precomp import read_captions

    _check_request(out, scores_out, overwrite, shortlist, top_k)
    captions = read_captions(captions_path)
    outputs = _Outputs(out, scores_out, top_k)
    started = time.perf_counter()
    if source.is_file():
        if shortlist is not None:
            raise ItmrtError("--shortlist runs on a bundle or gallery, not on the PyTorch reference; drop it or pass a bundle")
        head, tail = _infer_checkpoint(source, vocab, images, captions, outputs, max_length, on_long, batch_size)
    else:
        from itmrt.runtime.api import load

        bundle_path, gallery_path = _bundle_of(source, gallery_path, images)
        runtime = load(bundle_path, backend=backend, precision=precision, providers=options.parse_providers(providers),
                       threads=threads, max_length=max_length, on_long=on_long, batch_size=batch_size,
                       budget_bytes=memory_mb << 20, warn=_say_warning)
        head, tail = _infer_bundle(runtime, gallery_path, images, captions, outputs, shortlist, progress)
    typer.echo(f"{head} in {time.perf_counter() - started:.1f}s{tail}; wrote {out}")
