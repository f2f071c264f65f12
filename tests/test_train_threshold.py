"""NAAF threshold learning: the closed form, the learner's released schedule, the plot."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from itmrt.train import ThresholdLearner, ThresholdRecord, optimal_threshold, plot_trajectory

MEANS_POS = (0.45, 0.6, 0.75)
STDS_POS = (0.05, 0.1, 0.2)
MEANS_NEG = (0.1, 0.3, 0.5)
STDS_NEG = (0.07, 0.15, 0.25)
ALPHAS = (0.5, 1.0, 2.0, 4.0)
GRID = list(itertools.product(MEANS_POS, STDS_POS, MEANS_NEG, STDS_NEG, ALPHAS))


def _stationary_minimum(mp: float, sp: float, mn: float, sn: float, alpha: float) -> float:
    """Where the weighted densities cross, alpha * N(t; mn, sn) = N(t; mp, sp), going upwards.

    Taking logs and multiplying by 2 sp^2 sn^2 gives a quadratic Q(t) whose sign is the
    sign of the objective's derivative; the minimum is the root where Q rises.
    """
    t = np.polynomial.Polynomial([0.0, 1.0])
    q = (
        sp**2 * (t - mn) ** 2
        - sn**2 * (t - mp) ** 2
        + 2.0 * sp**2 * sn**2 * (np.log(sn) - np.log(alpha) - np.log(sp))
    )
    rising = [
        r.real for r in q.roots() if abs(r.imag) < 1e-12 and q.deriv()(r.real) > 0
    ]
    return rising[0] if rising else math.nan


def _normal_cdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * (1.0 + erf((x - mean) / (std * math.sqrt(2.0))))


def _objective(t: np.ndarray, mp: float, sp: float, mn: float, sn: float, alpha: float) -> np.ndarray:
    return alpha * (1.0 - _normal_cdf(t, mn, sn)) + _normal_cdf(t, mp, sp)


def test_closed_form_matches_independent_root() -> None:
    solved = 0
    for mp, sp, mn, sn, alpha in GRID:
        got = optimal_threshold(mp, sp, mn, sn, alpha)
        want = _stationary_minimum(mp, sp, mn, sn, alpha)
        if math.isnan(want):
            assert math.isnan(got), (mp, sp, mn, sn, alpha, got)
            continue
        solved += 1
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (mp, sp, mn, sn, alpha)
    assert solved > len(GRID) // 2


def test_closed_form_minimises_the_misclassification_objective() -> None:
    t_grid = np.linspace(0.0, 3.0, 6001)
    step = t_grid[1] - t_grid[0]
    interior = 0
    for mp, sp, mn, sn, alpha in GRID:
        values = _objective(t_grid, mp, sp, mn, sn, alpha)
        best = int(values.argmin())
        # Interior: clearly below both ends. (With a large alpha the objective can instead
        # fall towards its limit 1 as t grows; the closed form then gives the local minimum.)
        if values[best] > min(values[0], values[-1]) - 1e-6:
            continue
        interior += 1
        t = optimal_threshold(mp, sp, mn, sn, alpha)
        assert abs(t - t_grid[best]) <= 1.5 * step, (mp, sp, mn, sn, alpha, t, t_grid[best])
        at_t = float(_objective(np.array([t]), mp, sp, mn, sn, alpha)[0])
        assert at_t <= values[best] + 1e-9
    assert interior > len(GRID) // 3


def test_closed_form_without_a_real_root_is_nan() -> None:
    # A positive set far below a wide negative set with a high penalty: alpha * f- > f+ everywhere.
    assert math.isnan(optimal_threshold(0.2, 0.05, 0.5, 0.3, alpha=50.0))
    assert math.isnan(optimal_threshold(0.5, 0.0, 0.2, 0.1))  # degenerate positive set
    assert not math.isnan(optimal_threshold(0.6, 0.1, 0.3, 0.15))


def _samples(mean: float, std: float, n: int, seed: int) -> torch.Tensor:
    """n samples whose mean and unbiased std are exactly the given values."""
    z = np.random.default_rng(seed).standard_normal(n)
    z = (z - z.mean()) / z.std(ddof=1)
    return torch.tensor(mean + std * z, dtype=torch.float32)


def _released_step(old: tuple[float, float], pos: np.ndarray, neg: np.ndarray, alpha: float) -> tuple[float, float]:
    mp, sp, mn, sn = pos.mean(), pos.std(ddof=1), neg.mean(), neg.std(ddof=1)
    t = optimal_threshold(mp, sp, mn, sn, alpha)
    new_t, new_s = (old if math.isnan(t) else (t, mp - 3 * sp))
    new_t = new_t if 0.0 <= new_t <= 1.0 else 0.0
    new_s = new_s if 0.0 <= new_s <= 1.0 else 0.0
    return 0.7 * new_t + 0.3 * old[0], 0.7 * new_s + 0.3 * old[1]


def test_update_fits_with_unbiased_std_and_smooths() -> None:
    learner = ThresholdLearner(thres=0.2, thres_safe=0.1)
    pos, neg = _samples(0.7, 0.08, 300, 1), _samples(0.3, 0.12, 300, 2)
    record = learner.update(pos, neg)
    t = optimal_threshold(0.7, 0.08, 0.3, 0.12, 2.0)
    assert 0 < t < 1
    assert learner.thres == pytest.approx(0.7 * t + 0.3 * 0.2, abs=1e-6)
    assert learner.thres_safe == pytest.approx(0.7 * (0.7 - 3 * 0.08) + 0.3 * 0.1, abs=1e-6)
    assert record.n_pos == 300 and record.step == 0
    assert record.std_pos == pytest.approx(0.08, abs=1e-6)  # ddof=0 would give 0.0799
    assert record.mean_neg == pytest.approx(0.3, abs=1e-6)
    assert learner.trajectory == [record]


def test_update_resets_values_outside_unit_interval() -> None:
    # mean - 3 std < 0: the safe threshold's new value is reset to 0 before smoothing.
    learner = ThresholdLearner(thres=0.4, thres_safe=0.3)
    learner.update(_samples(0.5, 0.2, 250, 3), _samples(0.1, 0.1, 250, 4))
    assert learner.thres_safe == pytest.approx(0.3 * 0.3, abs=1e-9)
    t = optimal_threshold(0.5, 0.2, 0.1, 0.1, 2.0)
    assert 0 < t < 1 and learner.thres == pytest.approx(0.7 * t + 0.3 * 0.4, abs=1e-6)

    # Both statistics above 1: both reset.
    learner = ThresholdLearner(thres=0.4, thres_safe=0.3)
    learner.update(_samples(1.6, 0.05, 250, 5), _samples(1.2, 0.06, 250, 6))
    assert optimal_threshold(1.6, 0.05, 1.2, 0.06) > 1
    assert learner.thres == pytest.approx(0.3 * 0.4) and learner.thres_safe == pytest.approx(0.3 * 0.3)


def test_update_without_a_root_keeps_previous_values() -> None:
    learner = ThresholdLearner(thres=0.4, thres_safe=0.3, alpha=50.0)
    learner.update(_samples(0.2, 0.05, 250, 7), _samples(0.5, 0.3, 250, 8))
    assert (learner.thres, learner.thres_safe) == pytest.approx((0.4, 0.3))


def test_update_sample_count_rule() -> None:
    learner = ThresholdLearner(thres=0.4, thres_safe=0.3)
    learner.update(_samples(0.7, 0.1, 200, 9), _samples(0.3, 0.1, 200, 10))
    assert (learner.thres, learner.thres_safe) == (0.4, 0.3)  # exactly 200: neither update nor reset
    record = learner.update(_samples(0.7, 0.1, 199, 9), _samples(0.3, 0.1, 199, 10))
    assert (learner.thres, learner.thres_safe) == (0.0, 0.0)
    assert math.isnan(record.mean_pos)
    assert [r.step for r in learner.trajectory] == [0, 1]


def _crafted_batch() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Four captions; 0, 2 and 3 rank their own image first, caption 1 ranks image 3 first."""
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],
            [0.2, 0.5, 0.0, 0.5],
            [0.1, 0.3, 0.8, 0.1],
            [0.4, 0.7, 0.5, 0.6],
        ]
    )
    # Caption c's lowest-scoring image: 2, 2, 1, 2 (caption 1 is not selected).
    lengths = [4, 3, 5, 4]
    gen = torch.Generator().manual_seed(0)
    word_max = torch.rand(4, 4, 6, generator=gen) * 0.3  # negatives: 0 .. 0.3
    for c in range(4):
        word_max[c, c] = 0.5 + 0.4 * torch.rand(6, generator=gen)  # own image: 0.5 .. 0.9
        word_max[:, c, lengths[c]:] = 100.0  # padding must never be sampled
    word_max[:, 1] = -50.0  # caption 1 must never be sampled
    return scores, word_max, lengths


def test_update_from_batch_follows_the_released_per_caption_schedule() -> None:
    scores, word_max, lengths = _crafted_batch()
    learner = ThresholdLearner(thres=0.5, thres_safe=0.45, min_samples=6)
    record = learner.update_from_batch(scores, word_max, torch.tensor(lengths))

    wm = word_max.double().numpy()
    pos = [wm[0, 0, :4], wm[2, 2, :5], wm[3, 3, :4]]
    neg = [wm[2, 0, :4], wm[1, 2, :5], wm[2, 3, :4]]
    # Captions 0 and 1 leave 4 < 6 samples: both thresholds are zeroed before any fit.
    state = (0.0, 0.0)
    state = _released_step(state, np.concatenate(pos[:2]), np.concatenate(neg[:2]), 2.0)
    state = _released_step(state, np.concatenate(pos), np.concatenate(neg), 2.0)
    assert 0.0 < state[0] < 1.0 and 0.0 < state[1] < 1.0
    assert (learner.thres, learner.thres_safe) == pytest.approx(state, abs=1e-6)
    assert record.n_pos == 13
    all_pos, all_neg = np.concatenate(pos), np.concatenate(neg)
    assert record.mean_pos == pytest.approx(all_pos.mean(), abs=1e-6)
    assert record.std_neg == pytest.approx(all_neg.std(ddof=1), abs=1e-6)


def test_update_from_batch_with_too_few_samples_ends_at_zero() -> None:
    scores, word_max, lengths = _crafted_batch()
    learner = ThresholdLearner(thres=0.5, thres_safe=0.45)  # 200 samples needed, 13 available
    record = learner.update_from_batch(scores, word_max, lengths, step=7)
    assert (learner.thres, learner.thres_safe) == (0.0, 0.0)
    assert isinstance(record, ThresholdRecord)
    assert record[:4] == (7, 0.0, 0.0, 13) and all(math.isnan(v) for v in record[4:])


def test_update_from_batch_rejects_misaligned_inputs() -> None:
    scores, word_max, lengths = _crafted_batch()
    learner = ThresholdLearner()
    with pytest.raises(ValueError):
        learner.update_from_batch(scores[:, :3], word_max, lengths)
    with pytest.raises(ValueError):
        learner.update_from_batch(scores, word_max[:3], lengths)
    with pytest.raises(ValueError):
        learner.update_from_batch(scores, word_max, lengths[:3])


def test_plot_trajectory_writes_a_readable_png(tmp_path: Path) -> None:
    import matplotlib.image

    learner = ThresholdLearner()
    for step in range(5):
        learner.update(_samples(0.6 + 0.02 * step, 0.08, 220, step), _samples(0.3, 0.1, 220, 50 + step))
    out = plot_trajectory(learner.trajectory, tmp_path / "plots" / "threshold.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in out.parent.iterdir()) == ["threshold.png"]  # no temp file left
