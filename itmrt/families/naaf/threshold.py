"""NAAF's learned similarity threshold (docs/models.md section 3).

During training NAAF samples, for every caption whose best-scoring image in the
batch is its own, two word-level similarities per word: ``s+`` (the word's best
region similarity with its own image) and ``s-`` (the same with the caption's
lowest-scoring image in the batch). Gaussians fitted to both sets give the
threshold that minimises ``alpha * P(s- > t) + P(s+ < t)``; the "safe" threshold
``mean(s+) - 3 std(s+)`` is what the released models score with at test time and
what export freezes.

:class:`ThresholdLearner` follows the authors' released training code step for
step (checked against CrossmodalGroup/NAAF ``model.py``, ``xattn_score``):

- captions are visited in batch order; each selected caption adds its words to
  the batch's sample sets, and *every* selected caption after the sets hold more
  than ``min_samples`` words triggers a refit over everything gathered so far
  and one smoothed update, so a batch usually makes several updates;
- after each visited caption, while the batch holds fewer than ``min_samples``
  positive words, both thresholds are set to 0 (so the first update of a batch
  smooths against 0, and a batch that never gathers enough samples ends at 0);
  exactly ``min_samples`` words neither updates nor resets;
- the standard deviations are PyTorch's default, unbiased (``ddof=1``);
- when the closed form has no real root both thresholds keep their previous
  values (the released code updates ``thres_safe`` only together with
  ``thres``); the reset to 0 outside [0, 1] and the smoothing still run.

One difference is inherent in taking a precomputed score matrix: the released
code scores each caption with the threshold as updated by the captions before
it in the same batch, while here the whole batch was scored with one value.
Statistics are computed in float64 (the released code used float32).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from itmrt.publish import atomic_write_bytes

__all__ = [
    "ThresholdLearner",
    "ThresholdRecord",
    "optimal_threshold",
    "plot_trajectory",
]


def optimal_threshold(
    mean_pos: float,
    std_pos: float,
    mean_neg: float,
    std_neg: float,
    alpha: float = 2.0,
) -> float:
    """The stationary point of ``alpha * P(s- > t) + P(s+ < t)`` for Gaussian s+ and s-.

    Evaluates docs/models.md section 3's closed form literally (including the 1e-8 in
    the logarithm and the 1e-10 in the denominator). Returns ``math.nan`` when the
    discriminant ``B^2 - 4AC`` is not positive (or not a number, e.g. for a zero
    ``std_pos``); callers then keep their previous threshold, as the released
    code does. The result is *not* clipped to [0, 1]; :class:`ThresholdLearner`
    applies the released reset rule.
    """
    mp, sp, mn, sn = float(mean_pos), float(std_pos), float(mean_neg), float(std_neg)
    a = sp * sp - sn * sn
    b = 2.0 * (mp * sn * sn - mn * sp * sp)
    ratio = sn / (alpha * sp) if alpha * sp != 0.0 else math.inf
    log_term = math.log(ratio + 1e-8) if ratio + 1e-8 > 0.0 else math.nan
    c = (mn * sp) ** 2 - (mp * sn) ** 2 + 2.0 * (sp * sn) ** 2 * log_term
    discriminant = b * b - 4.0 * a * c
    if not discriminant > 0.0:  # also catches nan
        return math.nan
    return (-b + math.sqrt(discriminant)) / (2.0 * a + 1e-10)


class ThresholdRecord(NamedTuple):
    """The learner's state after one training batch (a point of the trajectory).

    ``n_pos`` is the number of positive word samples the batch produced; the
    Gaussian statistics are those of the batch's last fit (nan when it made none).
    """

    step: int
    thres: float
    thres_safe: float
    n_pos: int
    mean_pos: float
    std_pos: float
    mean_neg: float
    std_neg: float


def _reset_outside_unit_interval(value: float) -> float:
    # The released code: `if v < 0: v = 0; if v > 1: v = 0`.
    if value < 0.0 or value > 1.0:
        return 0.0
    return value


class ThresholdLearner:
    """Learns NAAF's ``thres`` (training) and ``thres_safe`` (test) thresholds."""

    def __init__(
        self,
        thres: float = 0.0,
        thres_safe: float = 0.0,
        alpha: float = 2.0,
        min_samples: int = 200,
        momentum: float = 0.7,
    ) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.thres = float(thres)
        self.thres_safe = float(thres_safe)
        self.alpha = float(alpha)
        self.min_samples = int(min_samples)
        self.momentum = float(momentum)
        self.trajectory: list[ThresholdRecord] = []
        self._steps_seen = 0
        self._last_fit: tuple[float, float, float, float] = (math.nan,) * 4

    # -- one released update ------------------------------------------------
    def fit_and_update(self, pos_samples: Tensor, neg_samples: Tensor) -> bool:
        """Fit Gaussians to the sample sets and make one smoothed update.

        Returns whether the closed form had a root (otherwise the previous values
        are kept, still passing through the reset and smoothing as released).
        """
        pos = pos_samples.detach().reshape(-1).to(torch.float64)
        neg = neg_samples.detach().reshape(-1).to(torch.float64)
        mp, sp = pos.mean().item(), pos.std().item()  # unbiased, as torch's default
        mn, sn = neg.mean().item(), neg.std().item()
        self._last_fit = (mp, sp, mn, sn)
        old_thres, old_safe = self.thres, self.thres_safe
        t = optimal_threshold(mp, sp, mn, sn, self.alpha)
        solved = not math.isnan(t)
        new_thres = t if solved else old_thres
        new_safe = mp - 3.0 * sp if solved else old_safe
        new_thres = _reset_outside_unit_interval(new_thres)
        new_safe = _reset_outside_unit_interval(new_safe)
        m = self.momentum
        self.thres = m * new_thres + (1.0 - m) * old_thres
        self.thres_safe = m * new_safe + (1.0 - m) * old_safe
        return solved

    def _reset_if_too_few(self, n_pos: int) -> None:
        if n_pos < self.min_samples:
            self.thres = 0.0
            self.thres_safe = 0.0

    def _record(self, step: int | None, n_pos: int) -> ThresholdRecord:
        if step is None:
            step = self._steps_seen
        self._steps_seen = step + 1
        record = ThresholdRecord(step, self.thres, self.thres_safe, n_pos, *self._last_fit)
        self.trajectory.append(record)
        return record

    # -- per batch ------------------------------------------------------------
    def update(
        self, sims_pos_words: Tensor, sims_neg_words: Tensor, step: int | None = None
    ) -> ThresholdRecord:
        """One batch whose samples were gathered elsewhere: a single update.

        More than ``min_samples`` positive samples: fit and update once; fewer:
        both thresholds become 0; exactly ``min_samples``: unchanged. Use
        :meth:`update_from_batch` for the released per-caption schedule.
        """
        if sims_pos_words.numel() != sims_neg_words.numel():
            raise ValueError("sims_pos_words and sims_neg_words must hold the same number of samples")
        n_pos = int(sims_pos_words.numel())
        self._last_fit = (math.nan,) * 4
        if n_pos > self.min_samples:
            self.fit_and_update(sims_pos_words, sims_neg_words)
        self._reset_if_too_few(n_pos)
        return self._record(step, n_pos)

    def update_from_batch(
        self,
        scores: Tensor,
        word_max: Tensor,
        lengths: Tensor | Sequence[int],
        step: int | None = None,
    ) -> ThresholdRecord:
        """Update from one training batch, as the released ``xattn_score`` does.

        Args:
            scores: ``[B, B]`` image x caption scores, caption ``c`` matching image ``c``.
            word_max: ``[B, B, L]``; ``word_max[i, c, w]`` is the maximum over image
                ``i``'s regions of word ``w`` of caption ``c``'s similarity
                (raw cosine ``s_ij``, not shifted by the threshold).
            lengths: ``[B]`` real token counts of the captions (``<start>``/``<end>`` included).
            step: training step to record; defaults to one more than the last.
        """
        if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
            raise ValueError(f"scores must be a square [B, B] matrix, got shape {tuple(scores.shape)}")
        if word_max.dim() != 3 or tuple(word_max.shape[:2]) != tuple(scores.shape):
            raise ValueError(
                f"word_max must be [B, B, L] matching scores {tuple(scores.shape)}, got {tuple(word_max.shape)}"
            )
        lengths_list = [int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
        if len(lengths_list) != scores.shape[1]:
            raise ValueError(f"lengths must have {scores.shape[1]} entries, got {len(lengths_list)}")

        scores = scores.detach()
        word_max = word_max.detach()
        best_image = scores.argmax(dim=0).tolist()
        worst_image = scores.argmin(dim=0).tolist()
        pos_parts: list[Tensor] = []
        neg_parts: list[Tensor] = []
        n_pos = 0
        self._last_fit = (math.nan,) * 4
        for caption, n_words in enumerate(lengths_list):
            if best_image[caption] == caption:
                pos_parts.append(word_max[caption, caption, :n_words])
                neg_parts.append(word_max[worst_image[caption], caption, :n_words])
                n_pos += n_words
                if n_pos > self.min_samples:
                    self.fit_and_update(torch.cat(pos_parts), torch.cat(neg_parts))
            self._reset_if_too_few(n_pos)
        return self._record(step, n_pos)


def plot_trajectory(trajectory: Sequence[ThresholdRecord | Sequence[float]], path: str | Path) -> Path:
    """Draw ``thres`` and ``thres_safe`` against the training step; write a PNG atomically."""
    # The object-oriented API with an Agg canvas: no pyplot, so the caller's
    # backend and global figure state stay untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    steps = [float(r[0]) for r in trajectory]
    thres = [float(r[1]) for r in trajectory]
    thres_safe = [float(r[2]) for r in trajectory]

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, thres, label="thres (training, closed form)")
    ax.plot(steps, thres_safe, label="thres_safe (test, mean - 3 std)")
    ax.set_title("NAAF threshold learning")
    ax.set_xlabel("training step")
    ax.set_ylabel("similarity threshold")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return path
