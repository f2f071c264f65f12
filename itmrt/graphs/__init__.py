"""ONNX graphs of the reference models' components, built node by node from their PyTorch weights.

:mod:`~itmrt.graphs.onnx_graph` is the small builder every graph uses;
:mod:`~itmrt.graphs.image_encoders`, :mod:`~itmrt.graphs.text_encoders` and
:mod:`~itmrt.graphs.scorers` hold one builder per component of each model
family. The family specs (:mod:`itmrt.families`) pick the builders of their
family; :mod:`itmrt.export` runs them, checks and publishes the result.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "GraphBuilder": "itmrt.graphs.onnx_graph",
    "validate_model": "itmrt.graphs.onnx_graph",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
