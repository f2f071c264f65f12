"""Model families: one folder per family (``naaf/``, ``scan/``, ``cmpm/``), each registered once.

A family's folder holds its spec, reference model, graph builders, training
hooks and exporter config (docs/adding-a-family.md). Look a family up by name
(``get("naaf")``, e.g. a manifest's ``family``) or by a reference model
(``family_of(model)``); the pipeline asks the spec instead of testing family
names. Adding a family means adding one folder whose spec subclasses
:class:`FamilySpec` and calls :func:`register` (see ``tests/test_families.py``
for a minimal one, registered inside the test). Importing this package never
imports torch.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "family_of": "itmrt.families.registry",
    "get": "itmrt.families.registry",
    "names": "itmrt.families.registry",
    "register": "itmrt.families.registry",
    "registered": "itmrt.families.registry",
    "threshold_families": "itmrt.families.registry",
    "unregister": "itmrt.families.registry",
    "BuiltGraphs": "itmrt.families.spec",
    "FamilySpec": "itmrt.families.spec",
    "GraphOptions": "itmrt.families.spec",
    "ImageSplit": "itmrt.families.spec",
    "ScorerConstants": "itmrt.families.spec",
    "TorchRunner": "itmrt.families.reference",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)

# The built-in families register themselves when imported (after __getattr__: they import names from here).
from itmrt.families import naaf, scan, cmpm  # noqa: E402,F401  isort: skip
