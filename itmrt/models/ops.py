"""Small tensor operations shared by the reference models.

Every function here is written so that ``torch.onnx`` can trace it: no
``.item()``, no Python branching on tensor values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (sqrt(sum x^2) + eps)`` along ``dim`` (the epsilon after the root, as released)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def l1norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (sum |x| + eps)`` along ``dim``."""
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def pairwise_scores_loop(images: Tensor, captions: Tensor, lengths: Tensor | Sequence[int],
                         score_one: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``[Bi, Bc]`` scores by calling ``score_one(image, caption's real tokens)`` on every pair, as the
    released evaluation does: the slow, literal reference the batched scorers are tested against."""
    lengths_list = [int(length) for length in lengths]
    scores = images.new_zeros(images.size(0), captions.size(0))
    for c, length in enumerate(lengths_list):
        caption = captions[c, :length]
        for i in range(images.size(0)):
            scores[i, c] = score_one(images[i], caption)
    return scores


def as_lengths(lengths: Tensor | Sequence[int], device: torch.device) -> Tensor:
    """Caption lengths as an int64 tensor on ``device``.

    A tensor is converted with ``.to`` (so a trace keeps it as an input, not a constant).
    """
    if isinstance(lengths, Tensor):
        return lengths.to(device=device, dtype=torch.int64)
    return torch.as_tensor(list(lengths), dtype=torch.int64, device=device)


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """Boolean ``[B, max_len]`` mask, True at the first ``lengths[b]`` positions of row b."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def masked_fill_min(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` holds, the dtype's most negative finite value elsewhere.

    A finite value (not -inf) keeps a fully masked row free of NaN in a softmax or
    max; such rows only occur at padded positions whose results are discarded.
    """
    return x.masked_fill(~mask, torch.finfo(x.dtype).min)


def masked_softmax(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax along ``dim`` over the positions where ``mask`` is True (others get weight 0)."""
    return torch.softmax(masked_fill_min(x, mask), dim=dim)
