"""Retrieval metrics: Recall@K, median and mean rank (the SCAN / NAAF protocol and the identity-matched one
CMPM uses), and NAAF's mismatched-word comparisons (do words the image does not hold lower the match?).

Imports only numpy and the standard library (torch-free), judged on any ``images x captions`` score matrix.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "coco_5fold_1k": "itmrt.metrics.recall",
    "format_recall_table": "itmrt.metrics.recall",
    "i2t_ranks": "itmrt.metrics.recall",
    "identity_recall_table": "itmrt.metrics.recall",
    "recall_table": "itmrt.metrics.recall",
    "t2i_ranks": "itmrt.metrics.recall",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
