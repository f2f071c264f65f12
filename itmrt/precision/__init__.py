"""Precision variants of a bundle's graphs: FP16 with measured FP32 islands (which nodes stay FP32 is measured,
:mod:`~itmrt.precision.sensitivity`), INT8 Q/DQ from calibration (:mod:`~itmrt.precision.int8`, placed by
:mod:`~itmrt.precision.qdq`), and what TF32 would do to a graph (:mod:`~itmrt.precision.tf32`). ``itmrt build``,
which makes these graphs and then engines, is :mod:`itmrt.build`."""

from __future__ import annotations

from itmrt.bundle.names import Choice
from itmrt.optional import lazy_exports

_EXPORTS = {
    "PrecisionOptions": "itmrt.precision.precision_graphs",
    "calibrate": "itmrt.precision.precision_graphs",
    "make_precision_graphs": "itmrt.precision.precision_graphs",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""


class CalibrationMethod(Choice):
    """How INT8 activation ranges are estimated from the calibration data."""

    PERCENTILE = "percentile"  # the central 99.999% of values
    ENTROPY = "entropy"  # the threshold with the least KL divergence (TensorRT's calibrator)
    MINMAX = "minmax"


DEFAULT_METHOD = CalibrationMethod.PERCENTILE
"""INT8 range estimation used unless the user picks one. Measured on the shipped models (rsum change
against FP32 in ONNX Runtime): NAAF percentile -0.1, min-max -0.1, entropy -1.9; CMPM percentile
+1.4, min-max +5.6, entropy -153 (KL clips the MobileNet's ReLU outputs at about a quarter of
their range)."""


__all__ = sorted([*_EXPORTS, "CalibrationMethod", "DEFAULT_METHOD"])

__getattr__ = lazy_exports(__name__, _EXPORTS)
