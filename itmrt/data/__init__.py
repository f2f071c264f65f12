"""Precomputed-feature datasets, the Recall@K protocol and a synthetic dataset generator.

Imports only numpy and the standard library, so the torch-free runtime can use it.
"""

from __future__ import annotations

from itmrt.data.metrics import coco_5fold_1k, format_recall_table, i2t_ranks, recall_table, t2i_ranks
from itmrt.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit
from itmrt.data.synthetic import make_synthetic_dataset

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "PrecompSplit",
    "coco_5fold_1k",
    "format_recall_table",
    "i2t_ranks",
    "make_synthetic_dataset",
    "recall_table",
    "t2i_ranks",
]
