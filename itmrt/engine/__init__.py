"""TensorRT: building engines from a bundle's precision graphs, checking a built engine fits this machine, doctor.

Imports TensorRT only when an engine is built (never torch); everything else in
itmrt works without it.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "EngineOptions": "itmrt.engine.build",
    "build_engines": "itmrt.engine.build",
    "require_tensorrt": "itmrt.engine.build",
    "TensorRTUnavailable": "itmrt.engine.build",
    "DoctorReport": "itmrt.engine.doctor",
    "diagnose": "itmrt.engine.doctor",
    "format_report": "itmrt.engine.doctor",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
