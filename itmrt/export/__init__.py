"""Checkpoint -> verified ONNX bundle (the torch side): load, build the family's graphs, judge parity, publish.

:mod:`~itmrt.export.bundle` runs the stages; :mod:`~itmrt.export.sample_parity`
compares ONNX Runtime with the PyTorch reference on sample inputs. The graphs
themselves come from :mod:`itmrt.graphs` through the family spec
(:mod:`itmrt.families`); what a bundle is lives in :mod:`itmrt.bundle`.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "ExportOptions": "itmrt.export.bundle",
    "LoadedModel": "itmrt.export.bundle",
    "export_bundle": "itmrt.export.bundle",
    "export_model": "itmrt.export.bundle",
    "load_model": "itmrt.export.bundle",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
