"""Datasets on disk (precomputed region features, images), the Recall@K protocol and synthetic data generators.

Imports only numpy and the standard library, so the torch-free runtime can use
it. Names are re-exported lazily: the runtime, which reads feature files, does
not load the synthetic-data generators.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "CAPTIONS_PER_IMAGE": "itmrt.data.precomp",
    "PrecompSplit": "itmrt.data.precomp",
    "coco_5fold_1k": "itmrt.data.metrics",
    "format_recall_table": "itmrt.data.metrics",
    "i2t_ranks": "itmrt.data.metrics",
    "recall_table": "itmrt.data.metrics",
    "t2i_ranks": "itmrt.data.metrics",
    "make_synthetic_dataset": "itmrt.data.synthetic",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("itmrt.data", _EXPORTS)
