"""The loss NAAF and SCAN train with.

:func:`triplet_loss`: the hardest-negative hinge loss (docs/models.md section 3),
reduced by a sum over the batch as the released ``ContrastiveLoss`` does.
CMPM's losses are in its family's folder (:mod:`itmrt.families.cmpm.losses`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["triplet_loss"]


def triplet_loss(scores: Tensor, margin: float = 0.2, max_violation: bool = True) -> Tensor:
    """Bidirectional hinge loss on a ``[B, B]`` image x caption score matrix.

    Pair ``(i, i)`` matches. For image ``i`` every caption ``j != i`` costs
    ``[margin + S[i, j] - S[i, i]]_+``; for caption ``j`` every image ``i != j``
    costs ``[margin + S[i, j] - S[j, j]]_+``. With ``max_violation`` only the
    hardest negative per query counts (VSE++); otherwise all of them. The result
    is the sum over queries of both directions (not a mean), as in SCAN/NAAF.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square [B, B] matrix, got shape {tuple(scores.shape)}")
    positives = scores.diagonal()
    cost_caption = (margin + scores - positives.unsqueeze(1)).clamp(min=0)  # per image (row)
    cost_image = (margin + scores - positives.unsqueeze(0)).clamp(min=0)  # per caption (column)
    is_positive = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption = cost_caption.masked_fill(is_positive, 0.0)
    cost_image = cost_image.masked_fill(is_positive, 0.0)
    if max_violation:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()
