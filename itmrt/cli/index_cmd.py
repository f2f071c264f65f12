"""``itmrt index``: encode a gallery's images once and store the embeddings beside a manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli.app import app
from itmrt.cli.outputs import check_outputs_apart, warn_on_stderr
from itmrt.errors import ItmrtError

Opt = typer.Option
REGION_FLAGS = {"region_centroids": "--region-centroids", "nprobe": "--nprobe", "candidates": "--candidates",
                "exact_pass": "--exact-pass", "region_sketch": "--region-sketch"}
"""The region index's options that have no default on the command line (None: not given)."""
DEFAULT_RESIDUAL_BITS = 2.0


@app.command("index")
@flags.runtime_group("backend", "precision", "providers", "threads", "batch_size", "device", "gpu_mem_limit_mb",
                       batch_size=flags.batch_size(128, "Images per encoder batch."))
@flags.output_group("overwrite", "progress", overwrite=flags.overwrite("an existing gallery at --out"))
def index_command(
    bundle: Path = typer.Argument(..., help="The bundle whose image encoder embeds the gallery."),
    images: Path | None = Opt(None, "--images", help=(
        "Image features .npy (region features; CMPM: images x 3 x H x W), or for a CMPM bundle a folder of "
        "images or a text file listing image paths (JPEG, PNG, WebP).")),
    embeddings: Path | None = Opt(None, "--embeddings", help=(
        "Instead of --images: image embeddings already encoded, .npy float32 or float16 [N, regions, d] "
        "(CMPM: [N, D]); checked against the bundle's shape, for finite values and unit-length regions.")),
    out: Path = Opt(..., "--out", help="Gallery folder to create (with --append: the sharded gallery to extend)."),
    runtime: Any = None,  # the runtime options (flags.runtime_group): one RuntimeOptions
    skip_bad_images: bool = Opt(False, "--skip-bad-images", help=(
        "Image files: leave out unreadable or truncated files (a warning each, and a count) instead of stopping.")),
    warmup: bool = Opt(True, "--warmup/--no-warmup", help=(
        "Run every component once first, so the scorer's kernels are compiled (or loaded from their cache) "
        "before the gallery is searched.")),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
    dtype: str | None = Opt(None, "--dtype", help=(
        "Embedding storage: float32 (default) or float16 (half the size; scoring upcasts one tile at a time).")),
    shard_images: int | None = Opt(None, "--shard-images", min=1, help=(
        "Write a sharded gallery: shards of at most N images, each with a FAISS shortlist index; searched on "
        "this machine or on Ray (infer/serve --ray).")),
    append: bool = Opt(False, "--append", help=(
        "Add the images to the sharded gallery at --out as new shards; old shards are not rewritten.")),
    shortlist_index: str | None = Opt(None, "--shortlist-index", help=(
        "Sharded: each shard's FAISS index of global vectors: flat (exact inner product, default), ivf, hnsw, "
        "none (numpy); or regions: the region index of NAAF/SCAN galleries (docs/region-index.md).")),
    ivf_lists: int | None = Opt(None, "--ivf-lists", min=1, max=limits.MAX_COUNT, help="ivf: k-means lists per shard (default ~4 sqrt(N))."),
    ivf_probe: int = Opt(16, "--ivf-probe", min=1, max=limits.MAX_COUNT, help="ivf: lists searched per query."),
    hnsw_m: int = Opt(32, "--hnsw-m", min=1, max=limits.MAX_HNSW_M, help="hnsw: links per vector."),
    hnsw_ef_construction: int = Opt(80, "--hnsw-ef-construction", min=1, max=limits.MAX_COUNT, help="hnsw: candidates kept while building."),
    hnsw_ef_search: int = Opt(64, "--hnsw-ef-search", min=1, max=limits.MAX_COUNT, help="hnsw: candidates kept while searching (>= K)."),
    region_centroids: int | None = Opt(None, "--region-centroids", min=1, max=limits.MAX_COUNT, help=(
        "regions: k-means centroids per shard (default: a power of two near 8 sqrt(region vectors)).")),
    nprobe: int | None = Opt(None, "--nprobe", min=1, max=limits.MAX_COUNT, help=(
        "regions: the shards' default centroids probed per caption token (default 8; a search's nprobe "
        "overrides it).")),
    candidates: int | None = Opt(None, "--candidates", min=1, max=limits.MAX_COUNT, help=(
        "regions: the shards' recorded images reranked exactly per shard (default 50; a search's "
        "--shortlist K is what it uses).")),
    exact_pass: int | None = Opt(None, "--exact-pass", min=0, max=limits.MAX_COUNT, help=(
        "regions: the shards' recorded images per shard scored exactly, at least K (default 0: none; a shard "
        "whose centroids fit its regions poorly is searched with 500).")),
    regions_storage: str = Opt("exact", "--regions-storage", help=(
        "regions: exact (keep the embeddings) or compact (centroid id + residual bits; embeddings dropped).")),
    residual_bits: float = Opt(DEFAULT_RESIDUAL_BITS, "--residual-bits", help="regions, compact: mean bits per dimension (1 to 4)."),
    region_sketch: str | None = Opt(None, "--region-sketch", help="regions: sign-bit sketches of every region, scanned in full for candidates where probing centroids cannot find them: auto (default: 256 bits on a shard its centroids fit poorly, plus a 512-bit fine sketch under exact storage that narrows the scan's best), off, BITS or BITS:FINE (each 64-512, a multiple of 64; FINE 0: none)."),
) -> None:
    """Write GALLERY/image_embeddings.npy (memory-mapped when searched) and GALLERY/gallery.json tying it to the bundle.

    From image files the gallery also keeps each image's path as its id (GALLERY/image_ids.json). With --shard-images N
    the gallery is sharded: GALLERY/gallery.json lists shard folders (counts, sha256), each a gallery of its own with
    its global vectors and their FAISS index (or its region index); --append adds shards. With --embeddings the images
    are already encoded: they are checked and stored as given.
    """
    from itmrt.data.npy import open_npy
    from itmrt.runtime.api import load
    from itmrt.runtime.image_files import is_image_listing

    started = time.perf_counter()
    _check_inputs(bundle, images, embeddings, out, append)
    sharded = shard_images is not None or append
    index_spec = _index_spec(shortlist_index, ivf_lists, ivf_probe, hnsw_m, hnsw_ef_construction, hnsw_ef_search,
                             {"region_centroids": region_centroids, "nprobe": nprobe, "candidates": candidates,
                              "exact_pass": exact_pass, "regions_storage": regions_storage,
                              "residual_bits": residual_bits, "region_sketch": region_sketch}, sharded, append)
    runtime = load(bundle, runtime, warn=warn_on_stderr)
    warm = f"; warm-up {runtime.warmup():.1f}s" if warmup and embeddings is None else ""
    listing = images is not None and is_image_listing(images)
    given = embeddings is not None
    inputs: Any = open_npy(embeddings, "embeddings") if embeddings is not None else flags.image_inputs(runtime, images)
    source = str(images if images is not None else embeddings)
    if sharded:
        count, shape = _index_sharded(runtime, inputs, out, shard_images, dtype, index_spec, append,
                                      outputs.overwrite, source, skip_bad_images, outputs.progress, given)
    else:
        count, shape = _index_single(runtime, inputs, out, given, source, dtype, outputs.overwrite, skip_bad_images)
    counted = f" ({len(inputs) - count} unreadable skipped)" if listing and len(inputs) > count else ""
    how = "stored as given" if given else f"{runtime.options.backend}/{runtime.options.precision}"
    typer.echo(f"indexed {count} images{counted} ({how}) into {out} in {time.perf_counter() - started:.1f}s{warm}; "
               f"{shape}")


def _check_inputs(bundle: Path, images: Path | None, embeddings: Path | None, out: Path, append: bool) -> None:
    """Exactly one of --images and --embeddings, --out apart from every input, and (before any model is
    loaded) a gallery appended to made by this bundle's image encoder."""
    if (images is None) == (embeddings is None):
        raise ItmrtError("give --images (image features or files) or --embeddings (already encoded), one of them")
    check_outputs_apart({"--out": out}, {"bundle": bundle, "images": images, "embeddings": embeddings})
    if append:
        _check_append_target(bundle, out)


def _check_append_target(bundle: Path, out: Path) -> None:
    """Before any model is loaded: a sharded gallery at ``out`` made by this bundle's image encoder."""
    from itmrt.bundle.folder import read_bundle
    from itmrt.scale.layout import is_sharded_gallery, read_sharded_gallery

    if is_sharded_gallery(out):
        read_sharded_gallery(out).check_bundle(read_bundle(bundle))


def _index_spec(kind: str | None, ivf_lists: int | None, ivf_probe: int, hnsw_m: int, ef_construction: int,
                ef_search: int, regions: dict[str, Any], sharded: bool = True, append: bool = False) -> Any:
    """The shortlist index asked for, or None when no index option was given (the default, or the gallery's)."""
    if kind is not None and not sharded:
        raise ItmrtError("the FAISS shortlist index is built per shard: add --shard-images N (N >= the images "
                         "for one shard)")
    from itmrt.scale.index import IndexSpec

    _check_region_flags(kind, regions, append)
    if kind is None:
        if ivf_lists is not None:
            raise ItmrtError("--ivf-lists is for --shortlist-index ivf")
        return None
    given = {key: value for key, value in regions.items() if value is not None}
    return IndexSpec(kind, ivf_lists, ivf_probe, hnsw_m, ef_construction, ef_search, **given).check()


def _check_region_flags(kind: str | None, regions: dict[str, Any], append: bool = False) -> None:
    """The region index's options only with ``--shortlist-index regions``, and ``--residual-bits`` only with
    compact storage: elsewhere they were silently ignored (a gallery built without the index they describe).
    An append without ``--shortlist-index`` indexes its shards as the gallery records: the flags are dropped."""
    if kind == "regions":
        if regions["residual_bits"] != DEFAULT_RESIDUAL_BITS and regions["regions_storage"] != "compact":
            raise ItmrtError("--residual-bits is for --regions-storage compact (exact storage keeps the embeddings "
                             "whole); add it or drop --residual-bits")
        return
    given = [flag for key, flag in REGION_FLAGS.items() if regions[key] is not None]
    given += ["--regions-storage"] if regions["regions_storage"] != "exact" else []
    given += ["--residual-bits"] if regions["residual_bits"] != DEFAULT_RESIDUAL_BITS else []
    if given and append and kind is None:
        raise ItmrtError(f"--append indexes the new shards with the gallery's recorded index options; drop "
                         f"{', '.join(given)}")
    if given:
        asked = f" (not --shortlist-index {kind})" if kind is not None else ""
        raise ItmrtError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --shortlist-index "
                         f"regions{asked}: add it or drop {'that flag' if len(given) == 1 else 'those flags'}")


def _index_sharded(runtime: Any, inputs: Any, out: Path, shard_images: int | None, dtype: str | None,
                   index_spec: Any, append: bool, overwrite: bool, source: str, skip_bad_images: bool,
                   progress: bool, given: bool = False) -> tuple[int, str]:
    """The sharded gallery written (or appended to): the number of images it gained and its shape in words;
    ``given``: ``inputs`` are embeddings encoded elsewhere."""
    from itmrt.cli.progress import progress_bars
    from itmrt.scale.layout import is_sharded_gallery, read_sharded_gallery
    from itmrt.scale.writer import ShardingOptions, index_sharded

    if append and overwrite:
        raise ItmrtError("--append keeps the gallery and adds to it; drop --overwrite")
    if shard_images is None:  # appending: shards as large as the gallery's
        if not is_sharded_gallery(out):
            raise ItmrtError(f"--append adds shards to a sharded gallery; {out} is not one (make one with "
                             "--shard-images N)")
        shard_images = int(read_sharded_gallery(out).manifest.get("shard_images") or len(inputs))
    before = len(read_sharded_gallery(out)) if append else 0
    options = ShardingOptions(shard_images, dtype, index_spec)
    with progress_bars(progress) as bars:
        gallery = index_sharded(runtime, None if given else inputs, out, options, overwrite=overwrite, append=append,
                                source=source, skip_bad_images=skip_bad_images,
                                progress=bars("index (images)", len(inputs)), embeddings=inputs if given else None)
    shape = (f"{len(gallery.shards)} shards, {len(gallery)} images in all, {gallery.dtype} "
             f"{tuple(gallery.manifest['item_shape'])} per image")
    return len(gallery) - before, shape


def _index_single(runtime: Any, inputs: Any, out: Path, given: bool, source: str, dtype: str | None,
                  overwrite: bool, skip_bad_images: bool) -> tuple[int, str]:
    """A one-folder gallery written: its number of images and its shape in words."""
    single = runtime.index(out=out, overwrite=overwrite, source=source, skip_bad_images=skip_bad_images,
                           dtype=dtype or "float32", **({"embeddings": inputs} if given else {"features": inputs}))
    return len(single), f"embeddings {tuple(single.embeddings.shape)} {single.embeddings.dtype}"
