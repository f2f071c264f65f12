"""One caption against a gallery, against this machine's floor measured in the same run.

    python benchmarks/bench_one_caption.py [--sizes 1000,10000,100000] [--threads 1,2] [--rounds 5]
        [--serve] [--cold-start-runs 3] [--work /tmp/itmrt-one-caption]

Model and data: a NAAF at the released sizes (region features 36 x 2048,
d = 1024, bi-GRU, word_dim 300, random weights: speed does not depend on
training; ``bench_flickr_size.prepare_bundle``), exported with ``itmrt
export``. The 1000-image gallery is made by ``itmrt``'s own indexing (random
region features through the image encoder), stored float32 and float16; the
10K and 100K galleries are synthetic (random unit-norm regions, the bundle's
shape, float16 storage, written as galleries of that bundle) - indexing 100K
images through the encoder would take an hour here. Captions: random ones of
8 to 20 tokens from Flickr30K's vocabulary, encoded by the bundle.

Per thread count, in one run:

* **floor**: the rate of one large float32 GEMM (ONNX Runtime's MLAS and torch,
  the better; ``bench_scorer.matmul_rate``) and of a read of the stored
  embeddings (the gallery's file, page-cached, copied block by block into a
  cache-sized buffer; at most 1 GB of it). One caption of m words costs
  ``2 m n d`` FLOPs and ``n d`` stored values an image; the floor is the
  larger of the two times. Both are measured again right before every timed
  caption, and each caption's time is divided by its own floor (the load of
  a shared machine drifts within seconds); the table shows the medians and
  every round's ratio;
* **one caption**: ``Runtime.score_images`` (the one-caption scorer, cached
  per-image constants) per size, ``--rounds`` captions; ``search`` is ``search_text_to_image`` end to end
  (encoding, scoring, top-10); the constants' one-time build is shown apart;
* **before**: the batched fused scorer on one caption (what answered one
  caption before this scorer), 1000 images;
* **few captions**: C captions at once, one-caption scorer against the fused
  scorer, ms per caption (where :data:`FEW_CAPTIONS` comes from), beside
  the GEMM floor per caption: a batch shares the gallery's read, never its
  words' similarity FLOPs;
* **batching bound**: a request of C captions all in (encoding, scoring the
  1000-image gallery), ms per caption for C = 1, 4 (the service's units) and
  16: how much a batch can share at most;
* **encoding**: one caption's encoding alone twice in a row (warm caches)
  and right after a one-caption scan of the 1000-image gallery (what a
  service sees); with ``--busy-core`` also while a process of this benchmark
  keeps one core busy (GEMMs and 64 MB copies through the shared L3: a loaded
  machine, on purpose, in the same run). The runtime is warmed up first, as a service's is: with two
  threads a few captions' bi-GRU directions then run side by side
  (:mod:`itmrt.runtime.gru_directions`).

``--serve``: ``bench_serve.py --galleries released --concurrency 1,16
--seconds 10 --overload-queue 0`` in its own processes. ``--cold-start-runs``:
``itmrt infer GALLERY --captions one.txt`` (1000 images) in fresh processes,
numba's cache warm, as ``bench_cold_start.py`` (a) runs it. ``--baseline
TREE``: both also for the code in TREE (``git archive COMMIT | tar -x -C
TREE``), in the same run - cold starts alternating run by run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flickr_size import prepare_bundle, write_inputs  # noqa: E402

REGIONS, D = 36, 1024


def median_ms(run: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def read_rate(embeddings: np.ndarray, limit_bytes: int = 1 << 30, block_bytes: int = 256 << 10) -> float:
    """Bytes/s of reading ``embeddings`` (page-cached; at most their first ``limit_bytes``) into a cache-sized
    buffer."""
    raw = np.asarray(embeddings).reshape(-1).view(np.uint8)[:limit_bytes]
    buffer = np.empty(block_bytes, dtype=np.uint8)
    started = time.perf_counter()
    for start in range(0, len(raw) - block_bytes + 1, block_bytes):
        np.copyto(buffer, raw[start : start + block_bytes])
    return (len(raw) // block_bytes) * block_bytes / (time.perf_counter() - started)


def synthetic_gallery(runtime: Any, folder: Path, n_images: int) -> Any:
    """A float16 gallery of ``n_images`` random unit-norm images of the bundle's shape (made once per folder)."""
    from itmrt.runtime.gallery import write_gallery

    if (folder / "gallery.json").is_file():
        return runtime.open_gallery(folder)
    rng = np.random.default_rng(n_images)
    base = rng.standard_normal((2000, REGIONS, D), dtype=np.float32)
    base = (base / np.linalg.norm(base, axis=-1, keepdims=True)).astype(np.float16)

    def fill(array: np.ndarray) -> None:
        for start in range(0, n_images, len(base)):
            stop = min(start + len(base), n_images)
            array[start:stop] = base[rng.permutation(len(base))[: stop - start]]

    details = {"backend": "ort", "precision": "fp32", "source": f"synthetic: {n_images} random unit-norm images"}
    return write_gallery(folder, runtime.bundle, fill, (n_images, REGIONS, D), details, dtype="float16")


def caption_set(runtime: Any, path: Path, count: int) -> list[Any]:
    """``count`` encoded one-caption sets, and their mean length."""
    captions = path.read_text().splitlines()[:count]
    return [runtime.encode_captions([caption]) for caption in captions]


def one_size(runtime: Any, gallery: Any, encoded: list[Any], gemm: Callable[[float], float],
             rounds: int) -> dict[str, Any]:
    """Floor, build, scoring and search times of one gallery (one caption). Every round measures the floor (the
    GEMM rate for 0.3 s, a read of the stored embeddings) right before the scoring it is compared with: the
    load of a shared machine drifts within seconds."""
    n = len(gallery)
    started = time.perf_counter()
    runtime.score_images(gallery, encoded[0])  # builds (or finds) the gallery's per-image constants
    build = time.perf_counter() - started
    rows: list[dict[str, float]] = []
    for caption in encoded[1 : rounds + 1]:
        rate, reading = gemm(0.3), read_rate(gallery.embeddings)
        m = int(caption.lengths[0])
        floor_ms = 1000 * max(2 * m * REGIONS * D * n / rate, gallery.embeddings.nbytes / reading)
        started = time.perf_counter()
        runtime.score_images(gallery, caption)
        score_ms = 1000 * (time.perf_counter() - started)
        rows.append({"words": m, "gemm_gflops": rate / 1e9, "read_gbs": reading / 1e9, "floor_ms": floor_ms,
                     "score_ms": score_ms, "ratio": score_ms / floor_ms})
    search_ms = median_ms(lambda: runtime.search_text_to_image(["a dog runs on the grass"], gallery, k=10), rounds)
    middle = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    return {"images": n, "dtype": str(gallery.embeddings.dtype), **middle, "ratios": [r["ratio"] for r in rows],
            "build_s": build, "search_ms": search_ms}


def before_and_few(runtime: Any, gallery: Any, captions: Path, rounds: int,
                   gemm: Callable[[float], float]) -> dict[str, Any]:
    """The fused scorer on one caption (before), and ms per caption for C captions both ways, beside the GEMM
    floor per caption (its words' similarity FLOPs at the large GEMM's rate, measured right before): what a batch
    of captions cannot share."""
    rows: dict[str, Any] = {}
    lines = captions.read_text().splitlines()
    fused = runtime.fused
    if fused is None:
        return rows
    fused.warm_kernels()
    embeddings = np.asarray(gallery.embeddings)
    one = runtime.encode_captions(lines[:1])
    rows["fused_one_ms"] = median_ms(lambda: fused.score_tiles(embeddings, one, 10), max(2, rounds // 2))
    for count in (1, 4, 16, 32):
        encoded = runtime.encode_captions(lines[:count])
        floor = 1000 * 2 * len(encoded.vectors) * REGIONS * D * len(embeddings) / gemm(0.3) / count
        ours = median_ms(lambda e=encoded: runtime.one_caption.score(embeddings, e, ("bench", "f32")), 3) / count
        theirs = median_ms(lambda e=encoded: fused.score_tiles(embeddings, e, 10), 2) / count
        rows[f"few_{count}"] = (ours, theirs, floor)
    return rows


def batching_bound(runtime: Any, gallery: Any, captions: Path, rounds: int) -> dict[int, float]:
    """What a service's request of C captions costs per caption, all in (encoding, then scoring the gallery),
    for C = 1 and the service's units of 4 (``--unit-captions``) and 16, the sizes measured in turn round by round:
    C=1's cost over C=4's is the most a batch of units of 4 can gain over single requests, HTTP aside."""
    lines = captions.read_text().splitlines()
    times: dict[int, list[float]] = {1: [], 4: [], 16: []}
    for number in range(rounds):
        for count in times:
            picked = lines[number * 16 : number * 16 + count]
            started = time.perf_counter()
            runtime.score_images(gallery, runtime.encode_captions(picked))
            times[count].append((time.perf_counter() - started) / count)
    return {count: 1000 * statistics.median(values) for count, values in times.items()}


def encoding_times(runtime: Any, gallery: Any, captions: Path, rounds: int) -> dict[str, float]:
    """One caption's encoding: warm (twice in a row, the second timed) and right after a gallery scan."""
    lines = captions.read_text().splitlines()[: 2 * rounds]
    warm, after_scan = [], []
    scan = runtime.encode_captions(lines[:1])
    for line in lines:
        runtime.encode_captions([line])
        started = time.perf_counter()
        runtime.encode_captions([line])
        warm.append(time.perf_counter() - started)
        runtime.score_images(gallery, scan)
        started = time.perf_counter()
        runtime.encode_captions([line])
        after_scan.append(time.perf_counter() - started)
    return {"warm_ms": 1000 * statistics.median(warm), "after_scan_ms": 1000 * statistics.median(after_scan)}


BUSY_CORE = """
import time
import numpy as np
a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
big = np.ones(64 << 20, dtype=np.uint8)
while True:  # a neighbour's work on one core: a GEMM, then a 64 MB copy through the shared L3
    a @ a
    big.copy()
    time.sleep(0)
"""


def with_busy_core(measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``measure()`` while another process keeps one core busy (GEMMs and 64 MB copies: compute and the L3)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY_CORE], env=env)
    try:
        time.sleep(1.0)  # under way
        return measure()
    finally:
        neighbour.kill()
        neighbour.wait()


def cold_start(work: Path, gallery: Path, one_caption: Path, runs: int, trees: dict[str, Path]) -> dict[str, Any]:
    """Wall seconds of ``itmrt infer GALLERY --captions one.txt`` in fresh processes (numba's cache warm), for
    each source tree of ``trees`` (this one, and the baseline's), run by run in turn."""
    import json

    walls: dict[str, list[float]] = {name: [] for name in trees}
    stages: dict[str, dict[str, float]] = {}
    for number in range(runs + 1):  # the first round fills numba's cache where a run needs the kernels
        for name, tree in trees.items():
            env = {**os.environ, "NUMBA_CACHE_DIR": str(work / f"numba-cache-{name}"), "PYTHONPATH": str(tree)}
            command = [sys.executable, "-m", "itmrt", "infer", str(gallery), "--captions", str(one_caption), "--out",
                       str(work / f"first-{name}.jsonl"), "--top-k", "10", "--timings", "--no-progress",
                       "--overwrite"]
            started = time.perf_counter()
            done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True)
            if number:
                walls[name].append(time.perf_counter() - started)
                line = next(x for x in reversed(done.stderr.splitlines()) if x.startswith("timings: "))
                stages[name] = json.loads(line[len("timings: "):])
    return {"walls": walls, "last_stages": stages}


def print_sizes(rows: list[dict[str, Any]], threads: int) -> None:
    print(f"\nthreads {threads}: one caption (median of the rounds), floor measured in the same run")
    print("| images | storage | words | GEMM GFLOP/s | read GB/s | floor ms | one caption ms | x floor (per round) "
          "| search ms | constants built once, s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
        print(f"| {r['images']} | {r['dtype']} | {r['words']:.1f} | {r['gemm_gflops']:.0f} | {r['read_gbs']:.1f} "
              f"| {r['floor_ms']:.1f} | {r['score_ms']:.1f} | {r['ratio']:.2f} ({ratios}) | {r['search_ms']:.1f} "
              f"| {r['build_s']:.2f} |")


def run_threads(args: argparse.Namespace, bundle: Path, galleries: dict[str, Path], captions: Path,
                threads: int) -> None:
    import torch

    from itmrt.runtime import load

    from bench_scorer import matmul_rate

    torch.set_num_threads(threads)  # the floor's GEMM on as many threads as the scorer
    runtime = load(bundle, threads=threads)
    runtime.warmup()  # as a service: with two threads, a few captions' bi-GRU directions run side by side
    gemm = matmul_rate(threads)
    encoded = caption_set(runtime, captions, 3 * args.rounds)
    rows = []
    for name, folder in galleries.items():
        gallery = runtime.open_gallery(folder)
        rows.append(one_size(runtime, gallery, encoded, gemm, args.rounds))
        print(f"  {name}: {rows[-1]}", flush=True)
        del gallery
    print_sizes(rows, threads)
    first = runtime.open_gallery(galleries["1000 float32"])
    extra = before_and_few(runtime, first, captions, args.rounds, gemm)
    if extra:
        print(f"before: the batched fused scorer on one caption, 1000 images: {extra['fused_one_ms']:.1f} ms")
        print("| captions at once | one-caption scorer ms/caption | fused scorer ms/caption | GEMM floor ms/caption "
              "|\n|---|---|---|---|")
        for count in (1, 4, 16, 32):
            ours, theirs, floor = extra[f"few_{count}"]
            print(f"| {count} | {ours:.1f} | {theirs:.1f} | {floor:.1f} |")
    bound = batching_bound(runtime, first, captions, max(3, args.rounds))
    print("all in (encoding + scoring 1000 float32 images), ms per caption: "
          + ", ".join(f"{count} at once {ms:.1f}" for count, ms in bound.items())
          + f"; 1 against 4 at once: {bound[1] / bound[4]:.2f}x, against 16: {bound[1] / bound[16]:.2f}x", flush=True)
    small = runtime.text_encoder.small_backend
    session = small.name if small is not None else "the runtime's session"
    for how in ("as the machine is", "one core kept busy by this benchmark") if args.busy_core else ("",):
        encoding = (with_busy_core if "busy" in how else lambda f: f())(
            lambda: encoding_times(runtime, first, captions, args.rounds))
        print(f"encoding one caption ({session}){', ' + how if how else ''}: warm {encoding['warm_ms']:.1f} ms, "
              f"right after a 1000-image scan {encoding['after_scan_ms']:.1f} ms", flush=True)
    runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "itmrt-one-caption")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--threads", default="1,2", help="thread counts of the scoring tables (empty: none)")
    parser.add_argument("--rounds", type=int, default=5, help="captions timed per size (the median is shown)")
    parser.add_argument("--serve", action="store_true", help="also bench_serve.py at concurrency 1 and 16")
    parser.add_argument("--busy-core", action="store_true", help="encoding also with one core kept busy by a "
                        "process of this benchmark (GEMMs and 64 MB copies), in the same run")
    parser.add_argument("--cold-start-runs", type=int, default=3, help="fresh `itmrt infer` runs (0: none)")
    parser.add_argument("--baseline", type=Path, help="a source tree of the code before (e.g. `git archive` of a "
                        "commit, extracted) whose cold start and service run in turn with this tree's")
    args = parser.parse_args()
    print(f"load average at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; cores {os.cpu_count()}")
    from itmrt.runtime import load

    bundle, _checkpoint, words = prepare_bundle(args.work)
    features, one_caption = write_inputs(args.work, words, 1000, 1)
    _features, captions = write_inputs(args.work, words, 1000, 200)
    runtime = load(bundle, threads=1)
    galleries: dict[str, Path] = {}
    for dtype in ("float32", "float16"):
        folder = args.work / f"gallery_1000_{dtype}"
        if not (folder / "gallery.json").is_file():
            runtime.index(np.load(features, mmap_mode="r"), folder, dtype=dtype)
        galleries[f"1000 {dtype}"] = folder
    for size in (int(s) for s in args.sizes.split(",") if int(s) > 1000):
        galleries[f"{size} float16"] = args.work / f"synthetic_{size}"
        synthetic_gallery(runtime, galleries[f"{size} float16"], size)
    runtime.close()
    for threads in (int(t) for t in args.threads.split(",") if t):
        run_threads(args, bundle, galleries, captions, threads)
    trees = {"this tree": Path(__file__).resolve().parents[1]}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    if args.cold_start_runs:
        found = cold_start(args.work, galleries["1000 float32"], one_caption, args.cold_start_runs, trees)
        for name, walls in found["walls"].items():
            print(f"time to first answer, {name} (itmrt infer, 1 caption x 1000 images, fresh processes): "
                  f"{', '.join(f'{w:.2f}' for w in walls)} s (median {statistics.median(walls):.2f} s); "
                  f"stages of the last run: {found['last_stages'][name]}", flush=True)
    if args.serve:
        for name, tree in trees.items():
            print(f"\nbench_serve.py, {name}:", flush=True)
            subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_serve.py"), "--galleries", "released",
                            "--concurrency", "1,16", "--seconds", "10", "--overload-queue", "0",
                            "--work", str(args.work / "serve")], check=True, cwd=tree,
                           env={**os.environ, "PYTHONPATH": str(tree)})
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
