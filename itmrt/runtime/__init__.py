"""The torch-free runtime: backends, batched encoders, tiled scorer with streaming top-k, galleries.

Imports numpy and (when a session is created) onnxruntime or TensorRT - never torch.
"""

from __future__ import annotations

from itmrt.runtime.api import Runtime, load
from itmrt.bundle.folder import BundleInfo, read_bundle
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.gallery import Gallery, read_gallery
from itmrt.runtime.tiled import ScoreResult, TopK, score_tiled

__all__ = [
    "BundleInfo",
    "CaptionEmbeddings",
    "Gallery",
    "Runtime",
    "ScoreResult",
    "TopK",
    "load",
    "read_bundle",
    "read_gallery",
    "score_tiled",
]
