"""Machine probing: the GPUs this process may use (``nvidia-smi``, CUDA visibility) and Jetson/JetPack.

Every probe is optional and never raises: a missing library or tool is reported
as absent. Imports neither torch nor TensorRT. :mod:`itmrt.engine` asks these
probes what it builds for; ``itmrt doctor`` (:mod:`itmrt.reports.doctor`) reports them.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "GpuInfo": "itmrt.machine.gpus",
    "gpu": "itmrt.machine.gpus",
    "JetsonInfo": "itmrt.machine.jetson",
    "detect_jetson": "itmrt.machine.jetson",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
