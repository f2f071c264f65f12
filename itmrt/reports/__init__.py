"""Parity and latency reports: every deployed variant against a reference, and timed per stage and batch size.

:mod:`~itmrt.reports.parity_report` (``itmrt parity``), :mod:`~itmrt.reports.bench`
(``itmrt bench``), the variants they open (:mod:`~itmrt.reports.runtime_variants`),
the versioned ``report.json`` schema (:mod:`~itmrt.reports.schema`), Markdown,
plots and comparisons between two reports.
"""
