"""The torch-side pieces the families share: layers, encoders, native checkpoints, evaluation.

Loading a checkpoint of any family is :func:`itmrt.families.checkpoints.load_checkpoint`
(the family registry rebuilds each model). A family's own reference model lives
in its folder (NAAF: :mod:`itmrt.families.naaf.model`); the cross-attention
matcher NAAF and SCAN share and the released checkpoint format are
:mod:`itmrt.families.matcher` and :mod:`itmrt.families.released`.

Names are re-exported lazily so ``import itmrt.models`` stays cheap and the
submodules can import each other without cycles.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "CMPMModel": "itmrt.families.cmpm.model",
    "MobileNetV1": "itmrt.families.cmpm.model",
    "save_native": "itmrt.models.native",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
