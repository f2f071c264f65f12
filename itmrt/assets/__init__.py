"""Small trained models shipped for the demo, the tests and a first export (made by `itmrt make-small-models`).

``naaf_small.pth.tar`` and ``scan_small.pth.tar`` (the authors' released layout) and
``cmpm_small.safetensors`` (itmrt's native format) were trained on synthetic data with the
vocabulary ``vocab.json`` beside them; each records that vocabulary's hash, so export refuses
another. ``recipe.json`` holds the data and training settings and each model's validation recall.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS: dict[str, str] = {}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
