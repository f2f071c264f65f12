"""What `itmrt parity` accepts of each precision, written into the bundle by the family that exported it.

A family's exporter config (:class:`itmrt.families.export_config.ExportConfig`)
gives one :class:`DeploymentTolerance` per precision; export records them in
``manifest.json`` under ``deployment_tolerances``, so the parity report - which
runs where only the base install is, without the family's code - judges a
bundle by its own family's limits. Bundles exported before the field existed
are judged by :data:`DEFAULT_DEPLOYMENT_TOLERANCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from itmrt.bundle.names import Precision
from itmrt.bundle.record import JsonRecord, bounded

if TYPE_CHECKING:
    from itmrt.bundle.manifest import Manifest

TOLERANCE_KEYS = ("score_max_abs", "rsum_abs_delta", "top1_agreement_min", "flip_rate_max")


@dataclass(kw_only=True)
class DeploymentTolerance(JsonRecord):
    """One precision's limits: worst score error, rsum change, top-1 agreement, NAAF decision flip rate."""

    score_max_abs: float = bounded(minimum=0)
    rsum_abs_delta: float = bounded(minimum=0)
    top1_agreement_min: float = bounded(minimum=0, maximum=1)
    flip_rate_max: float = bounded(minimum=0, maximum=1)

    def as_dict(self) -> dict[str, float]:
        return {key: float(getattr(self, key)) for key in TOLERANCE_KEYS}


DEFAULT_DEPLOYMENT_TOLERANCES: dict[str, DeploymentTolerance] = {
    # fp32 graphs should equal PyTorch up to float32 rounding and kernel order.
    Precision.FP32.value: DeploymentTolerance(score_max_abs=1e-4, rsum_abs_delta=0.5, top1_agreement_min=0.99,
                                              flip_rate_max=1e-3),
    Precision.FP16.value: DeploymentTolerance(score_max_abs=1e-2, rsum_abs_delta=1.0, top1_agreement_min=0.95,
                                              flip_rate_max=1e-2),
    Precision.INT8.value: DeploymentTolerance(score_max_abs=5e-2, rsum_abs_delta=3.0, top1_agreement_min=0.85,
                                              flip_rate_max=5e-2),
}
"""The limits every built-in family used before families carried their own (and still does unless it says so)."""


def bundle_tolerances(manifest: Manifest | None) -> dict[str, dict[str, float]]:
    """Precision -> limits: the manifest's own where it records them, the defaults for the rest."""
    recorded = manifest.deployment_tolerances if manifest is not None else {}
    return {precision: (recorded.get(precision) or default).as_dict()
            for precision, default in DEFAULT_DEPLOYMENT_TOLERANCES.items()}
