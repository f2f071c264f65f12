"""The torch-free runtime: backends, batched encoders, tiled scorer with streaming top-k, galleries.

Imports numpy and (when a session is created) onnxruntime or TensorRT - never
torch. Names are re-exported lazily, so ``itmrt.runtime.options`` (the CLI's
choices) imports without numpy.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "Runtime": "itmrt.runtime.api",
    "load": "itmrt.runtime.api",
    "OnLong": "itmrt.runtime.options",
    "RuntimeOptions": "itmrt.runtime.options",
    "ScorerChoice": "itmrt.runtime.options",
    "Runner": "itmrt.runtime.runner",
    "TensorInfo": "itmrt.runtime.runner",
    "BundleInfo": "itmrt.bundle.folder",
    "read_bundle": "itmrt.bundle.folder",
    "CaptionEmbeddings": "itmrt.runtime.encoders",
    "Gallery": "itmrt.runtime.gallery",
    "read_gallery": "itmrt.runtime.gallery",
    "ScoreResult": "itmrt.runtime.tiled",
    "TopK": "itmrt.runtime.tiled",
    "score_tiled": "itmrt.runtime.tiled",
    "caption_result_lines": "itmrt.runtime.results",
    "results_jsonl": "itmrt.runtime.results",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
