"""Datasets on disk: precomputed region features, images with captions and identity labels, ``.npy`` files read
defensively, and calibration inputs per image-input kind.

Imports only numpy and the standard library, so the torch-free runtime can use
it. Retrieval metrics are :mod:`itmrt.metrics`; synthetic data generators are :mod:`itmrt.synthetic`.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "CAPTIONS_PER_IMAGE": "itmrt.data.precomp",
    "PrecompSplit": "itmrt.data.precomp",
    "read_captions": "itmrt.data.precomp",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
