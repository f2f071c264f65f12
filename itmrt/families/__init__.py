"""Model families: one spec per family (NAAF, SCAN, CMPM) holding what differs, registered once.

Look a family up by name (``get("naaf")``, e.g. a manifest's ``family``) or by
a reference model (``family_of(model)``); the pipeline asks the spec instead of
testing family names. Adding a family means adding one module that subclasses
:class:`FamilySpec` and calls :func:`register` (see ``tests/test_families.py``
for a minimal one, registered inside the test). Importing this package never
imports torch.
"""

from __future__ import annotations

from itmrt.families.registry import family_of, get, names, register, registered, threshold_families, unregister
from itmrt.families.spec import BuiltGraphs, FamilySpec, GraphOptions, ImageSplit, ScorerConstants

# The built-in families register themselves when imported.
from itmrt.families import naaf, scan, cmpm  # noqa: E402,F401  isort: skip

__all__ = [
    "BuiltGraphs",
    "FamilySpec",
    "GraphOptions",
    "ImageSplit",
    "ScorerConstants",
    "family_of",
    "get",
    "names",
    "register",
    "registered",
    "threshold_families",
    "unregister",
]
