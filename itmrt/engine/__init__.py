"""TensorRT: building engines from a bundle's precision graphs (settings, profiles, timing cache, DLA), reading
and checking a built engine against this machine (inspect, layers, compat), the TensorRT API and CUDA context.
Machine probing (GPUs, Jetson) is :mod:`itmrt.machine`; ``itmrt doctor`` is :mod:`itmrt.reports.doctor`.

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
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
