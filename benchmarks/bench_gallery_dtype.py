"""What float16 gallery storage changes against float32: score error, top-1 agreement and rsum, two models.

    python benchmarks/bench_gallery_dtype.py [--work /tmp/itmrt-gallery-dtype] [--released-images 1000]

- ``shipped``: the shipped small NAAF (``itmrt/assets``, d 128) exported, and
  its synthetic test split (200 images, 1000 captions) indexed twice with
  ``Runtime.index(..., dtype=...)``; rsum is the split's Recall@K sum.
- ``released``: a NAAF at the released sizes (36 regions, d 1024; random
  weights, made and exported by ``bench_flickr_size.prepare_bundle``) and a
  synthetic gallery of ``--released-images`` images with five known-item
  queries each (``scale_data``); both galleries are written through
  ``write_gallery``; rsum counts a query's own image (t2i) and an image's own
  queries (i2t) as the matches.

Scores come from the runtime's scorer (the fused CPU scorer), which upcasts
each float16 tile to float32. Reported per model: disk size of each storage,
max and 99.9th-percentile absolute score error, pairs off by more than 1e-4,
top-1 agreement both ways, and rsum under each storage (ties counted
pessimistically, as ``itmrt eval`` does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from itmrt.metrics.recall import recall_table


def compare(scores32: np.ndarray, scores16: np.ndarray, size32: int, size16: int) -> dict[str, Any]:
    error = np.abs(scores16.astype(np.float64) - scores32)
    r32, r16 = recall_table(scores32), recall_table(scores16)
    return {
        "pairs": int(error.size),
        "disk_mb_float32": round(size32 / 2**20, 2), "disk_mb_float16": round(size16 / 2**20, 2),
        "max_abs_error": float(error.max()), "p999_abs_error": float(np.quantile(error, 0.999)),
        "pairs_over_1e-4": int((error > 1e-4).sum()),
        "top1_agreement_t2i": float(np.mean(scores32.argmax(0) == scores16.argmax(0))),
        "top1_agreement_i2t": float(np.mean(scores32.argmax(1) == scores16.argmax(1))),
        "rsum_float32": round(r32["rsum"], 2), "rsum_float16": round(r16["rsum"], 2),
        "rsum_change": round(r16["rsum"] - r32["rsum"], 2),
        "recalls_float32": {k: round(v, 2) for k, v in r32.items()},
        "recalls_float16": {k: round(v, 2) for k, v in r16.items()},
    }


def shipped(work: Path) -> dict[str, Any]:
    from itmrt.data.precomp import PrecompSplit
    from itmrt.demo import SHIPPED_NAAF, shipped_model
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.runtime import load
    from itmrt.synthetic.region_features import make_synthetic_dataset
    from itmrt.train.recipes import SMALL_REGION_DATA

    checkpoint = shipped_model(SHIPPED_NAAF)
    if checkpoint is None:
        raise SystemExit(f"no shipped {SHIPPED_NAAF} in itmrt/assets; run `itmrt make-small-models` first")
    data = work / "data"
    if not (data / "vocab.json").is_file():
        make_synthetic_dataset(data, {"test": 200}, seed=SMALL_REGION_DATA["seed"],
                               img_dim=SMALL_REGION_DATA["img_dim"])
    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        export_bundle(checkpoint, data / "vocab.json", bundle, ExportOptions())
    split = PrecompSplit.open(data, "test")
    runtime = load(bundle, warn=lambda message: None)
    captions = runtime.encode_captions(list(split.captions))
    galleries = {dtype: runtime.index(split.images, work / f"gallery-{dtype}", overwrite=True, dtype=dtype)
                 for dtype in ("float32", "float16")}
    scores = {dtype: runtime.score(gallery, captions) for dtype, gallery in galleries.items()}
    sizes = {dtype: (g.path / "image_embeddings.npy").stat().st_size for dtype, g in galleries.items()}
    return {"model": f"shipped {checkpoint.name}", "images": len(split.images), "captions": len(captions),
            **compare(scores["float32"], scores["float16"], sizes["float32"], sizes["float16"])}


def released(work: Path, n_images: int) -> dict[str, Any]:
    from itmrt.runtime import load
    from itmrt.runtime.gallery import write_gallery

    from bench_flickr_size import prepare_bundle
    from scale_data import REGIONS, fill_regions, known_item_queries, make_space

    bundle = prepare_bundle(work / "released")[0]
    runtime = load(bundle, warn=lambda message: None)
    depth = int(runtime.bundle.manifest.dims["embed_size"])
    space = make_space(depth)
    queries = known_item_queries(space, np.arange(n_images), per_image=5)
    scores, sizes = {}, {}
    for dtype in ("float32", "float16"):
        def fill(array: np.ndarray) -> None:
            fill_regions(space, 0, array)

        gallery = write_gallery(work / f"released-{dtype}", runtime.bundle, fill, (n_images, REGIONS, depth),
                                {"source": "bench_gallery_dtype synthetic"}, overwrite=True, dtype=dtype)
        scores[dtype] = runtime.score(gallery, queries)
        sizes[dtype] = (gallery.path / "image_embeddings.npy").stat().st_size
    return {"model": "released sizes (random weights)", "images": n_images, "captions": len(queries),
            **compare(scores["float32"], scores["float16"], sizes["float32"], sizes["float16"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/itmrt-gallery-dtype"))
    parser.add_argument("--released-images", type=int, default=1000)
    parser.add_argument("--models", default="shipped,released")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    if "shipped" in args.models:
        rows.append(shipped(args.work))
    if "released" in args.models:
        rows.append(released(args.work, args.released_images))
    print("| model | images x captions | disk float32 -> float16 MB | max / 99.9% abs score error | pairs > 1e-4 "
          "| top-1 agreement t2i / i2t | rsum float32 -> float16 (change) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['images']} x {r['captions']} | {r['disk_mb_float32']} -> {r['disk_mb_float16']} "
              f"| {r['max_abs_error']:.1e} / {r['p999_abs_error']:.1e} | {r['pairs_over_1e-4']} of {r['pairs']} "
              f"| {r['top1_agreement_t2i']:.3f} / {r['top1_agreement_i2t']:.3f} "
              f"| {r['rsum_float32']} -> {r['rsum_float16']} ({r['rsum_change']:+.2f}) |")
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"details: {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
