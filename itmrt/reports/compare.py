"""``itmrt report compare A B``: what changed between two reports of the same kind, and whether it regressed.

Regressions (what makes the command exit non-zero, for a CI check):

- bench: a (variant, batch size, stage) whose throughput fell by more than
  ``max_throughput_drop`` (a fraction: 0.1 = 10%) from A to B; a variant that
  ran in A and not in B;
- parity: a variant whose R@1/5/10 (either direction) or rsum fell by more than
  ``max_recall_drop`` points; a variant that passed in A and fails (or no
  longer runs) in B.

Rows present in only one report are listed, not judged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from itmrt.errors import ItmrtError

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@dataclass
class Comparison:
    kind: str
    lines: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)

    def text(self) -> str:
        verdict = f"{len(self.regressions)} regression(s)" if self.regressions else "no regression"
        body = self.lines + ([""] + [f"REGRESSION: {r}" for r in self.regressions] if self.regressions else [])
        return "\n".join([f"{self.kind} reports compared: {verdict}", *body])


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in report["variants"]}


def _throughput(result: dict[str, Any]) -> tuple[str, float]:
    tp = result["throughput"]
    key = "images_per_s" if "images_per_s" in tp else "captions_per_s"
    return key, float(tp[key])


def _variants_in_both(
    a: dict[str, Any], b: dict[str, Any], out: Comparison, past: str, participle: str
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Variants that ran in both reports; the others become a line (or a regression, when B lost one)."""
    old, new = _by_name(a), _by_name(b)
    for name in sorted(set(old) | set(new)):
        va, vb = old.get(name), new.get(name)
        if va is None or vb is None:
            out.lines.append(f"{name}: only in {'B' if va is None else 'A'}")
        elif va["status"] == "ok" and vb["status"] != "ok":
            out.regressions.append(f"{name} {past} in A but not in B ({vb['reason']})")
        elif va["status"] != "ok" or vb["status"] != "ok":
            out.lines.append(f"{name}: not {participle} in {'A' if va['status'] != 'ok' else 'B'}")
        else:
            yield name, va, vb


def compare_bench(a: dict[str, Any], b: dict[str, Any], max_throughput_drop: float) -> Comparison:
    out = Comparison("bench")
    for name, va, vb in _variants_in_both(a, b, out, "ran", "run"):
        rows_b = {(r["batch_size"], r["stage"]): r for r in vb["results"]}
        for ra in va["results"]:
            rb = rows_b.get((ra["batch_size"], ra["stage"]))
            if rb is None:
                continue
            unit, before = _throughput(ra)
            _, after = _throughput(rb)
            change = (after - before) / before if before > 0 else 0.0
            where = f"{name} {ra['stage']} batch {ra['batch_size']}"
            out.lines.append(
                f"{where}: p50 {ra['latency_ms']['p50']:.3f} -> {rb['latency_ms']['p50']:.3f} ms, "
                f"{unit.replace('_per_s', '/s')} {before:.4g} -> {after:.4g} ({change:+.1%})"
            )
            if change < -max_throughput_drop:
                out.regressions.append(f"{where}: throughput fell {-change:.1%} (allowed {max_throughput_drop:.1%})")
    return out


def compare_parity(a: dict[str, Any], b: dict[str, Any], max_recall_drop: float) -> Comparison:
    out = Comparison("parity")
    for name, va, vb in _variants_in_both(a, b, out, "was measured", "measured"):
        changes = ", ".join(f"{k} {va['recall'][k]:.1f}->{vb['recall'][k]:.1f}" for k in RECALL_KEYS)
        err_a, err_b = va["tensors"]["end_to_end"]["max_abs"], vb["tensors"]["end_to_end"]["max_abs"]
        out.lines.append(f"{name}: {changes}; score max abs error {err_a:.3g} -> {err_b:.3g}; "
                         f"{'pass' if va['passed'] else 'FAIL'} -> {'pass' if vb['passed'] else 'FAIL'}")
        for key in RECALL_KEYS:
            drop = va["recall"][key] - vb["recall"][key]
            if drop > max_recall_drop:
                out.regressions.append(f"{name} {key} fell {drop:.2f} points (allowed {max_recall_drop:g})")
        if va["passed"] and not vb["passed"]:
            failed = [c["name"] for c in vb["checks"] if not c["passed"]]
            out.regressions.append(f"{name} passed in A and fails in B ({', '.join(failed)})")
    return out


def compare_reports(
    a: dict[str, Any], b: dict[str, Any], max_throughput_drop: float = 0.1, max_recall_drop: float = 1.0
) -> Comparison:
    """Compare two reports of one kind (A = before, B = after)."""
    if a["kind"] != b["kind"]:
        raise ItmrtError(f"cannot compare a {a['kind']} report with a {b['kind']} report; pass two of the same kind")
    if max_throughput_drop < 0 or max_recall_drop < 0:
        raise ItmrtError("--max-throughput-drop and --max-recall-drop must be non-negative")
    if a["kind"] == "bench":
        return compare_bench(a, b, max_throughput_drop)
    return compare_parity(a, b, max_recall_drop)
