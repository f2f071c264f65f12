"""The SCAN family, whole: everything itmrt knows of SCAN is in this folder.

- :mod:`.spec` - the family spec (registered on import; torch-free);
- :mod:`.model` - the PyTorch reference score (``scan_scores``, ``SCANScorer``);
- :mod:`.graphs` - the scorer's ONNX graph;
- :mod:`.export_config` - the exporter config.

SCAN has no training hook of its own: it trains with the shared triplet loss (:mod:`itmrt.train`).
Importing the package imports only the spec (no torch).
"""

from __future__ import annotations

from itmrt.families.scan.spec import DEFAULT_LAMBDA_SOFTMAX, SCAN, ScanFamily

__all__ = ["DEFAULT_LAMBDA_SOFTMAX", "SCAN", "ScanFamily"]
