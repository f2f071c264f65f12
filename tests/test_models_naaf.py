"""NAAF score: literal one-caption definition, batched form, masking, traceability."""

from __future__ import annotations

import math

import pytest
import torch

from itmrt.families.naaf.model import NAAFScorer, naaf_score_one, naaf_scores, naaf_scores_loop
from itmrt.models.ops import l2norm

NUM_IMAGES, NUM_CAPTIONS, MAX_LEN, REGIONS, DIM = 3, 6, 7, 5, 8
LENGTHS = torch.tensor([7, 2, 5, 3, 6, 4])  # mixed, from 2 to L


def _inputs(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = l2norm(torch.randn(NUM_IMAGES, REGIONS, DIM, generator=generator, dtype=torch.float64))
    captions = l2norm(torch.randn(NUM_CAPTIONS, MAX_LEN, DIM, generator=generator, dtype=torch.float64))
    return images.to(dtype), captions.to(dtype)


def _branch_counts(images: torch.Tensor, captions: torch.Tensor, threshold: float) -> dict[str, int]:
    """How often each branch decision goes each way over the real words of every pair."""
    counts = {"pos": 0, "nopos": 0, "neg": 0, "noneg": 0, "q_differs_from_r": 0}
    for c, length in enumerate(LENGTHS.tolist()):
        caption = captions[c, :length]
        intra = torch.softmax(5.0 * caption @ caption.t(), dim=1)
        for image in images:
            r = (caption @ image.t() - threshold).max(dim=1).values
            q = intra @ r
            counts["pos"] += int((r > 0).sum())
            counts["nopos"] += int((r <= 0).sum())
            counts["neg"] += int((q < 0).sum())
            counts["noneg"] += int((q >= 0).sum())
            counts["q_differs_from_r"] += int(((q < 0) != (r < 0)).sum())
    return counts


# Thresholds chosen so that, on this data, words fall in both branches.
SPLITTING_THRESHOLDS = [0.25, 0.4, 0.55]


@pytest.mark.parametrize("threshold", SPLITTING_THRESHOLDS)
def test_test_data_exercises_both_branches(threshold: float) -> None:
    counts = _branch_counts(*_inputs(0), threshold)
    assert min(counts["pos"], counts["nopos"], counts["neg"], counts["noneg"]) > 0, counts


def test_test_data_has_words_where_propagation_changes_the_mask() -> None:
    assert sum(_branch_counts(*_inputs(0), t)["q_differs_from_r"] for t in SPLITTING_THRESHOLDS) > 0


@pytest.mark.parametrize("propagate", [True, False])
@pytest.mark.parametrize("threshold", SPLITTING_THRESHOLDS)
def test_batched_equals_loop_float32(threshold: float, propagate: bool) -> None:
    images, captions = _inputs(0)
    batched = naaf_scores(images, captions, LENGTHS, threshold, propagate=propagate)
    looped = naaf_scores_loop(images, captions, LENGTHS, threshold, propagate=propagate)
    assert batched.shape == (NUM_IMAGES, NUM_CAPTIONS)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("propagate", [True, False])
@pytest.mark.parametrize("threshold", SPLITTING_THRESHOLDS)
def test_batched_equals_loop_float64(threshold: float, propagate: bool) -> None:
    images, captions = _inputs(1, torch.float64)
    batched = naaf_scores(images, captions, LENGTHS, threshold, propagate=propagate)
    looped = naaf_scores_loop(images, captions, LENGTHS, threshold, propagate=propagate)
    assert batched.dtype == torch.float64
    torch.testing.assert_close(batched, looped, atol=1e-10, rtol=0)


def test_propagation_changes_scores() -> None:
    images, captions = _inputs(0, torch.float64)
    with_intra = naaf_scores(images, captions, LENGTHS, 0.4)
    without = naaf_scores(images, captions, LENGTHS, 0.4, propagate=False)
    assert not torch.allclose(with_intra, without)


def _spec_by_hand(image: torch.Tensor, caption: torch.Tensor, t: float, lam: float) -> float:
    """docs/models.md section 2 written out element by element in Python floats."""
    m, n = caption.shape[0], image.shape[0]
    u = caption.tolist()
    v = image.tolist()
    s = [[sum(a * b for a, b in zip(u[i], v[j])) for j in range(n)] for i in range(m)]
    a = [[s[i][j] - t for j in range(n)] for i in range(m)]
    r = [max(row) for row in a]
    total = 0.0
    for i in range(m):
        logits = [5.0 * sum(x * y for x, y in zip(u[i], u[k])) for k in range(m)]
        z = sum(math.exp(x) for x in logits)
        q = sum(math.exp(logits[k]) / z * r[k] for k in range(m))
        neg = r[i] if q < 0 else 0.0
        p = [math.exp(lam * a[i][j]) if a[i][j] > 0 else 0.0 for j in range(n)]
        w = [pj / (sum(p) + 1e-8) for pj in p]
        vhat = [sum(w[j] * v[j][k] for j in range(n)) for k in range(len(u[i]))]
        f = sum(x * y for x, y in zip(u[i], vhat)) / max(math.sqrt(sum(x * x for x in vhat)), 1e-8)
        c = [[max(s[k][j], 0.1 * s[k][j]) for j in range(n)] for k in range(m)]
        cbar = [c[i][j] / (math.sqrt(sum(c[k][j] ** 2 for k in range(m))) + 1e-8) for j in range(n)]
        zg = sum(math.exp(lam * x) for x in cbar)
        rel = sum(math.exp(lam * cbar[j]) / zg * s[i][j] for j in range(n))
        total += neg + f + rel
    return total / m


@pytest.mark.parametrize("threshold", SPLITTING_THRESHOLDS)
def test_score_one_matches_the_spec_written_by_hand(threshold: float) -> None:
    images, captions = _inputs(2, torch.float64)
    for c in (0, 1, 3):
        caption = captions[c, : int(LENGTHS[c])]
        for image in images:
            expected = _spec_by_hand(image, caption, threshold, 20.0)
            got = naaf_score_one(image, caption, threshold).item()
            assert got == pytest.approx(expected, abs=1e-12)


def test_padding_contents_and_extra_padding_never_change_scores() -> None:
    images, captions = _inputs(3)
    reference = naaf_scores(images, captions, LENGTHS, 0.4)
    generator = torch.Generator().manual_seed(9)
    extra = 4
    garbage = 10.0 * torch.randn(NUM_CAPTIONS, MAX_LEN + extra, DIM, generator=generator)
    mask = torch.arange(MAX_LEN + extra).unsqueeze(0) < LENGTHS.unsqueeze(1)
    padded = torch.where(mask.unsqueeze(-1), torch.nn.functional.pad(captions, (0, 0, 0, extra)), garbage)
    assert torch.count_nonzero(padded[1, 2:]) > 0
    torch.testing.assert_close(naaf_scores(images, padded, LENGTHS, 0.4), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        naaf_scores(images, padded, LENGTHS, 0.4, propagate=False),
        naaf_scores(images, captions, LENGTHS, 0.4, propagate=False),
        atol=1e-6,
        rtol=0,
    )


def test_captions_of_length_two() -> None:
    images, captions = _inputs(4)
    lengths = torch.full((NUM_CAPTIONS,), 2)
    for threshold in SPLITTING_THRESHOLDS:
        batched = naaf_scores(images, captions[:, :2], lengths, threshold)
        looped = naaf_scores_loop(images, captions[:, :2], lengths, threshold)
        torch.testing.assert_close(batched, looped, atol=1e-5, rtol=0)
        # Length 2 inside a longer padded batch gives the same.
        torch.testing.assert_close(naaf_scores(images, captions, lengths, threshold), batched, atol=1e-6, rtol=0)


def test_threshold_lambda_and_factor_accept_tensors() -> None:
    images, captions = _inputs(5)
    as_floats = naaf_scores(images, captions, LENGTHS, 0.4, 15.0, 4.0)
    as_tensors = naaf_scores(images, captions, LENGTHS, torch.tensor(0.4), torch.tensor(15.0), torch.tensor(4.0))
    torch.testing.assert_close(as_tensors, as_floats)
    torch.testing.assert_close(
        as_floats, naaf_scores_loop(images, captions, LENGTHS, 0.4, 15.0, 4.0), atol=1e-5, rtol=0
    )


def test_no_word_above_threshold_gives_finite_scores() -> None:
    images, captions = _inputs(6)
    scores = naaf_scores(images, captions, LENGTHS, 2.0)  # s <= 1 < t: no positive entry anywhere
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, naaf_scores_loop(images, captions, LENGTHS, 2.0), atol=1e-5, rtol=0)


def test_scorer_module_buffers_and_output() -> None:
    scorer = NAAFScorer(threshold=0.4, lambda_softmax=20.0)
    state = scorer.state_dict()
    assert set(state) == {"threshold", "lambda_softmax", "intra_factor"}
    assert all(value.dtype == torch.float32 and value.dim() == 0 for value in state.values())
    images, captions = _inputs(7)
    torch.testing.assert_close(scorer(images, captions, LENGTHS), naaf_scores(images, captions, LENGTHS, 0.4))
    images64, captions64 = _inputs(7, torch.float64)
    assert scorer(images64, captions64, LENGTHS).dtype == torch.float64


def test_traced_scorer_follows_new_lengths_and_inputs() -> None:
    """No data-dependent Python control flow: a trace stays correct for other values."""
    scorer = NAAFScorer(threshold=0.4)
    images, captions = _inputs(8)
    traced = torch.jit.trace(scorer, (images, captions, LENGTHS))
    other_images, other_captions = _inputs(9)
    other_lengths = torch.tensor([2, 7, 3, 3, 5, 6])
    torch.testing.assert_close(
        traced(other_images, other_captions, other_lengths),
        naaf_scores_loop(other_images, other_captions, other_lengths, 0.4),
        atol=1e-5,
        rtol=0,
    )


def test_gradients_are_finite() -> None:
    images, captions = _inputs(10)
    images.requires_grad_(True)
    captions.requires_grad_(True)
    naaf_scores(images, captions, LENGTHS, 0.4).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert captions.grad is not None and torch.isfinite(captions.grad).all()


@pytest.mark.parametrize("threshold", SPLITTING_THRESHOLDS)
def test_negative_branch_off_drops_exactly_the_negative_terms(threshold: float) -> None:
    """The paper's ablation at test time: same weights, neg_i = 0; batched, looped and module forms agree."""
    images, captions = _inputs(0, torch.float64)
    full = naaf_scores(images, captions, LENGTHS, threshold)
    ablated = naaf_scores(images, captions, LENGTHS, threshold, negative_branch=False)
    looped = naaf_scores_loop(images, captions, LENGTHS, threshold, negative_branch=False)
    torch.testing.assert_close(ablated, looped, atol=1e-10, rtol=0)
    negative_sum = torch.zeros_like(full)
    for c, length in enumerate(LENGTHS.tolist()):
        caption = captions[c, :length]
        intra = torch.softmax(5.0 * caption @ caption.t(), dim=1)
        for i, image in enumerate(images):
            r = (caption @ image.t() - threshold).max(dim=1).values
            negative_sum[i, c] = torch.where(intra @ r < 0, r, torch.zeros_like(r)).sum() / length
    assert (negative_sum < 0).any()
    torch.testing.assert_close(full - ablated, negative_sum, atol=1e-10, rtol=0)
    scorer = NAAFScorer(threshold, negative_branch=False).double()
    torch.testing.assert_close(scorer(images, captions, LENGTHS), ablated)
    assert "negative_branch=False" in repr(scorer) and "negative_branch" not in scorer.state_dict()


def test_only_naaf_has_a_negative_branch_to_switch_off() -> None:
    from itmrt.errors import ItmrtError
    from itmrt.families.matcher import CrossAttentionMatcher

    opt = {"vocab_size": 20, "img_dim": 8, "embed_size": 8, "word_dim": 4}
    naaf = CrossAttentionMatcher.from_opt({**opt, "thres_safe": 0.1}, "naaf")
    naaf.use_negative_branch(False)
    assert naaf.scorer.negative_branch is False
    with pytest.raises(ItmrtError, match="only NAAF has a negative branch"):
        CrossAttentionMatcher.from_opt(opt, "scan").use_negative_branch(False)
