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
matrices with a few numpy lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from itmrt.runtime.explain import propagated_decision

REL_FLOOR = 1e-3
"""Relative error is ``|got - ref| / max(|ref|, REL_FLOOR)``: entries near zero would otherwise dominate it."""

DIRECTIONS = ("i2t", "t2i")


def tensor_errors(reference: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Error of ``got`` against ``reference`` (same shape), over the finite entries of ``got``.

    ``nonfinite`` counts NaN/inf entries of ``got``; they are left out of the
    other numbers (JSON has no infinity) and make every tolerance check fail.
    """
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(got, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, got {out.shape}")
    finite = np.isfinite(out)
    nonfinite = int(out.size - np.count_nonzero(finite))
    diff = np.where(finite, np.abs(out - ref), 0.0)
    rel = diff / np.maximum(np.abs(ref), REL_FLOOR)
    flat = int(np.argmax(diff)) if diff.size else 0
    worst = tuple(int(i) for i in np.unravel_index(flat, ref.shape)) if ref.size else ()
    ref_f, out_f = ref[finite], out[finite]
    norms = float(np.linalg.norm(ref_f) * np.linalg.norm(out_f))
    cosine = float(np.dot(ref_f, out_f) / norms) if norms > 0 else (1.0 if not ref_f.any() and not out_f.any() else 0.0)
    count = max(1, int(np.count_nonzero(finite)))
    return {
        "shape": list(ref.shape),
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.sum() / count),
        "max_rel": float(rel.max()) if rel.size else 0.0,
        "cosine": cosine,
        "worst_index": list(worst),
        "worst_reference": float(ref[worst]) if ref.size else 0.0,
        "worst_value": float(out[worst]) if ref.size and finite[worst] else None,
        "nonfinite": nonfinite,
    }


def ordinal_ranks(values: np.ndarray) -> np.ndarray:
    """Rank of each entry of every row, 0 = highest; ties ordered by the lower index (a stable sort)."""
    order = np.argsort(-values, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values.shape[1])[None, :].repeat(values.shape[0], axis=0), axis=1)
    return ranks


def _direction(reference: np.ndarray, got: np.ndarray, k: int) -> dict[str, float]:
    """Rows are queries, columns their candidates."""
    candidates = reference.shape[1]
    kk = min(k, candidates)
    ref_order = np.argsort(-reference, axis=1, kind="stable")
    got_order = np.argsort(-got, axis=1, kind="stable")
    top1 = float(np.mean(ref_order[:, 0] == got_order[:, 0]))
    rows = np.arange(reference.shape[0])
    # How far below the reference's best each query's chosen top-1 sits, in reference scores: 0 where the
    # top-1 agrees. A swap between candidates closer than the score tolerance is a tie, not a ranking error.
    gaps = reference[rows, ref_order[:, 0]] - reference[rows, got_order[:, 0]]
    disagreeing = np.sort(gaps[ref_order[:, 0] != got_order[:, 0]])[::-1]
    overlaps = [len(np.intersect1d(a[:kk], b[:kk])) / kk for a, b in zip(ref_order, got_order)]
    if candidates > 1:
        d = ordinal_ranks(reference).astype(np.float64) - ordinal_ranks(got).astype(np.float64)
        rho = 1.0 - 6.0 * (d**2).sum(axis=1) / (candidates * (candidates**2 - 1))
        spearman_mean, spearman_min = float(rho.mean()), float(rho.min())
    else:
        spearman_mean = spearman_min = 1.0
    return {
        "top1_agreement": top1,
        "top1_gaps": [float(g) for g in disagreeing],
        f"top{k}_overlap": float(np.mean(overlaps)),
        "spearman_mean": spearman_mean,
        "spearman_min": spearman_min,
        "queries": int(reference.shape[0]),
    }


def top1_agreement_within(direction: dict[str, Any], tie_band: float) -> float:
    """Top-1 agreement of one direction where a top-1 within ``tie_band`` of the reference's best counts as agreeing.

    ``direction`` is one entry of :func:`retrieval_agreement`; ``top1_gaps`` holds, for each query whose
    top-1 differs, how far the variant's choice sits below the reference's best in reference scores.
    """
    queries = int(direction["queries"])
    if queries == 0:
        return 1.0
    gaps = direction.get("top1_gaps")
    if gaps is None:  # reports written before the gaps were recorded: the strict figure
        return float(direction["top1_agreement"])
    return 1.0 - sum(1 for gap in gaps if not gap <= tie_band) / queries


def retrieval_agreement(reference: np.ndarray, got: np.ndarray, k: int = 10) -> dict[str, dict[str, float]]:
    """Agreement of two ``images x captions`` score matrices, per direction.

    i2t: each image (row) ranks all captions; t2i: each caption ranks all images.
    Spearman's rho per query uses ordinal ranks (ties by lower index), so it
    is ``1 - 6 sum d^2 / (n (n^2 - 1))`` exactly; NaN scores rank last.
    """
    ref = np.nan_to_num(np.asarray(reference, dtype=np.float64), nan=-np.inf)
    out = np.nan_to_num(np.asarray(got, dtype=np.float64), nan=-np.inf)
    if ref.shape != out.shape:
        raise ValueError(f"score matrices differ in shape: {ref.shape} vs {out.shape}")
    return {"i2t": _direction(ref, out, k), "t2i": _direction(ref.T, out.T, k)}


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
