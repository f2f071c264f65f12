"""The region kernels against what they replace, in one run (:mod:`itmrt.runtime.region_kernels`).

    python benchmarks/bench_region_kernels.py [--images 1000] [--words 12] [--rounds 15]

Random unit-norm regions at the released sizes (36 x 1024) stored as float16 and
float32, and ``--words`` random words. Each row is the best of ``--rounds`` calls
on one thread, the two sides of a row alternating, so a noisy machine moves both:

- the similarity product of ``--images`` images with the words: the compiled
  kernel from float16 against the one-caption scorer's graph (ONNX Runtime's
  cast in pieces, then its GEMM) from float16 and from float32;
- widening float16 to float32: :func:`~itmrt.runtime.region_kernels.to_float32`
  against numpy's cast;
- the per-image Gram matrices of 256 images: the kernels against the graph,
  from float16 and from float32;
- ``w^T G w`` of 256 float16 images without cached constants: each word's
  attended vector summed directly (:func:`~itmrt.runtime.region_kernels.attended_norms_half`)
  against the Gram kernel and the product, with every region weighted (SCAN,
  or NAAF at a threshold below every similarity) and a tenth (NAAF);
- what a process pays to load them: importing numba and loading the kernels
  from its cache, timed inside a fresh process (the cache filled by this run).

Needs numba (the ``cpu`` extra) and a CPU that converts half floats in hardware.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

REGIONS, DEPTH = 36, 1024


def best_ms(calls: list[Callable[[], object]], rounds: int) -> list[float]:
    """Each call's best time of ``rounds``, the calls alternating within every round."""
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for number, call in enumerate(calls):
            started = time.perf_counter()
            call()
            best[number] = min(best[number], time.perf_counter() - started)
    return [1000 * seconds for seconds in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images of the similarity product")
    parser.add_argument("--words", type=int, default=12, help="words of the caption")
    parser.add_argument("--rounds", type=int, default=15, help="calls per row (the best is shown)")
    args = parser.parse_args()

    from itmrt.runtime import region_kernels as kernels
    from itmrt.runtime.fused import call_compiled
    from itmrt.runtime.one_caption import BLOCK_IMAGES, QueryCaptions, _Worker

    if not kernels.available():
        raise SystemExit("this CPU has no hardware half-float conversion: the kernels are not used here")
    rng = np.random.default_rng(0)
    regions = rng.standard_normal((args.images, REGIONS, DEPTH), dtype=np.float32)
    regions /= np.linalg.norm(regions, axis=-1, keepdims=True)
    half, single = regions.astype(np.float16), regions
    words = rng.standard_normal((args.words, DEPTH), dtype=np.float32)
    query = QueryCaptions(words, [(0, args.words)], np.array([0]), np.array([args.words]),
                          padded_tokens=kernels.padded_words(words))
    worker = _Worker()

    def product(stored: np.ndarray, kernel: Callable[..., None] | None) -> None:
        for start in range(0, len(stored), BLOCK_IMAGES):
            worker.similarities(stored[start : start + BLOCK_IMAGES], query, kernel)

    block16, block32 = half[:256], single[:256]

    def attended(stored: np.ndarray, weights: np.ndarray) -> np.ndarray:
        out = np.empty((len(stored), weights.shape[2]), dtype=np.float32)
        call_compiled(kernels.attended_norms_half, stored.view(np.uint16), weights, out)
        return out

    rows = [
        (f"similarities, {args.images} images x {args.words} words", [
            ("kernel, float16", lambda: product(half, kernels.similarities)),
            ("graph, float16", lambda: product(half, None)),
            ("graph, float32", lambda: product(single, None))]),
        (f"widen {args.images} images to float32", [
            ("to_float32", lambda: kernels.to_float32(half)),
            ("numpy astype", lambda: half.astype(np.float32))]),
        ("Gram matrices, 256 images, float16", [
            ("kernel", lambda: worker.grams(block16, kernels.gram_matrices)),
            ("graph", lambda: worker.grams(block16))]),
        ("Gram matrices, 256 images, float32", [
            ("kernel", lambda: worker.grams(block32, kernels.gram_matrices)),
            ("graph", lambda: worker.grams(block32))]),
    ]
    for share, label in ((1.0, "every region weighted"), (0.1, "a tenth weighted")):
        weights = (rng.random((256, REGIONS, args.words)) < share).astype(np.float32)
        rows.append((f"w^T G w, 256 images x {args.words} words, float16, {label}", [
            ("direct sums", lambda w=weights: attended(block16, w)),
            ("Gram kernel + product", lambda w=weights: worker.product(worker.grams(block16, kernels.gram_matrices),
                                                                       w))]))
    out = np.empty((REGIONS, REGIONS), dtype=np.float32)  # compile (or load) every kernel before timing
    call_compiled(kernels.gram_matrices, block32[:1], out[None])
    for _title, calls in rows:
        for _name, call in calls:
            call()
    gflop = 2 * args.images * REGIONS * DEPTH * args.words / 1e9
    print(f"one thread, best of {args.rounds}; the similarity product is {gflop:.2f} GFLOP")
    print("| what | side | ms | x the first side |")
    print("|---|---|---|---|")
    for title, calls in rows:
        times = best_ms([call for _name, call in calls], args.rounds)
        for (name, _call), ms in zip(calls, times):
            print(f"| {title} | {name} | {ms:.1f} | {ms / times[0]:.2f} |")
    kernel_ms = best_ms([lambda: product(half, kernels.similarities)], args.rounds)[0]
    print(f"similarity kernel: {gflop / (kernel_ms / 1000):.0f} GFLOP/s")
    loads = sorted(load_seconds() for _ in range(3))
    print(f"loading the kernels in a fresh process (numba's import, its cache): {loads[1]:.2f} s (median of 3)")


LOAD = """
import time
from itmrt.runtime.one_caption import NaafParameters, OneCaptionScorer
scorer = OneCaptionScorer(NaafParameters(0.1, 20.0, 5.0), threads=1)
started = time.perf_counter()
scorer._load_region_kernels()
assert scorer.region_kernels_loaded
print(time.perf_counter() - started)
"""


def load_seconds() -> float:
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, check=True, timeout=300)
    return float(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
