"""``itmrt infer``: retrieval with a bundle, a gallery, or (for comparison) the PyTorch checkpoint.

Every path writes the same outputs: ``results.jsonl`` (one line per caption
query with its top-k images, one per image query with its top-k captions) and,
with ``--scores-out``, the ``images x captions`` float32 score matrix - so any
two paths (checkpoint vs bundle, fp32 vs int8, ORT vs TensorRT) compare on the
command line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli import ray_options as ray_flags
from itmrt.cli.app import app
from itmrt.cli.flags import OutputOptions, RuntimeOptions
from itmrt.cli.outputs import check_new_files, check_outputs_apart, warn_on_stderr
from itmrt.errors import ItmrtError


def _write_outputs(out: Path, scores_out: Path | None, captions: list[str], t2i: Any, i2t: Any, scores: Any,
                   overwrite: bool, image_ids: list[str] | None = None,
                   directions: tuple[str, ...] = ("t2i", "i2t")) -> None:
    """Both outputs as one result: without ``overwrite`` a file that appeared meanwhile (another run's) is
    kept and this run fails with a one-line error, leaving neither of its files. Only the ``directions`` asked
    (``--direction``) have lines."""
    from itmrt.publish import atomic_write_files, float32_npy_bytes
    from itmrt.runtime.results import results_jsonl

    t2i, i2t = (t2i if "t2i" in directions else None), (i2t if "i2t" in directions else None)
    outputs = [(out, results_jsonl(captions, t2i, i2t, image_ids).encode("utf-8"))]
    if scores_out is not None:
        outputs.insert(0, (scores_out, float32_npy_bytes(scores)))
    atomic_write_files(outputs, overwrite)


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
    ids = tokenize(vocab, captions, max_length, on_long, warn_on_stderr)
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


def _infer_checkpoint(checkpoint: Path, vocab: Path | None, images: Path | None, captions: list[str], top_k: int,
                      scores_out: Path | None, out: Path, request: BundleRequest, timer: Any) -> str:
    """The PyTorch reference path (each step a stage of ``timer``); returns what it did, for the summary."""
    from itmrt.runtime.tiled import top_k_of_matrix

    if vocab is None:
        raise ItmrtError(f"{checkpoint} is a checkpoint: pass --vocab (the vocabulary it was trained with)")
    if images is None:
        raise ItmrtError("a checkpoint needs --images (galleries belong to bundles)")
    with timer.stage("reference"):
        scores = _reference_scores(checkpoint, vocab, images, captions, request.runtime.max_length,
                                   request.runtime.on_long, request.runtime.batch_size)
    t2i, i2t = top_k_of_matrix(scores, top_k, "the image features may hold values the model cannot take")
    with timer.stage("write"):
        _write_outputs(out, scores_out, captions, t2i, i2t, scores, request.outputs.overwrite,
                       directions=request.directions)
    return f"PyTorch reference: {scores.shape[0]} images x {scores.shape[1]} captions"


@app.command("infer")
@flags.runtime_group("backend", "precision", "providers", "threads", "scorer", "max_length", "on_long", "batch_size",
                       "memory_mb", "device", "gpu_mem_limit_mb")
@flags.output_group("overwrite", "progress")
@flags.region_group()
@ray_flags.ray_group
def infer_command(
    source: Path = typer.Argument(..., help="A bundle folder, a gallery folder (from `itmrt index`), or a checkpoint file (needs --vocab)."),
    captions_path: Path = typer.Option(..., "--captions", help="Captions file: UTF-8, one caption per line."),
    images: Path | None = typer.Option(None, "--images", help=(
        "Image features .npy (region features; CMPM: images x 3 x H x W), or with a CMPM bundle a folder of "
        "images or a text file listing image paths (JPEG, PNG, WebP; results name them by path).")),
    gallery_path: Path | None = typer.Option(None, "--gallery", help="With a bundle: search this gallery instead of --images."),
    vocab: Path | None = typer.Option(None, "--vocab", help="Checkpoint only: the vocabulary JSON the model was trained with."),
    runtime: Any = None,  # the runtime options (flags.runtime_group): one RuntimeOptions
    top_k: int = typer.Option(10, "--top-k", min=1, max=limits.MAX_COUNT, help="Results per query."),
    direction: Any = flags.direction(),
    out: Path = typer.Option(..., "--out", help="results.jsonl to write."),
    scores_out: Path | None = typer.Option(None, "--scores-out", help="Also write the images x captions score matrix (float32 .npy)."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help=(
        "Image files: leave out unreadable or truncated files (a warning each, and a count) instead of stopping.")),
    timings: bool = typer.Option(False, "--timings", help=(
        "Print where the time went (start-up, import, load, kernels, encoding, scoring, writing) as one JSON "
        "line on stderr, after 'timings: '.")),
    shortlist: int | None = typer.Option(None, "--shortlist", min=1, max=limits.MAX_COUNT, help="Bundle/gallery only: rerank each query's K best candidates by a cheap global score instead of scoring every pair (K >= --top-k; no --scores-out; a sharded gallery: K per shard)."),
    regions: Any = None,  # the region-index flags (flags.region_group): a dict for SearchRequest
    ray: Any = None,  # the --ray options (ray_options.ray_group): RayOptions, or None without --ray
) -> None:
    """Rank images for every caption and captions for every image; write results.jsonl (and scores)."""
    from itmrt.timings import StageTimer, process_age

    timer = StageTimer()
    timer.add("startup", process_age() or 0.0)  # the interpreter and the CLI, before this line
    with timer.stage("import"):  # numpy, ONNX Runtime, tqdm and the runtime (a checkpoint: torch, later)
        import importlib

        for module in ("itmrt.data.precomp", "itmrt.cli.progress", "itmrt.runtime.api", "itmrt.runtime.image_files"):
            importlib.import_module(module)
    from itmrt.data.precomp import read_captions

    output_paths = {"--out": out, "--scores-out": scores_out}
    check_outputs_apart(output_paths, {_source_role(source): source, "gallery (--gallery)": gallery_path,
                                       "images": images, "captions": captions_path, "vocabulary": vocab})
    # (before "pass --overwrite", which would not help)
    _check_request(out, scores_out, outputs.overwrite, shortlist, top_k)
    captions = read_captions(captions_path, "one caption per line")
    started = time.perf_counter()
    request = BundleRequest(source, gallery_path, images, runtime.replace(warn=warn_on_stderr), skip_bad_images,
                            outputs)
    request.directions = direction.searched
    if source.is_file():
        if shortlist is not None or regions:
            raise ItmrtError("--shortlist and the region-index flags run on a bundle or gallery, not on the PyTorch "
                             "reference; drop them or pass a bundle")
        done = _infer_checkpoint(source, vocab, images, captions, top_k, scores_out, out, request, timer)
        typer.echo(f"{done} in {time.perf_counter() - started:.1f}s; wrote {out}")
    else:
        if vocab is not None:
            raise ItmrtError(f"--vocab is for a checkpoint; {source} is a folder, and a bundle or gallery carries "
                             "its own vocabulary: drop --vocab")
        request.bundle, request.gallery = _bundle_and_gallery(source, gallery_path, images)
        check_outputs_apart(output_paths, {"bundle": request.bundle, "gallery": request.gallery})
        request.ray, request.regions = ray, regions
        n_images, how = _search_bundle(request, captions, top_k, scores_out, shortlist, outputs.progress, out, timer)
        typer.echo(f"{runtime.backend}/{runtime.precision}: {n_images} images x {len(captions)} captions in "
                   f"{time.perf_counter() - started:.1f}s ({how}); wrote {out}")
    if timings:
        import json

        typer.echo("timings: " + json.dumps({**timer.as_dict(), "total": round(process_age() or 0.0, 3)}), err=True)


def _source_role(source: Path) -> str:
    """What the source is, as an error names it: a checkpoint file, a gallery or a bundle folder."""
    from itmrt.runtime.gallery import is_gallery

    if source.is_file():
        return "checkpoint"
    return "gallery" if is_gallery(source) else "bundle"


def region_flags(regions: dict[str, int]) -> str:
    """The region-index flags given, as the user typed them (for a message)."""
    return ", ".join("--" + name.replace("_", "-") for name in regions)


@dataclass
class BundleRequest:
    """What ``itmrt infer`` opens: a bundle, a gallery or image input, and how to run them."""

    bundle: Path
    gallery: Path | None
    images: Path | None
    runtime: RuntimeOptions  # how the bundle runs (the command's runtime flags)
    skip_bad_images: bool
    outputs: OutputOptions = OutputOptions()  # overwrite: replace existing output files
    ray: Any = None  # itmrt.scale.RayOptions: search a sharded gallery on Ray
    regions: dict[str, int] = field(default_factory=dict)  # region-index flags given (SearchRequest's fields)
    directions: tuple[str, ...] = ("t2i", "i2t")  # which queries are answered (--direction)


def _bundle_and_gallery(source: Path, gallery_path: Path | None, images: Path | None) -> tuple[Path, Path | None]:
    """The bundle to load and the gallery to search (None: encode ``--images``), from the command's source."""
    from itmrt.runtime.gallery import gallery_source

    bundle_path, gallery_path = gallery_source(source, gallery_path, "a bundle folder, a gallery folder or a checkpoint file")
    if (gallery_path is None) == (images is None):
        raise ItmrtError("give exactly one of --images (features .npy, image folder or list) or a gallery "
                         "(as the source or --gallery)")
    return bundle_path, gallery_path


def _search_bundle(request: BundleRequest, captions: list[str], top_k: int, scores_out: Path | None,
                   shortlist: int | None, progress: bool, out: Path, timer: Any) -> tuple[int, str]:
    """Load, encode, score and write, each a stage of ``timer``; the number of images and how they were scored."""
    from itmrt.cli.progress import progress_bars
    from itmrt.runtime.api import load
    from itmrt.runtime.image_files import is_image_listing
    from itmrt.runtime.one_caption import FEW_CAPTIONS
    from itmrt.scale.layout import is_sharded_gallery

    if request.gallery is not None and is_sharded_gallery(request.gallery):
        from itmrt.cli.infer_sharded import search_sharded

        return search_sharded(request, captions, top_k, scores_out, shortlist, progress, out, timer)
    if request.ray is not None:
        raise ItmrtError("--ray searches a sharded gallery; make one with `itmrt index ... --shard-images N`")
    if request.regions:
        raise ItmrtError(f"{region_flags(request.regions)} search a sharded gallery's region index; make one with "
                         "`itmrt index ... --shard-images N --shortlist-index regions`")
    with timer.stage("load"):
        runtime = load(request.bundle, request.runtime)
    few = runtime.one_caption is not None and len(captions) <= FEW_CAPTIONS  # the one-caption scorer's (numpy)
    with timer.stage("kernels"):  # the fused scorer's numba kernels: compiled once per machine, then cached
        if runtime.fused is not None and not few:
            runtime.fused.warm_kernels()
    image_ids: list[str] | None = None
    with timer.stage("encode_images"):
        if request.gallery is not None:
            image_set: Any = runtime.open_gallery(request.gallery)
            image_ids = image_set.ids
        else:
            assert request.images is not None
            inputs = flags.image_inputs(runtime, request.images)
            if is_image_listing(request.images):
                image_set, image_ids = runtime.encode_image_files(inputs, request.skip_bad_images)
            else:
                image_set = runtime.encode_images(inputs, source=str(request.images))
        n_images = len(image_set)
    with timer.stage("encode_captions"):
        encoded = runtime.encode_captions(captions)
    with timer.stage("score"), progress_bars(progress and shortlist is None) as bars:
        result = runtime.rank(image_set, encoded, top_k, keep_scores=scores_out is not None, shortlist=shortlist,
                              progress=bars("score (captions)", len(captions)), directions=request.directions)
    with timer.stage("write"):
        _write_outputs(out, scores_out, captions, result.t2i, result.i2t, result.scores, request.outputs.overwrite,
                       image_ids, request.directions)
    how = (f"shortlist of {shortlist} per query" if shortlist is not None and result.tiles == 0
           else "the one-caption scorer" if few
           else f"{result.tiles} tiles of {result.tile_shape[0]} x {result.tile_shape[1]}")
    return n_images, how
