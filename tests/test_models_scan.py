"""SCAN score: every option combination batched against the one-caption loop."""

from __future__ import annotations

import math

import pytest
import torch

from itmrt.errors import ItmrtError
from itmrt.families.scan.model import (
    AGG_FUNCS,
    CROSS_ATTN,
    RAW_FEATURE_NORMS,
    SCANScorer,
    scan_score_one,
    scan_scores,
    scan_scores_loop,
)
from itmrt.models.ops import l2norm

LENGTHS = torch.tensor([6, 2, 4, 3, 5])
MAX_LEN, REGIONS, DIM = 6, 4, 7


def _inputs(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = l2norm(torch.randn(3, REGIONS, DIM, generator=generator, dtype=torch.float64))
    captions = l2norm(torch.randn(len(LENGTHS), MAX_LEN, DIM, generator=generator, dtype=torch.float64))
    return images.to(dtype), captions.to(dtype)


def _with_garbage_padding(captions: torch.Tensor, extra: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    total = captions.size(1) + extra
    garbage = 5.0 * torch.randn(captions.size(0), total, captions.size(2), generator=generator, dtype=captions.dtype)
    mask = torch.arange(total).unsqueeze(0) < LENGTHS.unsqueeze(1)
    return torch.where(mask.unsqueeze(-1), torch.nn.functional.pad(captions, (0, 0, 0, extra)), garbage)


@pytest.mark.parametrize("agg_func", AGG_FUNCS)
@pytest.mark.parametrize("raw_feature_norm", RAW_FEATURE_NORMS)
@pytest.mark.parametrize("cross_attn", CROSS_ATTN)
def test_batched_equals_loop_and_ignores_padding(cross_attn: str, raw_feature_norm: str, agg_func: str) -> None:
    images, captions = _inputs(0)
    options = (cross_attn, raw_feature_norm, agg_func, 9.0 if cross_attn == "t2i" else 4.0, 6.0)
    looped = scan_scores_loop(images, captions, LENGTHS, *options)
    batched = scan_scores(images, captions, LENGTHS, *options)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    padded = _with_garbage_padding(captions, extra=3, seed=1)
    torch.testing.assert_close(scan_scores(images, padded, LENGTHS, *options), batched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross_attn", CROSS_ATTN)
def test_batched_equals_loop_float64(cross_attn: str) -> None:
    images, captions = _inputs(2, torch.float64)
    for raw_feature_norm in ("clipped_l2norm", "softmax", "l1norm"):
        options = (cross_attn, raw_feature_norm, "LogSumExp")
        torch.testing.assert_close(
            scan_scores(images, captions, LENGTHS, *options),
            scan_scores_loop(images, captions, LENGTHS, *options),
            atol=1e-10,
            rtol=0,
        )


def _t2i_default_by_hand(image: torch.Tensor, caption: torch.Tensor, lam: float, lam_lse: float) -> float:
    """SCAN t2i, clipped_l2norm, LogSumExp, written out in Python floats."""
    u, v = caption.tolist(), image.tolist()
    m, n = len(u), len(v)
    attn = [[sum(a * b for a, b in zip(v[j], u[i])) for i in range(m)] for j in range(n)]
    attn = [[max(x, 0.1 * x) for x in row] for row in attn]
    attn = [[x / (math.sqrt(sum(y * y for y in row)) + 1e-8) for x in row] for row in attn]
    lse = 0.0
    for i in range(m):
        z = sum(math.exp(lam * attn[j][i]) for j in range(n))
        weights = [math.exp(lam * attn[j][i]) / z for j in range(n)]
        attended = [sum(weights[j] * v[j][k] for j in range(n)) for k in range(len(u[i]))]
        dot = sum(a * b for a, b in zip(u[i], attended))
        norms = math.sqrt(sum(a * a for a in u[i])) * math.sqrt(sum(a * a for a in attended))
        lse += math.exp(lam_lse * dot / max(norms, 1e-8))
    return math.log(lse) / lam_lse


def test_score_one_matches_the_spec_written_by_hand() -> None:
    images, captions = _inputs(3, torch.float64)
    for c in (0, 1):
        caption = captions[c, : int(LENGTHS[c])]
        for image in images:
            expected = _t2i_default_by_hand(image, caption, 9.0, 6.0)
            assert scan_score_one(image, caption).item() == pytest.approx(expected, abs=1e-12)


def test_scorer_module_matches_function() -> None:
    images, captions = _inputs(4)
    scorer = SCANScorer(cross_attn="i2t", raw_feature_norm="clipped_l2norm", agg_func="Mean", lambda_softmax=4.0)
    torch.testing.assert_close(
        scorer(images, captions, LENGTHS), scan_scores(images, captions, LENGTHS, "i2t", "clipped_l2norm", "Mean", 4.0)
    )
    assert dict(scorer.state_dict()) == {}


def test_unknown_options_raise_itmrt_errors() -> None:
    with pytest.raises(ItmrtError, match="agg_func"):
        SCANScorer(agg_func="Median")
    with pytest.raises(ItmrtError, match="raw_feature_norm"):
        scan_scores(*_inputs(0), LENGTHS, raw_feature_norm="l3norm")
    with pytest.raises(ItmrtError, match="cross_attn"):
        scan_score_one(torch.zeros(2, 3), torch.zeros(2, 3), cross_attn="both")


@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
@pytest.mark.parametrize("raw_feature_norm", ["clipped_l2norm", "l2norm"])
def test_gradients_are_finite_with_padded_captions(cross_attn: str, raw_feature_norm: str) -> None:
    """Training through the batched scorer: padded words (all-zero lines) must not turn gradients into NaN."""
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(3, 6, 8), dim=-1).requires_grad_(True)
    captions = torch.nn.functional.normalize(torch.randn(4, 5, 8), dim=-1).requires_grad_(True)
    scores = scan_scores(images, captions, torch.tensor([5, 3, 4, 2]), cross_attn=cross_attn,
                         raw_feature_norm=raw_feature_norm, lambda_softmax=4.0)
    scores.sum().backward()
    assert images.grad is not None and captions.grad is not None
    assert torch.isfinite(images.grad).all() and torch.isfinite(captions.grad).all()
