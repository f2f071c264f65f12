"""Precision variants of a bundle's graphs: FP16 with measured FP32 islands, INT8 Q/DQ from calibration."""

DEFAULT_METHOD = "percentile"
"""INT8 range estimation used unless the user picks one. Measured on the shipped models (rsum change
against FP32 in ONNX Runtime): NAAF percentile -0.1, min-max -0.1, entropy -1.9; CMPM percentile
+1.4, min-max +5.6, entropy -153 (KL clips the MobileNet's ReLU outputs at about a quarter of
their range)."""
