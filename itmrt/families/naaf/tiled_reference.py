"""NAAF's batched reference over tiles of images x captions, each tile within a memory budget.

:func:`itmrt.families.naaf.model.naaf_scores` scores a whole ``[Bi, Bc]`` block at once
and holds about :data:`~itmrt.families.naaf.model.TILE_WORKING_TENSORS` float tensors of
the ``[Bi, Bc, L, n]`` tile at its peak (its products are explicitly batched:
nothing is expanded). :func:`tile_sizes` picks the largest tile whose *working
memory* - that many tile tensors and one copy of the tile's captions - fits
``budget_bytes``;
:func:`tiled_naaf_scores` scores every pair tile by tile into one matrix. The
budget is therefore what scoring holds at once beyond its inputs and its
result, on the CPU or the GPU alike: ``benchmarks/gpu_reference.py`` records
the peak it reaches (CUDA's ``max_memory_allocated``, or :func:`cpu_peak_bytes`)
against it, and ``tests/test_models_naaf_memory.py`` asserts it stays within
twice the budget.

:func:`cpu_peak_bytes` reads the allocations and frees of the CPU allocator
from the PyTorch profiler (``profile_memory=True``: one ``[memory]`` event per
allocation or free, with its size and time - the records the profiler's own
memory columns are computed from) and returns the largest total alive at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from itmrt.families.naaf.model import TILE_WORKING_TENSORS, Scalar, naaf_scores

CAPTION_TILE = 256  # captions per tile at most (a tile's images then fill the budget)
FLOAT_BYTES = 4
T = TypeVar("T")


def tile_sizes(
    num_images: int, num_captions: int, words: int, regions: int, dim: int, budget_bytes: int,
    caption_tile: int = CAPTION_TILE,
) -> tuple[int, int]:
    """``(images, captions)`` per tile: the most pairs whose working memory fits ``budget_bytes``.

    A tile of ``Bi`` images and ``Bc`` captions holds ``TILE_WORKING_TENSORS * Bi * Bc * words * regions``
    floats and one masked copy of its captions, ``Bc * words * dim`` floats. Captions first (up to
    ``caption_tile``, as many as fit beside one image), then as many images as the budget leaves. A budget
    below one pair's working memory still scores one pair at a time (and will exceed it).
    """
    if min(num_images, num_captions, words, regions, dim) < 1 or budget_bytes < 1:
        raise ValueError("tile_sizes needs positive sizes and budget")
    per_pair = TILE_WORKING_TENSORS * words * regions * FLOAT_BYTES
    per_caption = words * dim * FLOAT_BYTES
    captions = max(1, min(num_captions, caption_tile, budget_bytes // (per_pair + per_caption)))
    images = max(1, min(num_images, (budget_bytes - captions * per_caption) // (per_pair * captions)))
    return images, captions


def tiled_naaf_scores(
    images: Tensor,
    captions: Tensor,
    lengths: Tensor,
    threshold: Scalar,
    lambda_softmax: Scalar,
    intra_factor: Scalar,
    budget_bytes: int,
) -> Tensor:
    """``[Bi, Bc]`` scores of ``images`` ``[Bi, n, d]`` against padded ``captions`` ``[Bc, L, d]``
    (``lengths`` ``[Bc]``), tile by tile (:func:`tile_sizes`); no autograd. Each caption tile is cut to
    its own longest caption."""
    num_images, regions, dim = images.shape
    num_captions = captions.shape[0]
    image_tile, caption_tile = tile_sizes(num_images, num_captions, captions.shape[1], regions, dim, budget_bytes)
    with torch.no_grad():
        out = torch.empty((num_images, num_captions), dtype=images.dtype, device=images.device)
        for c0 in range(0, num_captions, caption_tile):
            c1 = min(c0 + caption_tile, num_captions)
            words = int(lengths[c0:c1].max())
            for i0 in range(0, num_images, image_tile):
                i1 = min(i0 + image_tile, num_images)
                out[i0:i1, c0:c1] = naaf_scores(
                    images[i0:i1], captions[c0:c1, :words], lengths[c0:c1], threshold, lambda_softmax, intra_factor
                )
        return out


def cpu_peak_bytes(call: Callable[[], T]) -> tuple[T, int]:
    """``call()`` and the most bytes the CPU allocator held at once while it ran (beyond what it held
    before), from the PyTorch profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        result = call()
    events = _memory_events(recorded)
    live = peak = 0
    for _start, size in sorted(events):
        live += size
        peak = max(peak, live)
    return result, peak


def _memory_events(recorded: Any) -> list[tuple[int, int]]:
    """``(start_ns, bytes)`` of every CPU allocation (positive) and free (negative) the profiler saw."""
    results = getattr(recorded.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("this PyTorch's profiler keeps no memory events (profiler.kineto_results)")
    return [
        (int(event.start_ns()), int(event.nbytes()))
        for event in results.events()
        if event.name() == "[memory]" and str(event.device_type()).endswith("CPU")
    ]
