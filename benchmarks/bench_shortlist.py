"""The recall a shortlist costs and the time it saves: full cross-attention scoring vs shortlist K.

Data: the synthetic test split the small NAAF is evaluated on (region
features, five captions per image; ``itmrt.train.recipes.SMALL_REGION_DATA``'s
seed and feature size). Model: the shipped ``itmrt/assets/naaf_small.pth.tar``
(or ``--checkpoint``), exported to an ONNX bundle and run by the torch-free
runtime (ONNX Runtime, fp32, CPU; the fused scorer when numba is installed).

For full scoring and for each shortlist size K the table gives text-to-image
Recall@1/5/10 (a caption's own image among its top k; ties by the lower index,
as the runtime orders them), the t2i time (encoding excluded, global vectors
included), the cross-attention pairs actually scored, and the share of captions
whose best image is full scoring's; image-to-text R@1 too.

    python benchmarks/bench_shortlist.py                   # ~1 minute on this 2-core CPU
    python benchmarks/bench_shortlist.py --images 100 --shortlists 5,10,20 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CAPTIONS_PER_IMAGE = 5


def t2i_recall(indices: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> list[float]:
    """Percent of captions whose own image (caption // 5) is among their top k."""
    own = np.arange(len(indices)) // CAPTIONS_PER_IMAGE
    return [100.0 * float(np.mean((indices[:, :k] == own[:, None]).any(axis=1))) for k in ks]


def i2t_recall_at_1(indices: np.ndarray) -> float:
    """Percent of images whose best caption is one of their own five."""
    return 100.0 * float(np.mean(indices[:, 0] // CAPTIONS_PER_IMAGE == np.arange(len(indices))))


def prepare(work: Path, checkpoint: Path, n_images: int) -> tuple[Path, Any]:
    """Synthetic test split and the exported bundle (the only step that needs torch)."""
    from itmrt.data.precomp import PrecompSplit
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.synthetic.region_features import make_synthetic_dataset
    from itmrt.train.recipes import SMALL_REGION_DATA

    data = make_synthetic_dataset(work / "data", {"test": n_images}, seed=SMALL_REGION_DATA["seed"],
                                  img_dim=SMALL_REGION_DATA["img_dim"])
    bundle = work / "bundle"
    export_bundle(checkpoint, data / "vocab.json", bundle, ExportOptions())
    return bundle, PrecompSplit.open(data, "test")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped naaf_small.pth.tar")
    parser.add_argument("--images", type=int, default=200, help="test images (x5 captions)")
    parser.add_argument("--shortlists", default="10,20,50", help="shortlist sizes K, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="scorer threads (1: steady timings on a shared machine)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row (the best is kept)")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or Path(__file__).resolve().parents[1] / "itmrt" / "assets" / "naaf_small.pth.tar"
    if not checkpoint.is_file():
        sys.exit(f"error: no checkpoint at {checkpoint}; pass --checkpoint")
    shortlists = [int(x) for x in args.shortlists.split(",") if x.strip()]

    from itmrt.runtime import load
    from itmrt.runtime.shortlist import image_global_vectors, shortlist_search

    with tempfile.TemporaryDirectory(prefix="bench-shortlist-") as tmp:
        started = time.perf_counter()
        bundle, split = prepare(Path(tmp), checkpoint, args.images)
        runtime = load(bundle, threads=args.threads, warn=lambda message: None)
        images = runtime.encode_images(np.asarray(split.images))
        captions = runtime.encode_captions(split.captions)
        print(f"{checkpoint.name}: {len(images)} images x {len(captions)} captions, scorer {runtime.scorer_kind}, "
              f"{args.threads} thread(s); setup {time.perf_counter() - started:.0f} s")
        runtime.rank(images[:2], captions.take([0, 1]), top_k=1)  # warm-up (ORT buffers, numba compile)

        def timed(run: Any) -> tuple[Any, float]:
            best, out = float("inf"), None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = run()
                best = min(best, time.perf_counter() - t0)
            return out, best

        full, full_s = timed(lambda: runtime.rank(images, captions, top_k=10))
        rows = [("full", t2i_recall(full.t2i.indices), i2t_recall_at_1(full.i2t.indices), full_s,
                 len(images) * len(captions), 100.0)]
        pairs = [0]

        def counting(embeddings: np.ndarray, caps: Any) -> np.ndarray:
            pairs[0] += len(embeddings) * len(caps)
            return runtime._score_matrix(embeddings, caps)

        for k in shortlists:
            if k > len(images):
                continue
            pairs[0] = 0

            def t2i_only(k: int = k) -> Any:
                return shortlist_search(
                    counting, images, captions, 10, k, ("t2i",), image_global_vectors(images)
                )["t2i"]

            t2i, seconds = timed(t2i_only)
            scored = pairs[0] // args.repeats
            i2t = shortlist_search(runtime._score_matrix, images, captions, 10, k, ("i2t",))["i2t"]
            same = 100.0 * float(np.mean(t2i.indices[:, 0] == full.t2i.indices[:, 0]))
            rows.append((f"K={k}", t2i_recall(t2i.indices), i2t_recall_at_1(i2t.indices), seconds, scored, same))

    print(f"\n{'t2i search':<10} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'i2t R@1':>8} {'time s':>8} {'speed-up':>8} "
          f"{'pairs scored':>13} {'same top-1':>10}")
    for name, recall, i2t_r1, seconds, scored, same in rows:
        print(f"{name:<10} {recall[0]:6.1f} {recall[1]:6.1f} {recall[2]:6.1f} {i2t_r1:8.1f} {seconds:8.3f} "
              f"{full_s / seconds:7.1f}x {scored:13,d} {same:9.1f}%")
    print("\n(full: one pass gives both directions, so its time covers t2i and i2t; K rows time t2i alone.)")
    print(
        f"command: python benchmarks/bench_shortlist.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    )


if __name__ == "__main__":
    main()
