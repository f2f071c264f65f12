"""``itmrt build``: a bundle's precision graphs (:mod:`itmrt.precision`), then its TensorRT engines
(:mod:`itmrt.engine`) where TensorRT and a GPU exist. Orchestration only: the precision work and the engine
builder live in those two packages, which do not import this one.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "BuildOutcome": "itmrt.build.orchestration",
    "build_bundle": "itmrt.build.orchestration",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
