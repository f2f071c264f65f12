"""NAAF's PyTorch reference scorers timed on CUDA with CUDA events (or on the CPU at a reduced size).

Used by ``benchmarks/gpu_acceptance.py``; also runs alone::

    python benchmarks/gpu_reference.py --images 1000 --captions 5000     # Flickr30K test size, needs CUDA

Sizes are NAAF's released ones (d = 1024, 36 regions, captions of 8 to 20
tokens; random l2-normalised embeddings: speed does not depend on training).
Two scorers compute the same ``images x captions`` matrix:

- ``loop``: the released test-time scorer step for step, one caption against
  every image at a time (``bench_scorer.released_loop_scores``);
- ``batched``: ``itmrt.families.naaf.tiled_reference.tiled_naaf_scores``, i.e.
  ``itmrt.families.naaf.model.naaf_scores`` (explicitly batched products) over tiles of
  images x captions, each tile's working memory within ``--budget-mb``.

The peak memory the batched scorer reaches beyond its inputs and result is
recorded against that budget (``memory``): on CUDA ``max_memory_allocated``
during the timed run, on the CPU the PyTorch profiler's memory events in a
separate, untimed run (``itmrt.families.naaf.tiled_reference.cpu_peak_bytes``).

Both include copying their inputs to the device and the scores back; each is
timed once after a small warm-up, with a pair of CUDA events around it
(``time.perf_counter`` on the CPU). The batched scorer then runs again with
TF32 allowed in matrix products (``torch.backends.cuda.matmul.allow_tf32``),
which shows what TF32 does to NAAF's scores at these sizes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench_scorer import INTRA, LAMBDA, REGIONS, THRESHOLD, D, make_data, released_loop_scores

FLICKR_TEST = (1000, 5000)  # images x captions of Flickr30K's test split


def timed(torch: Any, device: str, call: Callable[[], Any]) -> tuple[Any, float]:
    """``call()`` and its seconds: CUDA events on a GPU, perf_counter on the CPU."""
    if device != "cuda":
        started = time.perf_counter()
        return call(), time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    result = call()
    end.record()
    torch.cuda.synchronize()
    return result, start.elapsed_time(end) / 1e3


def padded_captions(captions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(c) for c in captions], dtype=np.int64)
    padded = np.zeros((len(captions), int(lengths.max()), captions[0].shape[1]), dtype=np.float32)
    for index, caption in enumerate(captions):
        padded[index, : len(caption)] = caption
    return padded, lengths


def batched_scores(
    torch: Any, device: str, images: np.ndarray, captions: list[np.ndarray], budget_bytes: int
) -> np.ndarray:
    """All images x captions with the batched reference, tile by tile (each tile's working memory within
    ``budget_bytes``: :func:`itmrt.families.naaf.tiled_reference.tile_sizes`)."""
    from itmrt.families.naaf.tiled_reference import tiled_naaf_scores

    padded, lengths = padded_captions(captions)
    with torch.no_grad():
        imgs = torch.from_numpy(images).to(device)
        caps = torch.from_numpy(padded).to(device)
        lens = torch.from_numpy(lengths).to(device)
        scores = tiled_naaf_scores(imgs, caps, lens, THRESHOLD, LAMBDA, INTRA, budget_bytes)
        return scores.cpu().numpy()


def memory_record(peak_bytes: int, budget_bytes: int, images: int, captions: int, words: int, how: str
                  ) -> dict[str, Any]:
    """The batched scorer's peak memory (beyond inputs and result) against its budget, with the tile it used."""
    from itmrt.families.naaf.tiled_reference import tile_sizes

    image_tile, caption_tile = tile_sizes(images, captions, words, REGIONS, D, budget_bytes)
    return {
        "budget_bytes": budget_bytes,
        "peak_bytes": peak_bytes,
        "peak_over_budget": peak_bytes / budget_bytes,
        "within_budget": peak_bytes <= budget_bytes,
        "tile": {"images": image_tile, "captions": caption_tile},
        "measured_with": how,
    }


def cpu_memory(torch: Any, images: np.ndarray, captions: list[np.ndarray], budget_bytes: int) -> dict[str, Any]:
    """Peak CPU memory of the batched scorer beyond its inputs and result (profiler memory events, untimed run)."""
    from itmrt.families.naaf.tiled_reference import cpu_peak_bytes, tiled_naaf_scores

    padded, lengths = padded_captions(captions)
    imgs, caps, lens = torch.from_numpy(images), torch.from_numpy(padded), torch.from_numpy(lengths)
    result, peak = cpu_peak_bytes(lambda: tiled_naaf_scores(imgs, caps, lens, THRESHOLD, LAMBDA, INTRA, budget_bytes))
    peak -= result.numel() * result.element_size()
    return memory_record(peak, budget_bytes, len(images), len(captions), padded.shape[1],
                         "PyTorch profiler memory events (CPU allocator), separate untimed run")


def cuda_memory(torch: Any, base_bytes: int, budget_bytes: int, images: np.ndarray, captions: list[np.ndarray]
                ) -> dict[str, Any]:
    """Peak CUDA memory of the timed batched run beyond what was allocated before it, less its inputs and result."""
    padded, lengths = padded_captions(captions)
    inputs_and_result = images.nbytes + padded.nbytes + lengths.nbytes + len(images) * len(captions) * 4
    peak = int(torch.cuda.max_memory_allocated()) - base_bytes - inputs_and_result
    return memory_record(peak, budget_bytes, len(images), len(captions), padded.shape[1],
                         "torch.cuda.max_memory_allocated during the timed run, less inputs and result")


def _tf32_flags(torch: Any, allowed: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def _agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {
        "max_abs": float(diff.max()),
        "pairs_over_1e-4": int(np.count_nonzero(diff > 1e-4)),
        "pairs": int(diff.size),
    }


def time_reference(torch: Any, device: str, n_images: int, n_captions: int, budget_bytes: int) -> dict[str, Any]:
    """Loop and batched scorers side by side (and batched with TF32 on CUDA); timings, rates, agreement."""
    warm_images, warm_captions = make_data(4, 8, seed=1)
    released_loop_scores(warm_images, warm_captions, device=device)
    batched_scores(torch, device, warm_images, warm_captions, budget_bytes)
    images, captions = make_data(n_images, n_captions)
    pairs = n_images * n_captions
    result: dict[str, Any] = {
        "device": device,
        "images": n_images,
        "captions": n_captions,
        "pairs": pairs,
        "timing": "CUDA events" if device == "cuda" else "time.perf_counter",
    }
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        _tf32_flags(torch, False)
    loop, loop_s = timed(torch, device, lambda: released_loop_scores(images, captions, device=device))
    base = 0
    if device == "cuda":
        torch.cuda.synchronize()
        base = int(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    batched, batched_s = timed(torch, device, lambda: batched_scores(torch, device, images, captions, budget_bytes))
    result["memory"] = (
        cuda_memory(torch, base, budget_bytes, images, captions)
        if device == "cuda" else cpu_memory(torch, images, captions, budget_bytes)
    )
    result["loop"] = {"seconds": loop_s, "pairs_per_s": pairs / loop_s}
    result["batched"] = {
        "seconds": batched_s,
        "pairs_per_s": pairs / batched_s,
        "speed_up_over_loop": loop_s / batched_s,
    }
    result["batched_vs_loop"] = _agreement(batched, loop)
    if device == "cuda":
        _tf32_flags(torch, True)
        tf32, tf32_s = timed(torch, device, lambda: batched_scores(torch, device, images, captions, budget_bytes))
        _tf32_flags(torch, previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]
        result["batched_tf32"] = {"seconds": tf32_s, "pairs_per_s": pairs / tf32_s, **_agreement(tf32, batched)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=FLICKR_TEST[0])
    parser.add_argument("--captions", type=int, default=FLICKR_TEST[1])
    parser.add_argument("--budget-mb", type=int, default=512, help="one tile's working memory (MB)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(time_reference(torch, device, args.images, args.captions, args.budget_mb << 20), indent=2))


if __name__ == "__main__":
    main()
