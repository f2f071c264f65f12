"""ONNX graphs built node by node from PyTorch weights: the builder and the pieces families share.

:mod:`~itmrt.graphs.onnx_graph` is the small builder every graph uses;
:mod:`~itmrt.graphs.image_encoders` and :mod:`~itmrt.graphs.text_encoders` hold
the region and GRU encoders NAAF and SCAN share (and the recurrent pieces CMPM's
LSTM uses), :mod:`~itmrt.graphs.scorers` the cross-attention scorer pieces. A
family's own builders live in its folder (``itmrt/families/<name>/graphs.py``);
:mod:`itmrt.export` runs them, checks and publishes the result.
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
