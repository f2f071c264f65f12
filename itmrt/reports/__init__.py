"""Parity and latency reports: every deployed variant against a reference, and timed per stage and batch size.

:mod:`~itmrt.reports.parity_report` (``itmrt parity``), :mod:`~itmrt.reports.bench`
(``itmrt bench``), the variants they open (:mod:`~itmrt.reports.runtime_variants`),
the versioned ``report.json`` schema (:mod:`~itmrt.reports.schema`), Markdown,
plots and comparisons between two reports; ``itmrt doctor``'s report of what this machine can run
(:mod:`~itmrt.reports.doctor`).
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "ParityOptions": "itmrt.reports.parity_report",
    "run_parity": "itmrt.reports.parity_report",
    "write_parity": "itmrt.reports.parity_report",
    "BenchOptions": "itmrt.reports.bench",
    "run_bench": "itmrt.reports.bench",
    "write_bench": "itmrt.reports.bench",
    "Comparison": "itmrt.reports.compare",
    "compare_reports": "itmrt.reports.compare",
    "DoctorReport": "itmrt.reports.doctor",
    "diagnose": "itmrt.reports.doctor",
    "format_report": "itmrt.reports.doctor",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
