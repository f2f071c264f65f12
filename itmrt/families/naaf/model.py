"""NAAF's image-caption score (docs/models.md section 2).

Three forms of the same definition:

- :func:`naaf_score_one` - the literal one-caption arithmetic of the released
  scoring function (raw ``exp``, ``p / (sum p + 1e-8)``, explicit ``vhat``);
- :func:`naaf_scores_loop` - that function looped over every image and caption
  (the reference the batched form is tested against);
- :func:`naaf_scores` - all images x all captions in one traceable call, with
  padded caption tokens masked out and numerically safer arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from itmrt.models.ops import as_lengths, length_mask, masked_softmax, pairwise_scores_loop

Scalar = float | Tensor

# Constants of the released code.
LEAKY_SLOPE = 0.1
NORM_EPS = 1e-8


def naaf_score_one(
    image: Tensor,
    caption: Tensor,
    threshold: Scalar,
    lambda_softmax: Scalar = 20.0,
    intra_factor: Scalar = 5.0,
    propagate: bool = True,
    negative_branch: bool = True,
) -> Tensor:
    """Score of one image ``[n, d]`` and one caption ``[m, d]`` (its real tokens only).

    ``propagate=False`` gives the training-time score (negative mask straight
    from ``r < 0``, no intra-caption propagation). ``negative_branch=False`` is
    the paper's ablation at test time: the same weights, every ``neg_i`` set to 0.
    """
    sims = caption @ image.t()  # s_ij, [m, n]
    shifted = sims - threshold  # a_ij

    # Step 3: negative branch.
    row_max = shifted.max(dim=1).values  # r_i
    if propagate:
        intra = torch.softmax(intra_factor * (caption @ caption.t()), dim=1)  # W_il
        decision = intra @ row_max  # q_i
    else:
        decision = row_max
    negative = row_max * (decision < 0).to(row_max.dtype)
    if not negative_branch:
        negative = torch.zeros_like(negative)

    # Step 4: aggregated-feature part, released arithmetic (raw exp of a masked fill).
    raw = torch.exp(shifted.masked_fill(shifted <= 0, -1e9) * lambda_softmax)
    weights = raw / (raw.abs().sum(dim=1, keepdim=True) + NORM_EPS)
    attended = weights @ image  # vhat_i, [m, d]
    aggregated = (caption * attended).sum(dim=1) / attended.norm(dim=1).clamp(min=NORM_EPS)

    # Step 5: relevance part.
    clipped = nn.functional.leaky_relu(sims, LEAKY_SLOPE)
    normalised = clipped / (clipped.pow(2).sum(dim=0, keepdim=True).sqrt() + NORM_EPS)
    relevance_weights = torch.softmax(lambda_softmax * normalised, dim=1)
    relevance = (relevance_weights * sims).sum(dim=1)

    # Step 6.
    return (negative + aggregated + relevance).mean()


def naaf_scores_loop(
    images: Tensor,
    captions: Tensor,
    lengths: Tensor | Sequence[int],
    threshold: Scalar,
    lambda_softmax: Scalar = 20.0,
    intra_factor: Scalar = 5.0,
    propagate: bool = True,
    negative_branch: bool = True,
) -> Tensor:
    """``[Bi, Bc]`` scores by calling :func:`naaf_score_one` on every pair (reference only)."""
    return pairwise_scores_loop(images, captions, lengths, lambda image, caption: naaf_score_one(
        image, caption, threshold, lambda_softmax, intra_factor, propagate, negative_branch))


def naaf_scores(
    images: Tensor,
    captions: Tensor,
    lengths: Tensor | Sequence[int],
    threshold: Scalar,
    lambda_softmax: Scalar = 20.0,
    intra_factor: Scalar = 5.0,
    propagate: bool = True,
    negative_branch: bool = True,
) -> Tensor:
    """Scores of every image ``[Bi, n, d]`` against every caption ``[Bc, L, d]`` -> ``[Bi, Bc]``.

    Equal to :func:`naaf_scores_loop` (to rounding); ``negative_branch=False``
    drops step 3's term (the paper's ablation). Padded caption positions
    (at and after ``lengths[c]``) are zeroed first and excluded from the intra-
    caption softmax, the word-axis norm of step 5 and the mean of step 6, so
    whatever they hold never changes a score.

    Step 4 is computed as a max-shifted masked softmax. With ``r_i = max_j a_ij``
    (the largest positive entry whenever word i has one) and
    ``e_ij = exp(lambda * (a_ij - r_i))`` on the positive entries (0 elsewhere),
    the released ``p_ij / (sum_j p_ij + 1e-8)`` with ``p_ij = exp(lambda * a_ij)``
    is, after dividing numerator and denominator by ``exp(lambda * r_i)``,
    exactly ``e_ij / (sum_j e_ij + 1e-8 * exp(-lambda * r_i))``. Every ``e_ij`` is
    in (0, 1] and the epsilon term is at most 1e-8, so nothing overflows (float16
    included). A word with no positive entry gets w = 0 and f = 0 (what the
    released code gives); it is selected with ``where`` so that the epsilon
    underflowing in float16 cannot produce 0/0, and ``r`` is clamped at 0 inside
    the epsilon term so that the unused branch cannot overflow either.

    ``vhat`` is never materialised: ``u_i . vhat_i = sum_j w_ij s_ij`` and
    ``||vhat_i||^2 = w_i^T G w_i`` with the per-image Gram matrix ``G = V V^T``.

    Every product is explicitly batched on materialised 2-D or 3-D operands
    (:func:`_similarities`, :func:`_vhat_norm_sq`, :func:`_negative_term`): a
    ``torch.matmul`` of two broadcast 4-D tensors expands and copies *both*
    operands (ATen's ``_matmul_impl`` reshapes the expanded views into
    batched matrices), which made a 64 x 32 tile allocate 448 MB for a 5.6 MB
    result. Tile-sized intermediates are dropped as soon as they are used, so
    at most about :data:`TILE_WORKING_TENSORS` float tensors of the
    ``[Bi, Bc, L, n]`` tile are alive at once (without autograd):
    memory is O(Bi * Bc * L * n).
    """
    num_words = captions.size(1)
    lengths_t = as_lengths(lengths, captions.device)
    token_mask = length_mask(lengths_t, num_words)  # [Bc, L]
    captions = torch.where(token_mask.unsqueeze(-1), captions, 0.0)  # one copy of the captions
    mask = token_mask.unsqueeze(0)  # [1, Bc, L], broadcasts over images

    # Step 1-2: s, [Bi, Bc, L, n], and r = max_j (s_ij - t).
    sims = _similarities(images, captions)
    row_max = (sims - threshold).amax(dim=-1)  # r, [Bi, Bc, L]
    row_max = torch.where(mask, row_max, torch.zeros_like(row_max))

    # Step 3: negative branch with intra-caption propagation.
    negative = _negative_term(captions, token_mask, row_max, intra_factor, propagate, negative_branch)

    # Step 4: aggregated-feature part (max-shifted masked softmax over the positive entries).
    aggregated = _aggregated_term(images, sims, row_max, threshold, lambda_softmax)

    # Step 5: relevance part, norm over the caption's real words only.
    relevance = _relevance_term(sims, mask, lambda_softmax)

    # Step 6: mean over the real words.
    per_word = torch.where(mask, negative + aggregated + relevance, torch.zeros_like(relevance))
    return per_word.sum(dim=-1) / lengths_t.to(per_word.dtype).unsqueeze(0)


TILE_WORKING_TENSORS = 6
"""Tile-sized (``[Bi, Bc, L, n]`` float) tensors :func:`naaf_scores` holds at once at its peak, temporaries
included, without autograd: the similarities, and in step 4 the shifted similarities, two operands of the
exponential and its masked result (``tests/test_models_naaf_memory.py`` measures the peak against it).
Beside them it holds one masked copy of the captions, ``[Bc, L, d]``."""


def _similarities(images: Tensor, captions: Tensor) -> Tensor:
    """``s`` ``[Bi, Bc, L, n]``: one 2-D product ``[Bc*L, d] x [d, Bi*n]``, returned as a permuted view of its
    result (no operand is expanded or copied)."""
    num_images, regions, dim = images.shape
    num_captions, num_words, _ = captions.shape
    flat = torch.mm(captions.reshape(num_captions * num_words, dim), images.reshape(num_images * regions, dim).t())
    return flat.view(num_captions, num_words, num_images, regions).permute(2, 0, 1, 3)


def _aggregated_term(images: Tensor, sims: Tensor, row_max: Tensor, threshold: Scalar,
                     lambda_softmax: Scalar) -> Tensor:
    """Step 4, ``f`` ``[Bi, Bc, L]``, with the two identities (``vhat`` never materialised)."""
    has_positive = row_max > 0
    shifted = sims - threshold
    exps = torch.where(shifted > 0, torch.exp(lambda_softmax * (shifted - row_max.unsqueeze(-1))), 0.0)
    del shifted
    eps_term = NORM_EPS * torch.exp(-lambda_softmax * torch.clamp(row_max, min=0))
    denominator = torch.where(has_positive, exps.sum(dim=-1) + eps_term, torch.ones_like(row_max))
    weights = exps / denominator.unsqueeze(-1)  # w, [Bi, Bc, L, n]
    del exps
    dot = (weights * sims).sum(dim=-1)  # u . vhat
    norm_sq = _vhat_norm_sq(images, weights)  # ||vhat||^2
    vhat_norm = torch.sqrt(torch.clamp(norm_sq, min=NORM_EPS * NORM_EPS))  # = max(||vhat||, 1e-8)
    return torch.where(has_positive, dot / vhat_norm, torch.zeros_like(dot))


def _vhat_norm_sq(images: Tensor, weights: Tensor) -> Tensor:
    """``w_i^T G w_i`` for every image, caption and word: one ``bmm`` per image batch of ``[Bc*L, n] x [n, n]``
    with ``G = V V^T`` (``[Bi, n, n]``, itself a ``bmm``)."""
    num_images, num_captions, num_words, regions = weights.shape
    gram = torch.bmm(images, images.transpose(1, 2))  # [Bi, n, n]
    flat = weights.flatten(1, 2)  # [Bi, Bc*L, n]: a view for the layouts the elementwise steps produce
    weighted = torch.bmm(flat, gram).view(num_images, num_captions, num_words, regions)
    return (weighted * weights).sum(dim=-1)


def _relevance_term(sims: Tensor, mask: Tensor, lambda_softmax: Scalar) -> Tensor:
    """Step 5, ``rel`` ``[Bi, Bc, L]``: LeakyReLU'd similarities normalised over the real words, softmax over
    the regions, weights applied to the raw similarities."""
    clipped = torch.where(mask.unsqueeze(-1), nn.functional.leaky_relu(sims, LEAKY_SLOPE), 0.0)
    normalised = clipped / (clipped.pow(2).sum(dim=-2, keepdim=True).sqrt() + NORM_EPS)
    del clipped
    relevance_weights = torch.softmax(lambda_softmax * normalised, dim=-1)
    del normalised
    return (relevance_weights * sims).sum(dim=-1)


def _negative_term(
    captions: Tensor, token_mask: Tensor, row_max: Tensor, intra_factor: Scalar, propagate: bool, negative_branch: bool
) -> Tensor:
    """Step 3: ``r_i`` where the (propagated) decision ``q_i < 0``, else 0; all 0 without the negative branch."""
    if not negative_branch:
        return torch.zeros_like(row_max)
    if propagate:
        word_logits = intra_factor * torch.bmm(captions, captions.transpose(1, 2))  # [Bc, L, L]
        intra = masked_softmax(word_logits, token_mask.unsqueeze(1), dim=-1)
        # q [Bi, Bc, L]: one bmm per caption, [L, L] x [L, Bi] (no image-wide copy of ``intra``)
        decision = torch.bmm(intra, row_max.permute(1, 2, 0)).permute(2, 0, 1)
    else:
        decision = row_max
    return torch.where(decision < 0, row_max, torch.zeros_like(row_max))


class NAAFScorer(nn.Module):
    """NAAF's test-time score as a module; its constants are float32 buffers (saved in the state dict).

    ``negative_branch`` (not saved: a test-time switch, not a weight) set to
    False scores without step 3's term - the paper's ablation of the negative
    branch, with the trained weights and threshold unchanged.
    """

    threshold: Tensor
    lambda_softmax: Tensor
    intra_factor: Tensor

    def __init__(
        self, threshold: float, lambda_softmax: float = 20.0, intra_factor: float = 5.0, negative_branch: bool = True
    ) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.register_buffer("lambda_softmax", torch.tensor(float(lambda_softmax), dtype=torch.float32))
        self.register_buffer("intra_factor", torch.tensor(float(intra_factor), dtype=torch.float32))
        self.negative_branch = negative_branch

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        return naaf_scores(images, captions, lengths, self.threshold, self.lambda_softmax, self.intra_factor,
                           negative_branch=self.negative_branch)

    def extra_repr(self) -> str:
        text = (
            f"threshold={float(self.threshold):.6g}, lambda_softmax={float(self.lambda_softmax):g}, "
            f"intra_factor={float(self.intra_factor):g}"
        )
        return text if self.negative_branch else text + ", negative_branch=False"
