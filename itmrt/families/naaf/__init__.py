"""The NAAF family, whole: everything itmrt knows of NAAF is in this folder.

- :mod:`.spec` - the family spec (registered on import; torch-free);
- :mod:`.model` - the PyTorch reference score (``naaf_scores``, ``NAAFScorer``);
- :mod:`.tiled` - the reference score over tiles, for galleries larger than memory;
- :mod:`.graphs` - the scorer's ONNX graph;
- :mod:`.threshold` - training's threshold learning (``ThresholdLearner``).

Importing the package imports only the spec (no torch).
"""

from __future__ import annotations

from itmrt.families.naaf.spec import DEFAULT_LAMBDA_SOFTMAX, NAAF, NaafFamily

__all__ = ["DEFAULT_LAMBDA_SOFTMAX", "NAAF", "NaafFamily"]
