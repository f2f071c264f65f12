"""Galleries: image embeddings computed once, stored as ``.npy`` and memory-mapped on load.

A gallery folder holds ``image_embeddings.npy`` (float32, or float16 to halve
its size - scorers upcast one tile at a time; ``images x regions x d``, or
``images x D`` for global models) and ``gallery.json``, which ties it
to the bundle whose image encoder made it (the sha256 of that bundle's
``manifest.json``): searching a gallery with a different bundle is refused,
since its embeddings live in another model's space. A gallery indexed from
image files also holds ``image_ids.json``: each row's image id (its path as
listed), by which results name images. Every file a gallery names is a plain
name inside its folder.

The folder is written under a hidden temporary name and renamed into place,
``gallery.json`` last, so an interrupted ``itmrt index`` leaves nothing that
looks like a gallery. A *sharded* gallery (:mod:`itmrt.scale`) is a folder of
such galleries under one ``gallery.json`` of kind ``itmrt-sharded-gallery``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from itmrt import __version__
from itmrt.errors import DataError, ItmrtError
from itmrt.data.precomp import open_npy
from itmrt.bundle.folder import BundleInfo, is_bundle
from itmrt.io import (
    atomic_write_bytes, atomic_write_text, check_output_folder, publish_folder, read_json_document, sha256_bytes,
    sha256_file, staged_folder,
)

GALLERY_KIND = "itmrt-gallery"
GALLERY_SCHEMA = 1
GALLERY_MANIFEST = "gallery.json"
EMBEDDINGS_FILE = "image_embeddings.npy"
IDS_FILE = "image_ids.json"
SHARDED_GALLERY_KIND = "itmrt-sharded-gallery"
"""The ``kind`` of a sharded gallery's ``gallery.json`` (read by :mod:`itmrt.scale.layout`)."""
STORAGE_DTYPES = ("float32", "float16")
"""How a gallery may store its embeddings."""


@dataclass
class Gallery:
    """A gallery folder: memory-mapped image embeddings and their manifest."""

    path: Path
    embeddings: np.ndarray
    manifest: dict[str, Any]

    ids: list[str] | None = None  # image ids (paths) of a gallery indexed from image files

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
    manifest, _raw = read_json_document(manifest_path, (GALLERY_KIND, SHARDED_GALLERY_KIND), GALLERY_SCHEMA,
                                        "gallery manifest", "re-index the gallery")
    if manifest["kind"] == SHARDED_GALLERY_KIND:
        raise ItmrtError(f"{root} is a sharded gallery; search it with `itmrt infer {root}` or itmrt.scale.open_shards")
    entry = manifest["embeddings"]
    path = _member(root, entry["file"])
    if not path.is_file():
        raise ItmrtError(f"gallery {root} lacks {entry['file']}; re-index it")
    if verify and sha256_file(path) != entry["sha256"]:
        raise ItmrtError(f"{path} does not match the sha256 in {GALLERY_MANIFEST}; re-index the gallery")
    try:
        embeddings = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ItmrtError(f"{path} is not a readable .npy file ({type(exc).__name__}); re-index the gallery") from None
    stored = entry.get("dtype", "float32")
    if stored not in STORAGE_DTYPES or list(embeddings.shape) != list(entry["shape"]) or embeddings.dtype != stored:
        raise ItmrtError(f"{path} has shape {embeddings.shape} / {embeddings.dtype}, not what {GALLERY_MANIFEST} says; re-index")
    ids = _read_ids(root, manifest["ids"], len(embeddings)) if manifest.get("ids") else None
    return Gallery(root, embeddings, manifest, ids)


def _member(root: Path, name: Any) -> Path:
    """A file a gallery manifest names: a plain file name inside the gallery folder, nothing else."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ItmrtError(f"{root / GALLERY_MANIFEST} names {name!r}, not a file inside the gallery; "
                         "re-index the gallery")
    return root / name


def _read_ids(root: Path, entry: dict[str, Any], rows: int) -> list[str]:
    path = _member(root, entry.get("file"))
    try:
        raw = path.read_bytes()
        ids = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ItmrtError(f"cannot read the image ids {path} ({type(exc).__name__}); re-index the gallery") from None
    if sha256_bytes(raw) != entry.get("sha256"):
        raise ItmrtError(f"{path} does not match the sha256 in {GALLERY_MANIFEST}; re-index the gallery")
    if not isinstance(ids, list) or len(ids) != rows or not all(isinstance(x, str) for x in ids):
        raise ItmrtError(f"{path} does not hold one image id per embedding row ({rows}); re-index the gallery")
    return ids


def gallery_source(
    source: str | Path, gallery: str | Path | None = None, expected: str = "a bundle folder or a gallery folder"
) -> tuple[Path, Path | None]:
    """(bundle, gallery or None) from a source that is a gallery (its bundle is the one that made it) or a
    bundle with an optional separate ``gallery``; ``expected`` names the accepted sources in the errors."""
    source = Path(source)
    if is_gallery(source):
        if gallery is not None:
            raise ItmrtError("give either a gallery as the source or --gallery, not both")
        return gallery_bundle_path(source), source
    if is_bundle(source):
        return source, None if gallery is None else Path(gallery)
    if not source.exists():
        raise ItmrtError(f"{source} does not exist; give {expected}")
    raise ItmrtError(f"{source} is not {expected}")


def gallery_bundle_path(folder: str | Path) -> Path:
    """The bundle that made the gallery (sharded or not) at ``folder``, as its ``gallery.json`` records it."""
    path = Path(folder) / GALLERY_MANIFEST
    manifest, _raw = read_json_document(path, (GALLERY_KIND, SHARDED_GALLERY_KIND), GALLERY_SCHEMA,
                                        "gallery manifest", "re-index the gallery")
    recorded = (manifest.get("bundle") or {}).get("path")
    if not isinstance(recorded, str) or not recorded:
        raise ItmrtError(f"{path} does not name the bundle that made it; re-index the gallery")
    return Path(recorded)


def _check_target(out: Path, overwrite: bool) -> None:
    check_output_folder(out, overwrite, "gallery", is_gallery)


def write_gallery(
    out: str | Path,
    bundle: BundleInfo,
    encode_into: Callable[[np.ndarray], Sequence[str] | None],
    shape: tuple[int, ...],
    details: dict[str, Any],
    overwrite: bool = False,
    dtype: str = "float32",
) -> Gallery:
    """Create a gallery at ``out``: ``encode_into(array)`` fills a ``.npy`` memmap of ``shape`` and ``dtype``.

    ``encode_into`` may return the image ids of the rows it filled, in order: the
    gallery then keeps them (``image_ids.json``), and only those rows when there
    are fewer ids than rows (images skipped as unreadable). ``dtype`` float16
    halves the file; values float16 cannot hold are refused.
    """
    target = Path(out)
    if dtype not in STORAGE_DTYPES:
        raise ItmrtError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, not {dtype!r}")
    _check_target(target, overwrite)
    with staged_folder(target) as staging:
        array = np.lib.format.open_memmap(staging / EMBEDDINGS_FILE, mode="w+", dtype=dtype, shape=shape)
        ids = encode_into(array)
        array.flush()
        if dtype != "float32":
            _check_finite(array)
        if ids is not None and len(ids) < shape[0]:
            shape = (len(ids), *shape[1:])
            _keep_rows(staging / EMBEDDINGS_FILE, array, len(ids))
        del array
        extra: dict[str, Any] = {}
        if ids is not None:
            payload = json.dumps(list(ids), ensure_ascii=False).encode("utf-8")
            atomic_write_bytes(staging / IDS_FILE, payload)
            extra["ids"] = {"file": IDS_FILE, "sha256": sha256_bytes(payload), "count": len(ids)}
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
                "dtype": dtype,
            },
            **extra,
            **details,
            "itmrt_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(staging / GALLERY_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _check_target(target, overwrite)
        publish_folder(staging, target, "replace")
    return read_gallery(target)


def _check_finite(array: np.ndarray, block: int = 4096) -> None:
    """Refuse embeddings that overflowed a narrower storage type (read in blocks: a memmap)."""
    for start in range(0, len(array), block):
        if not np.isfinite(array[start : start + block]).all():
            raise ItmrtError(f"image embeddings from row {start} do not fit {array.dtype} storage; "
                             "index with --dtype float32")


def _keep_rows(path: Path, array: np.ndarray, rows: int, block: int = 4096) -> None:
    """Rewrite the ``.npy`` at ``path`` (open as ``array``) with its first ``rows`` rows only."""
    smaller = path.with_name(path.name + ".rows")
    kept = np.lib.format.open_memmap(smaller, mode="w+", dtype=array.dtype, shape=(rows, *array.shape[1:]))
    for start in range(0, rows, block):
        kept[start : start + block] = array[start : min(start + block, rows)]
    kept.flush()
    del kept
    os.replace(smaller, path)


def load_features(path: str | Path) -> np.ndarray:
    """A float32 ``.npy`` features file, memory-mapped (one-line errors for unreadable files)."""
    source = Path(path)
    features = open_npy(source, "features")
    if features.dtype not in (np.float32, np.float16, np.float64):
        raise DataError(f"features file {source} has dtype {features.dtype}; expected float32")
    return features
