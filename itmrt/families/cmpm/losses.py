"""CMPM's training losses: :func:`cmpm_loss` and :func:`cmpc_loss` (docs/models.md section 5).

Both directions summed, averaged over the batch. The trainer that uses them is
:mod:`itmrt.families.cmpm.trainer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cmpc_loss", "cmpm_loss"]

CMPM_EPS = 1e-8


def _l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    # docs/models.md's l2norm: the epsilon is added after the square root.
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _check_pair(image_emb: Tensor, text_emb: Tensor, labels: Tensor) -> None:
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and text_emb must both be [B, D], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"labels must be [B] = [{image_emb.shape[0]}], got {tuple(labels.shape)}")


def _cmpm_direction(queries: Tensor, targets: Tensor, true_match: Tensor) -> Tensor:
    """``mean_i sum_j p_ij log(p_ij / (q_ij + eps) + eps)`` with p the softmax of scalar projections."""
    projections = queries @ _l2norm(targets).t()
    p = F.softmax(projections, dim=1)
    return (p * torch.log(p / (true_match + CMPM_EPS) + CMPM_EPS)).sum(dim=1).mean()


def cmpm_loss(image_emb: Tensor, text_emb: Tensor, labels: Tensor) -> Tensor:
    """Cross-modal projection matching loss, image-to-text plus text-to-image.

    ``p_ij = softmax_j(x_i . zbar_j)``, ``q_ij = 1[y_i = y_j] / sum_k 1[y_i = y_k]``,
    ``L = mean_i sum_j p_ij log(p_ij / (q_ij + 1e-8) + 1e-8)`` - docs/models.md section 5
    read literally (the paper's epsilon sits only inside the ratio; the spec adds
    it once more outside, which keeps the log finite when p underflows).
    Pairs without identities use ``labels = arange(B)``.
    """
    _check_pair(image_emb, text_emb, labels)
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)).to(image_emb.dtype)
    q = same / same.sum(dim=1, keepdim=True)  # symmetric in i, j: both directions share it
    return _cmpm_direction(image_emb, text_emb, q) + _cmpm_direction(text_emb, image_emb, q)


def cmpc_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    labels: Tensor,
    weight: Tensor,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-modal projection classification loss, both modalities summed.

    ``xhat_i = (x_i . zbar_i) zbar_i`` is classified with the norm-softmax
    classifier ``logits_ik = xhat_i . W_k / ||W_k||`` (``weight`` is ``[K, D]`` as a
    bias-free ``nn.Linear``'s); ``zhat_i = (z_i . xbar_i) xbar_i`` likewise. Each
    term is softmax cross-entropy averaged over the batch, with PyTorch's label
    smoothing (target ``(1 - eps) * onehot + eps / K``).
    """
    _check_pair(image_emb, text_emb, labels)
    if weight.dim() != 2 or weight.shape[1] != image_emb.shape[1]:
        raise ValueError(f"weight must be [num_classes, {image_emb.shape[1]}], got {tuple(weight.shape)}")
    text_dir = _l2norm(text_emb)
    image_dir = _l2norm(image_emb)
    image_on_text = (image_emb * text_dir).sum(dim=1, keepdim=True) * text_dir
    text_on_image = (text_emb * image_dir).sum(dim=1, keepdim=True) * image_dir
    class_dirs = _l2norm(weight)
    targets = labels.long()
    image_term = F.cross_entropy(image_on_text @ class_dirs.t(), targets, label_smoothing=label_smoothing)
    text_term = F.cross_entropy(text_on_image @ class_dirs.t(), targets, label_smoothing=label_smoothing)
    return image_term + text_term
