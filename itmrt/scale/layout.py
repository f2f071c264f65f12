"""A sharded gallery on disk: one ``gallery.json`` listing shards, each shard an ordinary gallery folder.

::

    GALLERY/
      gallery.json              kind itmrt-sharded-gallery: the bundle, dtype, and per shard its folder,
                                first row, image count and the sha256 of its gallery.json
      shard-00000/gallery.json  an itmrt gallery (tied to the bundle's image encoder), plus the
                                shard's shortlist: its global vectors and their FAISS index, each with sha256
      shard-00000/image_embeddings.npy   float32 or float16, memory-mapped
      shard-00000/global_vectors.npy     float32 [images, d] (cross-attention bundles)
      shard-00000/shortlist.faiss        the FAISS index of those vectors (unless --shortlist-index none)
      shard-00000/image_ids.json         image ids, when indexed from image files
      shard-00001/...

Image ``first + r`` of the whole gallery is row ``r`` of the shard whose rows
start at ``first``. Every name a document gives is a plain name inside its
folder; the hashes chain the top document to each shard's document and that to
its files (the embeddings and global vectors are hashed when a shard is opened,
once per process and file, as any gallery's are), so a shard cannot be swapped
or edited without the gallery noticing.
A shard is never rewritten: appending adds shard folders and replaces the top
document in one rename.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from itmrt.bundle.closed import verified_member
from itmrt.bundle.gallery_manifest import REMEDY, GalleryBundle, parse_sharded_document, same_image_encoder
from itmrt.data.npy import open_npy, read_npy_copy
from itmrt.documents import as_path, parse_json, read_json_document, read_regular_bytes
from itmrt.errors import ItmrtError, first_line
from itmrt.runtime.gallery import (
    GALLERY_MANIFEST,
    GALLERY_SCHEMA,
    SHARDED_GALLERY_KIND,
    Gallery,
    check_made_with,
    read_gallery,
)

if TYPE_CHECKING:
    from itmrt.runtime.bundle import BundleInfo

SHARD_PREFIX = "shard-"
VECTORS_FILE = "global_vectors.npy"
INDEX_FILE = "shortlist.faiss"
SHORTLIST_KEY = "shortlist"
"""The entry of a shard's ``gallery.json`` that records its global vectors and index."""


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}{number:05d}"


def is_sharded_gallery(folder: str | Path) -> bool:
    """Whether ``folder`` holds a sharded gallery's document (cheap: reads only its ``kind``)."""
    path = Path(folder) / GALLERY_MANIFEST
    if path.is_symlink() or not path.is_file():  # a linked document is refused when the gallery is read
        return False
    try:
        document = parse_json(read_regular_bytes(path))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(document, dict) and document.get("kind") == SHARDED_GALLERY_KIND


@dataclass(frozen=True)
class ShardRecord:
    """One shard as the top document lists it."""

    name: str
    first: int  # the gallery row of the shard's row 0
    images: int
    sha256: str  # of the shard's gallery.json

    @property
    def rows(self) -> str:
        return f"images {self.first}..{self.first + self.images - 1}"

    def describe(self) -> str:
        return f"shard {self.name} ({self.rows})"


@dataclass
class ShardedGallery:
    """A sharded gallery's top document, read and checked (the shards themselves open with :func:`open_shard`)."""

    path: Path
    manifest: dict[str, Any]
    shards: list[ShardRecord]
    recorded: GalleryBundle  # the top document's ``bundle`` entry, type-checked
    _ids: ShardedIds | None = field(default=None, repr=False)
    sha256: str = ""  # of the top document as it was read (names the version ``itmrt serve`` answers from)

    def __len__(self) -> int:
        return sum(shard.images for shard in self.shards)

    @property
    def bundle_path(self) -> Path:
        return Path(self.manifest["bundle"]["path"])

    @property
    def bundle_sha256(self) -> str:
        return str(self.manifest["bundle"]["manifest_sha256"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def ids(self) -> ShardedIds | None:
        """Each image's id (its path) for galleries indexed from image files, read shard by shard when asked."""
        if not self.manifest.get("ids"):
            return None
        if self._ids is None:
            self._ids = ShardedIds(self)
        return self._ids

    def check_bundle(self, bundle: BundleInfo) -> None:
        """Refuse a bundle whose image encoder did not make this gallery (the rule of one-folder galleries:
        :func:`itmrt.runtime.gallery.check_made_with`; engines or calibration added since do not matter)."""
        check_made_with(self.path, self.recorded, bundle)


class ShardedIds(Sequence[str]):
    """The image ids of a sharded gallery as one sequence; each shard's ids are read on first use."""

    def __init__(self, gallery: ShardedGallery) -> None:
        self.gallery = gallery
        self.firsts = [shard.first for shard in gallery.shards]
        self.loaded: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.gallery)

    def __getitem__(self, row: Any) -> Any:
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(len(self)))]
        row = int(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(row)
        number = bisect.bisect_right(self.firsts, row) - 1
        if number not in self.loaded:
            shard = read_shard_gallery(self.gallery, self.gallery.shards[number])
            if shard.ids is None:
                raise ItmrtError(f"{shard.path} has no image ids but {self.gallery.path} says it should; re-index it")
            self.loaded[number] = shard.ids
        return self.loaded[number][row - self.firsts[number]]


def read_sharded_gallery(folder: str | Path) -> ShardedGallery:
    """Read and check a sharded gallery's top document (one-line errors naming what is wrong)."""
    root = as_path(folder, "the gallery")
    path = root / GALLERY_MANIFEST
    if not path.is_file():
        raise ItmrtError(f"{root} is not an itmrt gallery (no {GALLERY_MANIFEST}); make one with `itmrt index`")
    manifest, raw = read_json_document(path, (SHARDED_GALLERY_KIND,), GALLERY_SCHEMA, "sharded gallery",
                                       "re-index the gallery")
    document = parse_sharded_document(manifest, path, "re-index the gallery")
    shards = [ShardRecord(s.name, s.first, s.images, s.sha256) for s in document.shards]
    expected_first = 0
    for shard in shards:
        member(root, shard.name)
        if shard.first != expected_first or shard.images < 1:
            raise ItmrtError(f"{path}: {shard.name} starts at row {shard.first} with {shard.images} images, not at "
                             f"row {expected_first}; re-index the gallery")
        expected_first += shard.images
    return ShardedGallery(root, manifest, shards, document.bundle, sha256=hashlib.sha256(raw).hexdigest())


def member(root: Path, name: Any) -> Path:
    """A name a gallery document gives: a plain name inside ``root`` (not a link), nothing else."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ItmrtError(f"{root / GALLERY_MANIFEST} names {name!r}, not a name inside the gallery; "
                         "re-index the gallery")
    path = root / name
    if path.is_symlink():  # a link could lead anywhere: a gallery holds its own files
        raise ItmrtError(f"{path} is a symbolic link, not a file of the gallery; re-index the gallery")
    return path


def read_shard_gallery(gallery: ShardedGallery, shard: ShardRecord, verify: bool = True,
                       in_memory: bool = False, compact_in_memory: bool | None = None,
                       residual_rows: Callable[[Path], Any] | None = None) -> Gallery:
    """A shard's own gallery, checked against the top document: its document's sha256, bundle, rows, dtype;
    ``in_memory``: its embeddings copied into memory as they are verified (as :func:`read_gallery` does;
    ``compact_in_memory`` for compact storage's files alone; ``residual_rows``: see
    :func:`itmrt.runtime.gallery.open_compact_regions`)."""
    folder = member(gallery.path, shard.name)
    document = folder / GALLERY_MANIFEST
    try:
        digest = hashlib.sha256(read_regular_bytes(document)).hexdigest()
    except OSError as exc:
        raise ItmrtError(f"{shard.describe()} of {gallery.path} cannot be read ({first_line(exc)}); "
                         "re-index the gallery") from None
    if digest != shard.sha256:
        raise ItmrtError(f"{document} does not match the sha256 that {gallery.path / GALLERY_MANIFEST} records; "
                         "re-index the gallery")
    opened = read_gallery(folder, verify=verify, in_memory=in_memory, compact_in_memory=compact_in_memory,
                          residual_rows=residual_rows)
    if not same_image_encoder(opened.manifest.bundle, gallery.recorded):
        raise ItmrtError(f"{folder} was made with another image encoder than the rest of {gallery.path}; "
                         "re-index it")
    if len(opened) != shard.images or opened.manifest.embeddings.dtype != gallery.dtype:
        raise ItmrtError(f"{folder} holds {len(opened)} {opened.embeddings.dtype} rows, not the {shard.images} "
                         f"{gallery.dtype} rows {gallery.path / GALLERY_MANIFEST} lists; re-index the gallery")
    item_shape = gallery.manifest.get("item_shape")
    if item_shape is not None and list(opened.embeddings.shape[1:]) != list(item_shape):
        raise ItmrtError(f"{folder} holds items of shape {list(opened.embeddings.shape[1:])}, not the {item_shape} "
                         f"{gallery.path / GALLERY_MANIFEST} records; re-index the gallery")
    return opened


def shard_vectors(shard: Gallery, verify: bool = True, in_memory: bool = False) -> np.ndarray | None:
    """A shard's global vectors (memory-mapped; ``in_memory``: copied by positional reads, the copy verified),
    or None where it has none (global models)."""
    shortlist = shard.manifest.shortlist
    if shortlist is None:
        return None
    entry = shortlist.vectors
    if entry.made_from != shard.manifest.embeddings.sha256:
        raise ItmrtError(f"{shard.path}: its global vectors were not made from its embeddings; re-index the gallery")
    path = member(shard.path, entry.file)
    if in_memory:
        vectors = read_npy_copy(path, "shard global vectors", entry.sha256 if verify else None, REMEDY)
    else:
        if verify:  # hashed once per process while the file stays as it was
            verified_member(shard.path, entry.file, {entry.file: entry.sha256}, "gallery", REMEDY)
        vectors = open_npy(path, "shard global vectors")
    if vectors.dtype != np.float32 or vectors.shape != (len(shard), shard.embeddings.shape[-1]):
        raise ItmrtError(f"{path} has shape {vectors.shape} / {vectors.dtype}, not one float32 vector per image; "
                         "re-index the gallery")
    return vectors


def shard_bytes(gallery: ShardedGallery) -> int:
    """The bytes of every file in the gallery's shard folders (what copying them into memory would take, about)."""
    total = 0
    for shard in gallery.shards:
        folder = member(gallery.path, shard.name)
        try:
            total += sum(entry.stat().st_size for entry in folder.iterdir()
                         if entry.is_file() and not entry.is_symlink())
        except OSError as exc:  # a shard folder removed or replaced by a file: FileNotFoundError from listdir
            raise ItmrtError(f"cannot read shard folder {folder} ({exc.strerror or first_line(exc)}); "
                             f"{GALLERY_MANIFEST} lists it: restore it or re-index the gallery") from None
    return total


def index_record(shard: Gallery) -> dict[str, Any] | None:
    """The shard's FAISS index record (checked to be built from its vectors), or None when it has none."""
    shortlist = shard.manifest.shortlist
    if shortlist is None or shortlist.index is None:
        return None
    if shortlist.index.built_from != shortlist.vectors.sha256:
        raise ItmrtError(f"{shard.path}: its shortlist index was not built from its global vectors; re-index it")
    return shortlist.index.to_json()
