"""SCAN's stacked cross-attention score (docs/models.md section 4).

``t2i``: the caption's words are the queries and the image regions the context;
``i2t``: the regions are the queries and the words the context. For query items
q and context items c: ``attn = c . q`` -> ``raw_feature_norm`` over the query
axis -> softmax over the context axis scaled by ``lambda_softmax`` -> attended
context per query -> cosine(query, attended) -> aggregated over the queries by
``agg_func``.

The released code names ``l1norm_d`` for the ``l1norm`` and ``clipped_l1norm``
options without defining it (those options crash there); here they are the
L1 normalisation over the query axis, the evident intent, mirroring ``l2norm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from itmrt.bundle.names import SCAN_AGG_FUNCS, SCAN_CROSS_ATTN, SCAN_RAW_FEATURE_NORMS
from itmrt.errors import ItmrtError
from itmrt.models.ops import as_lengths, length_mask, masked_fill_min, masked_softmax, pairwise_scores_loop

CROSS_ATTN = SCAN_CROSS_ATTN
RAW_FEATURE_NORMS = SCAN_RAW_FEATURE_NORMS
AGG_FUNCS = SCAN_AGG_FUNCS

LEAKY_SLOPE = 0.1
NORM_EPS = 1e-8


def check_scan_options(cross_attn: str, raw_feature_norm: str, agg_func: str) -> None:
    """Raise :class:`ItmrtError` for an option value the released SCAN code does not know."""
    for name, value, allowed in (
        ("cross_attn", cross_attn, CROSS_ATTN),
        ("raw_feature_norm", raw_feature_norm, RAW_FEATURE_NORMS),
        ("agg_func", agg_func, AGG_FUNCS),
    ):
        if value not in allowed:
            raise ItmrtError(f"unknown SCAN {name} {value!r}: expected one of {', '.join(allowed)}")


def _raw_norm(attn: Tensor, raw_feature_norm: str, dim: int, mask: Tensor | None) -> Tensor:
    """The ``raw_feature_norm`` of ``attn`` along the query axis ``dim``; ``mask`` marks real queries.

    Masked (padded) query positions are set to 0 and take no part in the sums.
    """

    def zero_padding(x: Tensor) -> Tensor:
        return x if mask is None else torch.where(mask, x, torch.zeros_like(x))

    if raw_feature_norm == "softmax":
        if mask is None:
            return torch.softmax(attn, dim=dim)
        return masked_softmax(attn, mask, dim=dim)
    if raw_feature_norm.startswith("clipped"):
        attn = nn.functional.leaky_relu(attn, LEAKY_SLOPE)
    attn = zero_padding(attn)
    if raw_feature_norm.endswith("l2norm"):
        squares = attn.pow(2).sum(dim=dim, keepdim=True)
        # sqrt's derivative is infinite at 0 (an all-zero line, e.g. a padded word in i2t): take the root
        # of 1 there instead, so training gets finite gradients; the value (0 / eps = 0) is unchanged.
        nonzero = squares > 0
        norms = torch.where(nonzero, torch.sqrt(torch.where(nonzero, squares, torch.ones_like(squares))),
                            torch.zeros_like(squares))
        return attn / (norms + NORM_EPS)
    if raw_feature_norm.endswith("l1norm"):
        return attn / (attn.abs().sum(dim=dim, keepdim=True) + NORM_EPS)
    return attn  # "clipped" or "no_norm"


def _aggregate(row_sim: Tensor, agg_func: str, lambda_lse: float | Tensor, mask: Tensor | None) -> Tensor:
    """Aggregate ``row_sim`` over its last axis (the queries); ``mask`` marks real queries."""
    if agg_func == "Max":
        return (row_sim if mask is None else masked_fill_min(row_sim, mask)).amax(dim=-1)
    if agg_func == "LogSumExp":
        terms = torch.exp(lambda_lse * row_sim)
    else:
        terms = row_sim
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros_like(terms))
    total = terms.sum(dim=-1)
    if agg_func == "LogSumExp":
        return torch.log(total) / lambda_lse
    if agg_func == "Mean":
        count = row_sim.new_full((), row_sim.size(-1)) if mask is None else mask.to(row_sim.dtype).sum(dim=-1)
        return total / count
    return total  # "Sum"


def scan_score_one(
    image: Tensor,
    caption: Tensor,
    cross_attn: str = "t2i",
    raw_feature_norm: str = "clipped_l2norm",
    agg_func: str = "LogSumExp",
    lambda_softmax: float | Tensor = 9.0,
    lambda_lse: float | Tensor = 6.0,
) -> Tensor:
    """Score of one image ``[n, d]`` and one caption ``[m, d]`` (its real tokens only), literally."""
    check_scan_options(cross_attn, raw_feature_norm, agg_func)
    query, context = (caption, image) if cross_attn == "t2i" else (image, caption)
    attn = context @ query.t()  # [context, query]
    attn = _raw_norm(attn, raw_feature_norm, dim=1, mask=None)
    weights = torch.softmax(lambda_softmax * attn.t(), dim=1)  # [query, context]
    attended = weights @ context  # [query, d]
    products = (query * attended).sum(dim=1)
    norms = query.norm(dim=1) * attended.norm(dim=1)
    row_sim = products / norms.clamp(min=NORM_EPS)
    if agg_func == "LogSumExp":
        return torch.log(torch.exp(lambda_lse * row_sim).sum()) / lambda_lse
    if agg_func == "Max":
        return row_sim.max()
    if agg_func == "Sum":
        return row_sim.sum()
    return row_sim.mean()


def scan_scores_loop(
    images: Tensor,
    captions: Tensor,
    lengths: Tensor | Sequence[int],
    cross_attn: str = "t2i",
    raw_feature_norm: str = "clipped_l2norm",
    agg_func: str = "LogSumExp",
    lambda_softmax: float | Tensor = 9.0,
    lambda_lse: float | Tensor = 6.0,
) -> Tensor:
    """``[Bi, Bc]`` scores by calling :func:`scan_score_one` on every pair (reference only)."""
    return pairwise_scores_loop(images, captions, lengths, lambda image, caption: scan_score_one(
        image, caption, cross_attn, raw_feature_norm, agg_func, lambda_softmax, lambda_lse))


def scan_scores(
    images: Tensor,
    captions: Tensor,
    lengths: Tensor | Sequence[int],
    cross_attn: str = "t2i",
    raw_feature_norm: str = "clipped_l2norm",
    agg_func: str = "LogSumExp",
    lambda_softmax: float | Tensor = 9.0,
    lambda_lse: float | Tensor = 6.0,
) -> Tensor:
    """Scores of every image ``[Bi, n, d]`` against every caption ``[Bc, L, d]`` -> ``[Bi, Bc]``.

    Equal to :func:`scan_scores_loop` (to rounding). Padded words are zeroed and
    masked wherever the words form an axis of a normalisation, softmax or
    aggregation: the query axis in t2i (raw norm, aggregation), the context axis
    in i2t (softmax). The attended context is never materialised:
    ``q . attended = sum_c w_qc (q . c)`` and ``||attended||^2 = w^T G w`` with the
    Gram matrix G of the context items.
    """
    check_scan_options(cross_attn, raw_feature_norm, agg_func)
    num_words = captions.size(1)
    lengths_t = as_lengths(lengths, captions.device)
    token_mask = length_mask(lengths_t, num_words)  # [Bc, L]
    captions = torch.where(token_mask.unsqueeze(-1), captions, torch.zeros_like(captions))

    # word . region for every pair: [Bi, Bc, L, n].
    sims = torch.matmul(captions.unsqueeze(0), images.unsqueeze(1).transpose(-1, -2))
    if cross_attn == "t2i":
        attn = sims  # [Bi, Bc, query=L, context=n]
        query_mask: Tensor | None = token_mask.unsqueeze(0)  # [1, Bc, L]
        context_mask: Tensor | None = None
        gram = torch.matmul(images, images.transpose(-1, -2)).unsqueeze(1)  # [Bi, 1, n, n]
        query_norms = captions.norm(dim=-1).unsqueeze(0)  # [1, Bc, L]
    else:
        attn = sims.transpose(-1, -2)  # [Bi, Bc, query=n, context=L]
        query_mask = None
        context_mask = token_mask.unsqueeze(0).unsqueeze(2)  # [1, Bc, 1, L]
        gram = torch.matmul(captions, captions.transpose(-1, -2)).unsqueeze(0)  # [1, Bc, L, L]
        query_norms = images.norm(dim=-1).unsqueeze(1)  # [Bi, 1, n]

    normalised = _raw_norm(
        attn, raw_feature_norm, dim=-2, mask=None if query_mask is None else query_mask.unsqueeze(-1)
    )
    logits = lambda_softmax * normalised
    if context_mask is None:
        weights = torch.softmax(logits, dim=-1)
    else:
        weights = masked_softmax(logits, context_mask, dim=-1)
    products = (weights * attn).sum(dim=-1)  # query . attended
    attended_sq = (torch.matmul(weights, gram) * weights).sum(dim=-1)
    attended_norms = torch.sqrt(torch.clamp(attended_sq, min=0))
    row_sim = products / (query_norms * attended_norms).clamp(min=NORM_EPS)
    return _aggregate(row_sim, agg_func, lambda_lse, query_mask)


class SCANScorer(nn.Module):
    """SCAN's score as a module with its options fixed at construction."""

    def __init__(
        self,
        cross_attn: str = "t2i",
        raw_feature_norm: str = "clipped_l2norm",
        agg_func: str = "LogSumExp",
        lambda_softmax: float = 9.0,
        lambda_lse: float = 6.0,
    ) -> None:
        super().__init__()
        check_scan_options(cross_attn, raw_feature_norm, agg_func)
        self.cross_attn = cross_attn
        self.raw_feature_norm = raw_feature_norm
        self.agg_func = agg_func
        self.lambda_softmax = float(lambda_softmax)
        self.lambda_lse = float(lambda_lse)

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        return scan_scores(
            images,
            captions,
            lengths,
            self.cross_attn,
            self.raw_feature_norm,
            self.agg_func,
            self.lambda_softmax,
            self.lambda_lse,
        )

    def extra_repr(self) -> str:
        return (
            f"cross_attn={self.cross_attn}, raw_feature_norm={self.raw_feature_norm}, agg_func={self.agg_func}, "
            f"lambda_softmax={self.lambda_softmax:g}, lambda_lse={self.lambda_lse:g}"
        )
