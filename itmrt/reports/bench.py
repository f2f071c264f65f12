"""``itmrt bench``: latency and throughput per stage and end to end, per variant and batch size.

Inputs are synthetic by default (random region features shaped like the
bundle's image input, captions drawn from the bundle's vocabulary), so a
bench needs no data set. For each batch size ``B`` the stages are:

- ``tokenise``: ``B`` captions -> token ids (vocabulary lookup, truncation);
- ``text_encode``: ``B`` tokenised captions -> token embeddings;
- ``image_encode``: ``B`` images -> region embeddings;
- ``score``: one scorer call, ``B`` captions against the gallery of ``images`` images;
- ``top_k``: the best ``top_k`` images per caption of that ``images x B`` block;
- ``rank``: the runtime's scoring of ``B`` encoded captions against the gallery
  (``Runtime.rank``: tiled scoring with streaming top-k - whatever scorer path
  the runtime takes, which may differ from the plain scorer graph of ``score``);
- ``end_to_end``: ``B`` caption strings -> their top-k images from the gallery
  (the runtime's query path: tokenise, encode, tiled scoring with streaming top-k).

Each stage runs ``warmup`` untimed calls, then ``repeats`` timed ones; every
timing (seconds, ``time.perf_counter``) is kept in the report, so its
statistics can be recomputed. On native TensorRT engines each result also
has ``gpu_ms_mean``: the GPU time per call measured with CUDA events around
each engine call (:attr:`itmrt.runtime.backend_trt.TrtBackend.gpu_seconds`). Throughput is items per second of *mean*
latency. Memory: the process RSS high-water mark after each variant
(``resource.getrusage``), and per stage the peak of Python-tracked (numpy)
allocations during one extra, untimed call (``tracemalloc``).
"""

from __future__ import annotations

import resource
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.bundle.folder import read_bundle
from itmrt.bundle.names import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS, LENGTHS, BackendName, Component, Precision
from itmrt.errors import ItmrtError
from itmrt.limits import MAX_BATCH, MAX_CALLS, MAX_COUNT, is_integer, store_count
from itmrt.reports.runtime_variants import Variant, graph_files, open_variant
from itmrt.runtime.encoders import tokenize
from itmrt.runtime.tiled import top_k_of_matrix

BarFactory = Callable[[str, int], Callable[[int], None]]
STAGES = ("tokenise", "text_encode", "image_encode", "score", "top_k", "rank", "end_to_end")
GALLERY_STAGES = ("score", "top_k", "rank", "end_to_end")
PERCENTILES = (50, 90, 99)


@dataclass
class BenchOptions:
    variants: Sequence[Variant] = field(default_factory=lambda: [Variant(BackendName.ORT, Precision.FP32)])
    batch_sizes: Sequence[int] = (1, 8, 32, 128)
    captions: int = 128  # caption pool (batches cycle through it)
    images: int = 64  # gallery size for score / top_k / end_to_end
    warmup: int = 3
    repeats: int = 20
    top_k: int = 10
    threads: int = 0
    seed: int = 0
    scorer: str | None = None  # the runtime's scorer for rank / end_to_end: auto / graph / fused (None: its default)


def latency_stats(timings: Sequence[float]) -> dict[str, float]:
    """min / mean / p50 / p90 / p99 / max in milliseconds (numpy's linear-interpolation percentiles)."""
    ms = np.asarray(timings, dtype=np.float64) * 1e3
    stats = {"min": float(ms.min()), "mean": float(ms.mean())}
    stats.update({f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES})
    stats["max"] = float(ms.max())
    return stats


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def synthetic_captions(vocab: Any, count: int, rng: np.random.Generator, min_words: int = 6, max_words: int = 14,
                       max_length: int | None = None) -> list[str]:
    """Captions of random vocabulary words (special tokens left out), within the bundle's token limit."""
    words = [w for i, w in sorted(vocab.idx2word.items()) if not (w.startswith("<") and w.endswith(">"))]
    if not words:
        raise ItmrtError("the bundle's vocabulary holds no words to make benchmark captions from")
    if max_length is not None:
        max_words = max(1, min(max_words, max_length - 2))
        min_words = min(min_words, max_words)
    lengths = rng.integers(min_words, max_words + 1, size=count)
    return [" ".join(rng.choice(words, size=int(n))) for n in lengths]


def synthetic_features(runtime: Any, count: int, rng: np.random.Generator) -> np.ndarray:
    """Random non-negative inputs of the image encoder's shape (symbolic axes at their profile 'opt')."""
    shape: list[int] = [count]
    for axis in runtime.image_input_shape[1:]:
        if isinstance(axis, int):
            shape.append(axis)
        else:
            limits = runtime.bundle.shape_range(axis)
            shape.append(limits.opt if limits is not None else int(runtime.bundle.manifest.dims.get(axis, 36)))
    return np.abs(rng.standard_normal(shape)).astype(np.float32)


def time_calls(call: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        call()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return timings


def gpu_seconds(runtime: Any) -> float | None:
    """GPU time the runtime's native TensorRT engines have spent so far (CUDA events around each
    engine call; None when no backend measures it, e.g. ONNX Runtime)."""
    measured = [getattr(backend, "gpu_seconds", None) for backend in runtime.backends.values()]
    values = [float(value) for value in measured if value is not None]
    return sum(values) if values else None


def traced_peak(call: Callable[[], Any]) -> int:
    """Peak bytes of Python-tracked allocations (numpy arrays included) during one call."""
    tracemalloc.start()
    try:
        call()
        return int(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def _score_call(runtime: Any, gallery: np.ndarray, captions: Any) -> Callable[[], np.ndarray]:
    """One scorer run: the captions against the gallery (split by the engine's image limit on TensorRT)."""
    scorer = runtime.backends[Component.SCORER]
    padded, lengths = captions.padded(np.arange(len(captions)))
    step = runtime.batch_limit if runtime.backend_name == BackendName.TRT and runtime.batch_limit else len(gallery)

    def call() -> np.ndarray:
        blocks = []
        for start in range(0, len(gallery), step):
            feeds = {IMAGE_EMBEDDINGS: gallery[start : start + step], CAPTION_EMBEDDINGS: padded}
            if LENGTHS in scorer.input_names:
                feeds[LENGTHS] = lengths.astype(np.int32)
            blocks.append(scorer.run(feeds)[0])
        return np.concatenate(blocks, axis=0)

    return call


def bench_variant(
    runtime: Any, options: BenchOptions, bar: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(options.seed)
    pool = synthetic_captions(
        runtime.vocab, max(options.captions, max(options.batch_sizes)), rng, max_length=runtime.max_length
    )
    gallery_features = synthetic_features(runtime, options.images, rng)
    gallery = runtime.image_encoder.encode(gallery_features)
    results = []
    for batch in options.batch_sizes:
        captions = pool[:batch]
        ids = tokenize(runtime.vocab, captions, runtime.max_length, "truncate", lambda _m: None)
        encoded = runtime.text_encoder.encode_ids(ids)
        features = synthetic_features(runtime, batch, rng)
        score = _score_call(runtime, gallery, encoded)
        block = score()
        # The calls run within this iteration; the defaults bind this iteration's values all the same.
        calls: dict[str, Callable[[], Any]] = {
            "tokenise": lambda captions=captions: tokenize(
                runtime.vocab, captions, runtime.max_length, "truncate", lambda _m: None),
            "text_encode": lambda ids=ids: runtime.text_encoder.encode_ids(ids),
            "image_encode": lambda features=features: runtime.image_encoder.encode(features),
            "score": score,
            "top_k": lambda block=block: top_k_of_matrix(block, options.top_k),
            "rank": lambda encoded=encoded: runtime.rank(gallery, encoded, top_k=options.top_k),
            "end_to_end": lambda captions=captions: runtime.search_text_to_image(captions, gallery, k=options.top_k),
        }
        pairs = batch * options.images
        for stage in STAGES:
            time_calls(calls[stage], options.warmup, 0)
            gpu_before = gpu_seconds(runtime)
            timings = time_calls(calls[stage], 0, options.repeats)
            gpu_after = gpu_seconds(runtime)
            latency = latency_stats(timings)
            mean_s = latency["mean"] / 1e3
            throughput: dict[str, float] = {}
            if stage == "image_encode":
                throughput["images_per_s"] = batch / mean_s
            else:
                throughput["captions_per_s"] = batch / mean_s
            if stage in GALLERY_STAGES:
                throughput["pairs_per_s"] = pairs / mean_s
            results.append({
                "batch_size": int(batch),
                "stage": stage,
                "pairs_per_call": pairs if stage in GALLERY_STAGES else None,
                "timings_s": timings,
                "latency_ms": latency,
                "throughput": throughput,
                "traced_peak_bytes": traced_peak(calls[stage]),
            })
            if gpu_before is not None and gpu_after is not None:
                results[-1]["gpu_ms_mean"] = (gpu_after - gpu_before) * 1e3 / options.repeats
            if bar:
                bar(1)
    return results


def check_bench_options(options: BenchOptions) -> None:
    """Every count within the range the CLI declares, before any work: the gallery and the caption pool are made
    in memory whole, so ``images`` is bounded as a batch is (10^8 images asked for terabytes after the bundle was
    opened), and a string failed in a comparison."""
    sizes = options.batch_sizes
    if not sizes or not all(is_integer(size) and 1 <= size <= MAX_BATCH for size in sizes):
        raise ItmrtError(f"--batch-sizes must be integers from 1 to {MAX_BATCH}, e.g. 1,8,32,128")
    options.batch_sizes = [int(size) for size in sizes]  # NumPy integers are taken; the report's JSON needs ints
    for name, low, high, flag in (("images", 1, MAX_BATCH, "--images"), ("captions", 1, MAX_BATCH, "--captions"),
                                  ("warmup", 0, MAX_CALLS, "--warmup"), ("repeats", 1, MAX_CALLS, "--repeats"),
                                  ("top_k", 1, MAX_COUNT, "--top-k")):
        store_count(options, name, low, high, flag)


def run_bench(bundle: str | Path, options: BenchOptions, bar: BarFactory | None = None,
              command: list[str] | None = None) -> dict[str, Any]:
    """Measure every variant; a variant this machine or bundle cannot run is recorded as not run, with why."""
    from itmrt.reports.environment import environment
    from itmrt.reports.schema import header

    check_bench_options(options)
    info = read_bundle(bundle)
    entries = []
    for variant in options.variants:
        entry: dict[str, Any] = {"name": variant.name, "backend": variant.backend, "precision": variant.precision}
        runtime, reason = open_variant(info.path, variant, options.threads, options.scorer)
        if runtime is None:
            entry.update(status="not_run", reason=reason, results=[])
        else:
            advance = bar(f"bench {variant.name}", len(options.batch_sizes) * len(STAGES)) if bar else None
            started = time.perf_counter()
            entry.update(
                status="ok", reason=None, graph_files=graph_files(runtime),
                results=bench_variant(runtime, options, advance)
            )
            entry["seconds"] = time.perf_counter() - started
            entry["rss_peak_bytes"] = peak_rss_bytes()
        entries.append(entry)
    report = header("bench", info, command)
    report.update(
        environment=environment(options.threads),
        settings={
            "batch_sizes": [int(b) for b in options.batch_sizes], "captions": options.captions,
            "images": options.images,
            "warmup": options.warmup, "repeats": options.repeats, "top_k": options.top_k, "threads": options.threads,
            "seed": options.seed, "scorer": options.scorer or "default", "inputs": "synthetic",
            "percentiles": "numpy.percentile, linear interpolation",
        },
        variants=entries,
    )
    return report


def write_bench(report: dict[str, Any], out: str | Path, plots: bool = True) -> Path:
    from itmrt.publish import atomic_write_text
    from itmrt.reports.markdown import bench_markdown
    from itmrt.reports.schema import write_json

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if plots:
        from itmrt.reports.plots import bench_plots

        report["plots"] = bench_plots(report, folder)
    write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", bench_markdown(report))
    return folder
