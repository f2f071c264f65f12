"""The CMPM / CMPC family, whole: everything itmrt knows of CMPM is in this folder.

- :mod:`.spec` - the family spec (registered on import; torch-free);
- :mod:`.model` - the PyTorch reference model (``CMPMModel``: MobileNet v1 and a BiLSTM, cosine score);
- :mod:`.graphs` - its image-encoder, text-encoder and scorer graphs;
- :mod:`.export_config` - the exporter config;
- :mod:`.losses` - CMPM and CMPC;
- :mod:`.trainer` - its trainer (images from files), on the shared training loop
  :mod:`itmrt.models.training_loop`.

Importing the package imports only the spec (no torch).
"""

from __future__ import annotations

from itmrt.families.cmpm.spec import CMPM, CmpmFamily

__all__ = ["CMPM", "CmpmFamily"]
