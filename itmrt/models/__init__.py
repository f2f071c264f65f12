"""PyTorch reference models (NAAF, SCAN, CMPM) and checkpoint import/export.

Loading a checkpoint of any family is :func:`itmrt.families.checkpoints.load_checkpoint`
(the family registry rebuilds each model); this package holds the models and
the released and native file formats.

Names are re-exported lazily so ``import itmrt.models`` stays cheap and the
submodules can import each other without cycles.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "CMPMModel": "itmrt.models.cmpm",
    "MobileNetV1": "itmrt.models.cmpm",
    "CrossAttentionMatcher": "itmrt.models.matcher",
    "checkpoint_sha256": "itmrt.models.checkpoint",
    "load_released_checkpoint": "itmrt.models.checkpoint",
    "matcher_from_opt": "itmrt.models.checkpoint",
    "save_native": "itmrt.models.checkpoint",
    "save_released_checkpoint": "itmrt.models.checkpoint",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
