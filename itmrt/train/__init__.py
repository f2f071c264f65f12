"""Training-side pieces: the seed models' losses and NAAF's threshold learning.

Needs the ``train`` extra (torch; matplotlib only for :func:`plot_trajectory`).
"""

from __future__ import annotations

from itmrt.train.losses import cmpc_loss, cmpm_loss, triplet_loss
from itmrt.train.threshold import (
    ThresholdLearner,
    ThresholdRecord,
    optimal_threshold,
    plot_trajectory,
)

__all__ = [
    "ThresholdLearner",
    "ThresholdRecord",
    "cmpc_loss",
    "cmpm_loss",
    "optimal_threshold",
    "plot_trajectory",
    "triplet_loss",
]
