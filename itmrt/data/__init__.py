"""Datasets on disk (precomputed region features, images), the Recall@K protocol and synthetic data generators.

Imports only numpy and the standard library, so the torch-free runtime can use
it. The synthetic-data generators (:mod:`itmrt.data.synthetic`,
:mod:`itmrt.data.synthetic_images`) are imported where they are used, not here.
"""

from __future__ import annotations

from itmrt.data.metrics import coco_5fold_1k, format_recall_table, i2t_ranks, recall_table, t2i_ranks
from itmrt.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "PrecompSplit",
    "coco_5fold_1k",
    "format_recall_table",
    "i2t_ranks",
    "recall_table",
    "t2i_ranks",
]
