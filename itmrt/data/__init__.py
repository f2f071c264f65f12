"""Datasets on disk (precomputed region features, images), the Recall@K protocol and synthetic data generators.

Imports only numpy and the standard library, so the torch-free runtime can use
it. The synthetic-data generators (:mod:`itmrt.data.synthetic`,
:mod:`itmrt.data.synthetic_images`) are imported where they are used, not here.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "coco_5fold_1k": "itmrt.data.metrics",
    "format_recall_table": "itmrt.data.metrics",
    "i2t_ranks": "itmrt.data.metrics",
    "recall_table": "itmrt.data.metrics",
    "t2i_ranks": "itmrt.data.metrics",
    "CAPTIONS_PER_IMAGE": "itmrt.data.precomp",
    "PrecompSplit": "itmrt.data.precomp",
    "read_captions": "itmrt.data.precomp",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
