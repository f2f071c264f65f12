"""Synthetic data to try and test every command on: precomputed region features with captions built around
mismatched words (:mod:`~itmrt.synthetic.region_features`, ``itmrt sample-data``) and images with captions and
identity labels for CMPM (:mod:`~itmrt.synthetic.identity_images`). Imported where used (numpy only).
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "make_synthetic_dataset": "itmrt.synthetic.region_features",
    "make_synthetic_image_dataset": "itmrt.synthetic.identity_images",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
