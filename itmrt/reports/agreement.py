"""How closely a deployed variant agrees with its reference: pure numpy, no backend, no torch.

Three levels, each a plain dict of floats ready for ``report.json``:

- tensors (:func:`tensor_errors`): max / mean absolute error, max relative
  error, cosine similarity and the worst element of two arrays;
- NAAF branch decisions (:func:`naaf_decision_flips`): how often the sign
  tests of the scorer (``s_ij - t > 0`` per region, ``q_i < 0`` per word)
  come out differently from the reference's embeddings;
- retrieval (:func:`retrieval_agreement`): top-1 agreement, top-10 overlap and
  Spearman rank correlation per query, in both directions.

Every definition is written so a test can recompute it from saved score
matrices with a few numpy lines. The tensor and retrieval measures are the
comparator's (:mod:`itmrt.reports.comparator`, the one place outputs are
compared), named here too; the NAAF decision measures build on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from itmrt.reports.comparator import (
    DIRECTIONS,
    REL_FLOOR,
    ordinal_ranks,
    retrieval_agreement,
    tensor_errors,
    top1_agreement_within,
)
from itmrt.runtime.explain import propagated_decision

__all__ = [
    "DIRECTIONS", "REL_FLOOR", "THRESHOLD_BAND", "naaf_decision_flips", "naaf_decisions", "ordinal_ranks",
    "retrieval_agreement", "tensor_errors", "threshold_ties", "top1_agreement_within",
]


def naaf_decisions(
    tokens: np.ndarray, regions: np.ndarray, threshold: float, intra_factor: float = 5.0, propagate: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One caption's branch decisions against every image (docs/models.md section 2, steps 2-3).

    ``tokens`` ``[m, d]`` (the caption's real tokens), ``regions`` ``[N, n, d]``.
    Returns ``(positive [m, N, n]``: ``s_ij - t > 0``, ``negative [m, N]``: ``q_i < 0)``.
    """
    a = np.einsum("md,Nnd->mNn", tokens, regions) - threshold
    r = a.max(axis=2)  # [m, N]
    if propagate:
        q = propagated_decision(tokens, r.T, intra_factor).T
    else:
        q = r
    return a > 0, q < 0


def naaf_decision_flips(
    reference_tokens: Sequence[np.ndarray],
    reference_regions: np.ndarray,
    tokens: Sequence[np.ndarray],
    regions: np.ndarray,
    threshold: float,
    intra_factor: float = 5.0,
    propagate: bool = True,
) -> dict[str, Any]:
    """Fraction of (word, region) and (word) decisions over all caption-image pairs that differ from the reference.

    ``*_tokens``: one ``[m_k, d]`` array per caption; ``*_regions``: ``[N, n, d]``.
    """
    region_flips = word_flips = region_total = word_total = 0
    ref_regions = np.asarray(reference_regions, dtype=np.float64)
    got_regions = np.asarray(regions, dtype=np.float64)
    for ref_u, got_u in zip(reference_tokens, tokens):
        ref_pos, ref_neg = naaf_decisions(
            np.asarray(ref_u, np.float64), ref_regions, threshold, intra_factor, propagate
        )
        got_pos, got_neg = naaf_decisions(
            np.asarray(got_u, np.float64), got_regions, threshold, intra_factor, propagate
        )
        region_flips += int(np.count_nonzero(ref_pos != got_pos))
        word_flips += int(np.count_nonzero(ref_neg != got_neg))
        region_total += ref_pos.size
        word_total += ref_neg.size
    return {
        "region_decisions": region_total,
        "region_flips": region_flips,
        "region_flip_rate": region_flips / max(1, region_total),
        "word_decisions": word_total,
        "word_flips": word_flips,
        "word_flip_rate": word_flips / max(1, word_total),
        "threshold": float(threshold),
        "captions": len(reference_tokens),
        "images": int(ref_regions.shape[0]),
    }


THRESHOLD_BAND = 1e-5
"""Half-width of the band around NAAF's threshold where float rounding may put a similarity on either side."""


def threshold_ties(
    reference_scores: np.ndarray,
    scores: np.ndarray,
    reference_tokens: Sequence[np.ndarray],
    reference_regions: np.ndarray,
    threshold: float,
    band: float = THRESHOLD_BAND,
    max_pairs: int = 10_000,
) -> dict[str, Any]:
    """The largest score error over the pairs whose reference holds no similarity within ``band`` of ``threshold``.

    NAAF's masks switch at ``s = t``: where a reference similarity lies that
    close to the threshold, two correct float32 implementations can decide
    differently and the pair's score jumps. Such pairs (``tie_pairs``) are
    counted, not judged by the score tolerance; the decision flip rates cover
    them. Pairs are examined from the largest error down, at most ``max_pairs``.
    """
    ref = np.asarray(reference_scores, dtype=np.float64)
    diff = np.abs(np.asarray(scores, dtype=np.float64) - ref)
    diff = np.where(np.isfinite(diff), diff, np.inf).ravel()
    count = min(max_pairs, diff.size)
    if count == 0:
        return {"band": band, "tie_pairs": 0, "pairs_examined": 0, "max_abs_off_threshold": 0.0}
    top = np.argpartition(-diff, count - 1)[:count]
    top = top[np.argsort(-diff[top], kind="stable")]
    regions = np.asarray(reference_regions, dtype=np.float64)
    n_cap = ref.shape[1]
    ties = 0
    for examined, flat in enumerate(top, start=1):
        image, caption = divmod(int(flat), n_cap)
        sims = np.asarray(reference_tokens[caption], dtype=np.float64) @ regions[image].T
        if np.any(np.abs(sims - threshold) <= band):
            ties += 1
            continue
        return {"band": band, "tie_pairs": ties, "pairs_examined": examined, "max_abs_off_threshold": float(diff[flat])}
    # Every examined pair is a tie: the error of the next pair down bounds the rest.
    rest = np.delete(diff, top)
    bound = float(rest.max()) if rest.size else 0.0
    return {"band": band, "tie_pairs": ties, "pairs_examined": count, "max_abs_off_threshold": bound}
