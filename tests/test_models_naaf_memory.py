"""The tiled NAAF reference keeps its memory budget: its peak, measured with the PyTorch profiler's
memory events on the CPU, stays within twice the budget, and its scores equal the untiled ones."""

from __future__ import annotations

import pytest
import torch

from itmrt.families.naaf.model import TILE_WORKING_TENSORS, naaf_scores
from itmrt.families.naaf.tiled_reference import cpu_peak_bytes, tile_sizes, tiled_naaf_scores

THRESHOLD, LAMBDA, INTRA = 0.05, 20.0, 5.0


def _data(images: int, captions: int, words: int, regions: int, dim: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(3)
    imgs = torch.nn.functional.normalize(torch.randn(images, regions, dim, generator=generator), dim=-1)
    caps = torch.nn.functional.normalize(torch.randn(captions, words, dim, generator=generator), dim=-1)
    lengths = torch.randint(2, words + 1, (captions,), generator=generator)
    lengths[0] = words
    return imgs, caps, lengths


def test_the_measurement_sees_an_allocation_and_its_free() -> None:
    def allocate() -> float:
        block = torch.ones(4 << 20, dtype=torch.float32)  # 16 MiB
        return float(block[-1])

    _, peak = cpu_peak_bytes(allocate)
    assert 16 << 20 <= peak < 17 << 20


def test_a_broadcast_4d_matmul_is_what_the_measurement_catches() -> None:
    """The form the reference used to take: two broadcast 4-D operands, both expanded and copied."""
    captions, images = torch.randn(1, 16, 20, 256), torch.randn(32, 1, 256, 36)
    result, peak = cpu_peak_bytes(lambda: torch.matmul(captions, images))
    assert peak > 10 * result.numel() * 4


@pytest.mark.parametrize(("budget_mb", "dim"), [(2, 256), (4, 1024), (16, 1024)])
def test_tiled_reference_peak_is_within_twice_its_budget(budget_mb: int, dim: int) -> None:
    imgs, caps, lengths = _data(48, 40, 20, 36, dim)
    budget = budget_mb << 20
    image_tile, caption_tile = tile_sizes(48, 40, 20, 36, dim, budget)
    assert (image_tile * 20 * 36 * TILE_WORKING_TENSORS + 20 * dim) * caption_tile * 4 <= budget
    assert image_tile * caption_tile < 48 * 40  # the budget really splits the work into tiles
    tiled_naaf_scores(imgs[:2], caps[:2], lengths[:2], THRESHOLD, LAMBDA, INTRA, budget)  # warm-up
    scores, peak = cpu_peak_bytes(lambda: tiled_naaf_scores(imgs, caps, lengths, THRESHOLD, LAMBDA, INTRA, budget))
    assert peak <= 2 * budget, f"peak {peak / 2**20:.1f} MiB for a budget of {budget_mb} MiB"
    with torch.no_grad():
        whole = naaf_scores(imgs, caps, lengths, THRESHOLD, LAMBDA, INTRA)
    torch.testing.assert_close(scores, whole, atol=1e-5, rtol=0)


def test_tile_sizes_fill_captions_then_images() -> None:
    per_pair = TILE_WORKING_TENSORS * 20 * 36 * 4
    captions_bytes = 256 * 20 * 1024 * 4
    assert tile_sizes(1000, 5000, 20, 36, 1024, 512 << 20) == (((512 << 20) - captions_bytes) // (per_pair * 256), 256)
    assert tile_sizes(10, 10, 20, 36, 1024, 1 << 40) == (10, 10)
    assert tile_sizes(10, 10, 20, 36, 1024, 1) == (1, 1)  # below one pair: one pair at a time
    assert tile_sizes(10, 300, 20, 36, 1024, 8 << 20)[1] < 256  # the captions' copy counts too
    with pytest.raises(ValueError):
        tile_sizes(0, 10, 20, 36, 1024, 1 << 20)
