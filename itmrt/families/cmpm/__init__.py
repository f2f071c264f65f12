"""The CMPM / CMPC family, whole: everything itmrt knows of CMPM is in this folder.

- :mod:`.spec` - the family spec (registered on import; torch-free);
- :mod:`.model` - the PyTorch reference model (``CMPMModel``: MobileNet v1 and a BiLSTM, cosine score);
- :mod:`.graphs` - its image-encoder, text-encoder and scorer graphs;
- :mod:`.export_config` - the exporter config.

Its trainer stays in :mod:`itmrt.train.cmpm_trainer` (it runs on the shared training loop there).
Importing the package imports only the spec (no torch).
"""

from __future__ import annotations

from itmrt.families.cmpm.spec import CMPM, CmpmFamily

__all__ = ["CMPM", "CmpmFamily"]
