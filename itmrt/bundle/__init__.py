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

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "BundleInfo": "itmrt.bundle.folder",
    "read_bundle": "itmrt.bundle.folder",
    "is_bundle": "itmrt.bundle.folder",
    "verify_files": "itmrt.bundle.folder",
    "Manifest": "itmrt.bundle.manifest",
    "read_manifest": "itmrt.bundle.manifest",
    "parse_manifest": "itmrt.bundle.manifest",
    "write_manifest": "itmrt.bundle.manifest",
    "manifest_schema": "itmrt.bundle.manifest",
    "GalleryManifest": "itmrt.bundle.gallery_manifest",
    "read_gallery_manifest": "itmrt.bundle.gallery_manifest",
    "BundleCheck": "itmrt.bundle.check",
    "check_bundle": "itmrt.bundle.check",
    "BackendName": "itmrt.bundle.names",
    "Component": "itmrt.bundle.names",
    "Precision": "itmrt.bundle.names",
    "parse_choice": "itmrt.bundle.names",
    "check_trt_compat": "itmrt.bundle.trt_ops",
    "RuntimeTraits": "itmrt.bundle.traits",
    "bundle_traits": "itmrt.bundle.traits",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
