"""Galleries: image embeddings computed once, stored as ``.npy`` and memory-mapped on load.

A gallery folder holds ``image_embeddings.npy`` (float32, ``images x regions x
d``, or ``images x D`` for global models) and ``gallery.json``, which ties it
to the bundle whose image encoder made it (the sha256 of that bundle's
``manifest.json``): searching a gallery with a different bundle is refused,
since its embeddings live in another model's space.

The folder is written under a hidden temporary name and renamed into place,
``gallery.json`` last, so an interrupted ``itmrt index`` leaves nothing that
looks like a gallery.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from itmrt import __version__
from itmrt.errors import DataError, ItmrtError
from itmrt.data.precomp import open_npy
from itmrt.io import atomic_write_text, check_output_folder, publish_folder, read_json_document, sha256_file, staged_folder
from itmrt.bundle.folder import BundleInfo

GALLERY_KIND = "itmrt-gallery"
GALLERY_SCHEMA = 1
GALLERY_MANIFEST = "gallery.json"
EMBEDDINGS_FILE = "image_embeddings.npy"


@dataclass
class Gallery:
    """A gallery folder: memory-mapped image embeddings and their manifest."""

    path: Path
    embeddings: np.ndarray
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def bundle_path(self) -> Path:
        return Path(self.manifest["bundle"]["path"])

    def check_bundle(self, bundle: BundleInfo) -> None:
        """Refuse a bundle other than the one that made this gallery."""
        made_with = self.manifest["bundle"]["manifest_sha256"]
        if made_with != bundle.manifest_sha256:
            raise ItmrtError(
                f"gallery {self.path} was made with another bundle (manifest sha256 {made_with[:12]}..., "
                f"not {bundle.manifest_sha256[:12]}... of {bundle.path}); re-index it with `itmrt index {bundle.path}`"
            )


def is_gallery(folder: str | Path) -> bool:
    return (Path(folder) / GALLERY_MANIFEST).is_file()


def read_gallery(folder: str | Path, verify: bool = False) -> Gallery:
    """Open a gallery (embeddings memory-mapped); ``verify`` also checks the embeddings' sha256."""
    root = Path(folder)
    manifest_path = root / GALLERY_MANIFEST
    if not manifest_path.is_file():
        raise ItmrtError(f"{root} is not an itmrt gallery (no {GALLERY_MANIFEST}); make one with `itmrt index`")
    manifest, _raw = read_json_document(manifest_path, (GALLERY_KIND,), GALLERY_SCHEMA, "gallery manifest", "re-index the gallery")
    entry = manifest["embeddings"]
    path = root / entry["file"]
    if not path.is_file():
        raise ItmrtError(f"gallery {root} lacks {entry['file']}; re-index it")
    if verify and sha256_file(path) != entry["sha256"]:
        raise ItmrtError(f"{path} does not match the sha256 in {GALLERY_MANIFEST}; re-index the gallery")
    try:
        embeddings = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ItmrtError(f"{path} is not a readable .npy file ({type(exc).__name__}); re-index the gallery") from None
    if list(embeddings.shape) != list(entry["shape"]) or embeddings.dtype != np.float32:
        raise ItmrtError(f"{path} has shape {embeddings.shape} / {embeddings.dtype}, not what {GALLERY_MANIFEST} says; re-index")
    return Gallery(root, embeddings, manifest)


def _check_target(out: Path, overwrite: bool) -> None:
    check_output_folder(out, overwrite, "gallery", is_gallery)


def write_gallery(
    out: str | Path,
    bundle: BundleInfo,
    encode_into: Callable[[np.ndarray], object],
    shape: tuple[int, ...],
    details: dict[str, Any],
    overwrite: bool = False,
) -> Gallery:
    """Create a gallery at ``out``: ``encode_into(array)`` fills a float32 ``.npy`` memmap of ``shape``."""
    target = Path(out)
    _check_target(target, overwrite)
    with staged_folder(target) as staging:
        array = np.lib.format.open_memmap(staging / EMBEDDINGS_FILE, mode="w+", dtype=np.float32, shape=shape)
        encode_into(array)
        array.flush()
        del array
        manifest = {
            "kind": GALLERY_KIND,
            "schema_version": GALLERY_SCHEMA,
            "bundle": {
                "path": str(bundle.path.resolve()),
                "manifest_sha256": bundle.manifest_sha256,
                "family": bundle.family,
            },
            "embeddings": {
                "file": EMBEDDINGS_FILE,
                "sha256": sha256_file(staging / EMBEDDINGS_FILE),
                "shape": list(shape),
                "dtype": "float32",
            },
            **details,
            "itmrt_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(staging / GALLERY_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _check_target(target, overwrite)
        publish_folder(staging, target, "replace")
    return read_gallery(target)


def load_features(path: str | Path) -> np.ndarray:
    """A float32 ``.npy`` features file, memory-mapped (one-line errors for unreadable files)."""
    source = Path(path)
    features = open_npy(source, "features")
    if features.dtype not in (np.float32, np.float16, np.float64):
        raise DataError(f"features file {source} has dtype {features.dtype}; expected float32")
    return features
