"""The torch-free bundle: names and file layout, the typed manifest and its schema, graph lookup, integrity.

Everything that reads or writes a bundle folder - export, calibration, engine
build, the runtime, reports - takes the bundle's vocabulary from here:
:mod:`~itmrt.bundle.names` (components, precisions, axes, file layout),
:mod:`~itmrt.bundle.manifest` (``manifest.json`` as typed records),
:mod:`~itmrt.bundle.folder` (a bundle opened for use: which file serves a
component, sha256 checks), :mod:`~itmrt.bundle.check` (``itmrt check``) and
:mod:`~itmrt.bundle.trt_ops` (TensorRT's ONNX op table). It imports numpy and
onnx at most, never torch.
"""

