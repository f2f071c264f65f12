"""One comparator: outputs against a reference's, judged against tolerances, kept as a report record.

Pure numpy, no backend, no torch. Every comparison in itmrt goes through here:

- export parity (ONNX Runtime against PyTorch at export, :mod:`itmrt.export.sample_parity`):
  :func:`max_abs_error` per graph and :func:`top_k_identical` of the scores;
- ``itmrt parity`` (:mod:`itmrt.reports.parity_report`): :func:`tensor_errors` per graph
  and end to end, :func:`retrieval_agreement`, and :func:`check` records against tolerances;
- the agreement measures (:mod:`itmrt.reports.agreement`, NAAF's decision flips and
  threshold ties) build on the same definitions;
- FP16 sensitivity and INT8 error (:mod:`itmrt.precision.sensitivity`):
  :func:`worst_output_error` of a precision graph's outputs against float32.

The errors are computed in float64. A non-finite output never passes: ``max_abs_error``
and ``worst_output_error`` are infinite, ``tensor_errors`` counts it in ``nonfinite``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REL_FLOOR = 1e-3
"""Relative error is ``|got - ref| / max(|ref|, REL_FLOOR)``: entries near zero would otherwise dominate it."""

DIRECTIONS = ("i2t", "t2i")


def _pair(reference: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(got, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, got {out.shape}")
    return ref, out


# -- tensors ------------------------------------------------------------------------------------


def max_abs_error(reference: np.ndarray, got: np.ndarray) -> float:
    """Largest ``|got - reference|`` (0 for empty arrays; infinite where either holds NaN or infinity)."""
    ref, out = _pair(reference, got)
    if not ref.size:
        return 0.0
    diff = np.abs(out - ref)
    return float(diff.max()) if np.isfinite(diff).all() else math.inf


def worst_output_error(reference: Iterable[Sequence[np.ndarray]], outputs: Iterable[Sequence[np.ndarray]]) -> float:
    """Largest :func:`max_abs_error` over the float outputs of several runs (``reference[run][output]``)."""
    worst = 0.0
    for expected, actual in zip(reference, outputs):
        for a, b in zip(expected, actual):
            if a.dtype.kind != "f":
                continue
            worst = max(worst, max_abs_error(a, b))
            if worst == math.inf:
                return worst
    return worst


def tensor_errors(reference: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Error of ``got`` against ``reference`` (same shape), over the finite entries of ``got``.

    ``nonfinite`` counts NaN/inf entries of ``got``; they are left out of the
    other numbers (JSON has no infinity) and make every tolerance check fail.
    """
    ref, out = _pair(reference, got)
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


# -- rankings -----------------------------------------------------------------------------------


def top_k_identical(a: np.ndarray, b: np.ndarray, k: int = 10) -> bool:
    """Whether the top-k of every row and every column (i2t and t2i rankings) are the same, in order."""

    def top(x: np.ndarray, axis: int) -> np.ndarray:
        order = np.argsort(-x, axis=axis, kind="stable")
        return np.take(order, np.arange(min(k, x.shape[axis])), axis=axis)

    return bool(np.array_equal(top(a, 1), top(b, 1)) and np.array_equal(top(a, 0), top(b, 0)))


def ordinal_ranks(values: np.ndarray) -> np.ndarray:
    """Rank of each entry of every row, 0 = highest; ties ordered by the lower index (a stable sort)."""
    order = np.argsort(-values, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values.shape[1])[None, :].repeat(values.shape[0], axis=0), axis=1)
    return ranks


def _direction(reference: np.ndarray, got: np.ndarray, k: int) -> dict[str, Any]:
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


def retrieval_agreement(reference: np.ndarray, got: np.ndarray, k: int = 10) -> dict[str, dict[str, Any]]:
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


# -- tolerances and the record ----------------------------------------------------------------------


def check(name: str, value: float, limit: float, op: str) -> dict[str, Any]:
    """One pass/fail check: ``value <= limit`` (``op="<="``) or ``value >= limit`` (``">="``); NaN fails."""
    passed = value <= limit if op == "<=" else value >= limit
    return {"name": name, "value": float(value), "limit": float(limit), "op": op, "passed": bool(passed)}


@dataclass
class Comparison:
    """A comparison's record: the measurements (per output, or any JSON) and the checks against tolerances."""

    measured: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c["passed"]]

    def to_json(self) -> dict[str, Any]:
        """The record for a report: checks with a non-finite value get ``value: null`` (JSON has no infinity)."""
        checks = [dict(c, value=c["value"] if math.isfinite(c["value"]) else None) for c in self.checks]
        return {"measured": self.measured, "checks": checks, "passed": self.passed}
