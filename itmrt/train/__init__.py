"""Training NAAF and SCAN: their trainer, the triplet loss, recipes; the families' own hooks re-exported.

NAAF's threshold learning and CMPM's losses and trainer live in their family folders
(:mod:`itmrt.families.naaf.threshold`, :mod:`itmrt.families.cmpm.losses`, :mod:`itmrt.families.cmpm.trainer`);
the training-loop skeleton both trainers run on is :mod:`itmrt.models.training_loop`.

Needs the ``train`` extra (torch; matplotlib only for :func:`plot_trajectory`).
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "cmpc_loss": "itmrt.families.cmpm.losses",
    "cmpm_loss": "itmrt.families.cmpm.losses",
    "triplet_loss": "itmrt.train.losses",
    "ThresholdLearner": "itmrt.families.naaf.threshold",
    "ThresholdRecord": "itmrt.families.naaf.threshold",
    "optimal_threshold": "itmrt.families.naaf.threshold",
    "plot_trajectory": "itmrt.families.naaf.threshold",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
