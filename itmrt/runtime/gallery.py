"""Galleries: image embeddings computed once, stored as ``.npy`` and memory-mapped on load.

A gallery folder holds ``image_embeddings.npy`` (float32, or float16 to halve
its size - scorers upcast one tile at a time; ``images x regions x d``, or
``images x D`` for global models) and ``gallery.json``
(:mod:`itmrt.bundle.gallery_manifest`, typed and checked on read), which ties
it to the bundle whose image encoder made it (the sha256 of that bundle's
``manifest.json``): searching a gallery with a different bundle is refused,
since its embeddings live in another model's space. A gallery indexed from
image files also holds ``image_ids.json``: each row's image id (its path as
listed), by which results name images.

The gallery is a closed world: every file it names lies inside its folder, and
the embeddings are verified when the gallery is opened - one streamed pass
that hashes the file against its sha256 and checks every value is finite (a
1 GB gallery: ``benchmarks/bench_gallery_verify.py``). A process verifies a
file once while the file's size, mtime, ctime and inode stay the same.

The folder is written under a hidden temporary name and renamed into place,
``gallery.json`` last, so an interrupted ``itmrt index`` leaves nothing that
looks like a gallery. A *sharded* gallery (:mod:`itmrt.scale`) is a folder of
such galleries under one ``gallery.json`` of kind ``itmrt-sharded-gallery``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.bundle.closed import member, verified_member
from itmrt.bundle.folder import BundleInfo, is_bundle, read_bundle
from itmrt.bundle.gallery_manifest import (
    EMBEDDINGS_FILE,
    GALLERY_KIND,
    GALLERY_MANIFEST,
    GALLERY_SCHEMA,
    IDS_FILE,
    REMEDY,
    SHARDED_GALLERY_KIND,
    STORAGE_DTYPES,
    EmbeddingsEntry,
    GalleryBundle,
    GalleryManifest,
    IdsEntry,
    gallery_manifest_text,
    image_encoder_identity,
    read_gallery_manifest,
    recorded_bundle,
)
from itmrt.bundle.names import MANIFEST_NAME
from itmrt.data.npy import NpyHeader, open_npy, read_npy_copy, read_npy_header
from itmrt.documents import as_path, open_regular, parse_json, read_regular_bytes, sha256_bytes, sha256_file
from itmrt.errors import DataError, ItmrtError
from itmrt.file_states import FINITE_EMBEDDINGS, file_state, hash_started
from itmrt.publish import atomic_write_bytes, atomic_write_text, check_output_folder, publish_folder, staged_folder
from itmrt.runtime.compact_regions import CompactRegions, codes_fit

__all__ = ["EMBEDDINGS_FILE", "GALLERY_KIND", "GALLERY_MANIFEST", "GALLERY_SCHEMA", "IDS_FILE", "SHARDED_GALLERY_KIND",
           "STORAGE_DTYPES", "EmbeddingsStore", "Gallery", "gallery_bundle", "gallery_source",
           "is_gallery", "load_features", "read_gallery", "verify_embeddings", "write_gallery"]

@dataclass
class Gallery:
    """A gallery folder: memory-mapped image embeddings and their manifest."""

    path: Path
    embeddings: np.ndarray
    manifest: GalleryManifest

    ids: list[str] | None = None  # image ids (paths) of a gallery indexed from image files

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def bundle_path(self) -> Path:
        return Path(self.manifest.bundle.path)

    def check_bundle(self, bundle: BundleInfo) -> None:
        """Refuse a bundle other than the one that made this gallery."""
        check_made_with(self.path, self.manifest.bundle, bundle)


def check_made_with(gallery: Path, recorded: GalleryBundle, bundle: BundleInfo) -> None:
    """Refuse ``bundle`` unless its image encoder made the gallery's embeddings (the same graph and weights,
    inputs and outputs, preprocessing: :func:`image_encoder_identity`); engines, precision variants and
    calibration added to the bundle since do not matter. A gallery made before the identity was recorded
    needs the very manifest it was made with. ``recorded``: the gallery document's ``bundle`` entry (a sharded
    gallery's top document holds one too)."""
    if recorded.manifest_sha256 == bundle.manifest_sha256:
        return
    if recorded.image_encoder_sha256 is None:
        raise ItmrtError(
            f"gallery {gallery} was made with another bundle, or before {bundle.path}'s manifest changed, and does "
            f"not record which image encoder made it; re-index it with `itmrt index {bundle.path}`"
        )
    identity = image_encoder_identity(bundle.manifest)
    if recorded.image_encoder_sha256 != identity:
        raise ItmrtError(
            f"gallery {gallery} was made with another bundle's image encoder (identity "
            f"{recorded.image_encoder_sha256[:12]}..., not {identity[:12]}... of {bundle.path}); re-index it with "
            f"`itmrt index {bundle.path}`"
        )


def is_gallery(folder: str | Path) -> bool:
    try:
        return member(Path(folder), GALLERY_MANIFEST, "gallery", REMEDY).is_file()
    except ItmrtError:
        return True  # a gallery.json that leads outside: reading it reports why


def verify_embeddings(path: Path, entry: EmbeddingsEntry, chunk_size: int = 4 << 20) -> None:
    """One streamed pass over the embeddings file: its sha256 must be the recorded one and every value
    finite. A one-line :class:`ItmrtError` otherwise."""
    header = read_npy_header(path, "gallery embeddings")
    FINITE_EMBEDDINGS.check(path, entry.sha256, lambda: _hash_and_check_finite(path, header, entry, chunk_size))


def _hash_and_check_finite(path: Path, header: NpyHeader, entry: EmbeddingsEntry, chunk_size: int) -> None:
    """The pass of :func:`verify_embeddings`: the file's sha256 against ``entry``'s, and every value finite."""
    digest, position, first_bad, carry = hashlib.sha256(), 0, None, b""
    itemsize = header.dtype.itemsize
    with open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
            data = carry + chunk[max(header.data_offset - position, 0):] if carry else \
                memoryview(chunk)[max(header.data_offset - position, 0):]
            whole = len(data) - len(data) % itemsize
            carry = bytes(data[whole:])
            if first_bad is None and not np.isfinite(np.frombuffer(data[:whole], dtype=header.dtype)).all():
                first_bad = position
            position += len(chunk)
    if digest.hexdigest() != entry.sha256:
        raise ItmrtError(f"{path} does not match the sha256 in {GALLERY_MANIFEST} (changed after indexing); {REMEDY}")
    if first_bad is not None:
        raise ItmrtError(f"{path} holds NaN or infinite embeddings (in the block at byte {first_bad}); {REMEDY}")


def _fortran_order(path: Path) -> ItmrtError:
    return ItmrtError(f"{path} stores its array in Fortran order, which itmrt never writes; {REMEDY}")


def copy_embeddings(path: Path, entry: EmbeddingsEntry, chunk_size: int = 4 << 20) -> np.ndarray:
    """The embeddings file read into memory of this process in one pass that also hashes it and checks every
    value is finite: the array is exactly the bytes that matched the sha256, and nothing done to the file later
    (truncated, changed in place, deleted) reaches it. A one-line :class:`ItmrtError` otherwise.

    A file verified already (:func:`verify_embeddings`, :mod:`itmrt.file_states`) is only read, when its state
    is the same before and after the read (a write in between changes its ctime)."""
    header = read_npy_header(path, "gallery embeddings")
    started, before = hash_started(), file_state(path, entry.sha256)
    if header.fortran_order:
        raise _fortran_order(path)
    if list(header.shape) != list(entry.shape) or header.dtype != np.dtype(entry.dtype):
        raise ItmrtError(f"{path} has shape {header.shape} / {header.dtype}, not what {GALLERY_MANIFEST} says; "
                         f"{REMEDY}")
    array = np.empty(header.shape, dtype=header.dtype)
    view = array.reshape(-1).view(np.uint8).data
    known = FINITE_EMBEDDINGS.known(before)
    digest, position = hashlib.sha256(), 0
    try:
        with open_regular(path) as handle:
            digest.update(handle.read(header.data_offset))
            while position < len(view):
                got = handle.readinto(view[position : position + chunk_size])
                if not got:
                    raise ItmrtError(f"{path} ended after {position} of {len(view)} bytes of embeddings (truncated "
                                     f"while it was read); {REMEDY}")
                if not known:
                    digest.update(view[position : position + got])
                position += got
            for rest in iter(lambda: handle.read(chunk_size), b""):
                digest.update(rest)
    except OSError as exc:
        raise ItmrtError(f"cannot read {path} ({exc.strerror or type(exc).__name__}); {REMEDY}") from None
    unchanged = file_state(path, entry.sha256) == before
    if known and unchanged:
        array.flags.writeable = False
        return array
    if known:  # changed while it was read: hash what was read
        digest = hashlib.sha256()
        with open_regular(path) as handle:
            digest.update(handle.read(header.data_offset))
        digest.update(view)
    if digest.hexdigest() != entry.sha256:
        raise ItmrtError(f"{path} does not match the sha256 in {GALLERY_MANIFEST} (changed after indexing); {REMEDY}")
    rows = max(1, (chunk_size // max(array[:1].nbytes, 1)))
    for start in range(0, len(array), rows):
        if not np.isfinite(array[start : start + rows]).all():
            raise ItmrtError(f"{path} holds NaN or infinite embeddings (from image {start}); {REMEDY}")
    if unchanged:
        FINITE_EMBEDDINGS.remember(before, started)
    array.flags.writeable = False
    return array


def read_gallery(folder: str | Path, verify: bool = True, in_memory: bool = False,
                 compact_in_memory: bool | None = None, residual_rows: Callable[[Path], Any] | None = None
                 ) -> Gallery:
    """Open a gallery (embeddings memory-mapped, after :func:`verify_embeddings` unless ``verify`` is False -
    for a gallery this process has just written). ``in_memory``: the embeddings are copied into this process's
    memory as they are verified (:func:`copy_embeddings`) - what a long-running service does, so that the file
    can change or vanish under it without effect (a memory map would die by SIGBUS on a truncated file).
    ``compact_in_memory`` (default: ``in_memory``): the same for compact storage's files alone;
    ``residual_rows``: see :func:`open_compact_regions`."""
    root = as_path(folder, "the gallery")
    manifest, _sha256 = read_gallery_manifest(root)
    entry = manifest.embeddings
    path = member(root, entry.file, "gallery", REMEDY)
    if not path.is_file():
        raise ItmrtError(f"gallery {root} lacks {entry.file}; {REMEDY}")
    embeddings: Any
    if entry.stored == "region_index":
        embeddings = open_compact_regions(root, manifest, verify,
                                          in_memory if compact_in_memory is None else compact_in_memory,
                                          residual_rows)
    elif in_memory:
        embeddings = copy_embeddings(path, entry)
    else:
        if verify:
            verify_embeddings(path, entry)
        embeddings = open_npy(path, "gallery embeddings")
        if np.isfortran(embeddings):  # as copy_embeddings: itmrt infer and itmrt serve open the same galleries
            raise _fortran_order(path)
        if embeddings.dtype != np.dtype(entry.dtype):
            raise ItmrtError(f"{path} holds {embeddings.dtype}, not the {entry.dtype} {GALLERY_MANIFEST} says; "
                             f"{REMEDY}")
    if list(embeddings.shape) != list(entry.shape):
        raise ItmrtError(f"{path} has shape {embeddings.shape}, not what {GALLERY_MANIFEST} says; {REMEDY}")
    ids = _read_ids(root, manifest.ids, len(embeddings)) if manifest.ids is not None else None
    return Gallery(root, embeddings, manifest, ids)


def open_compact_regions(root: Path, manifest: GalleryManifest, verify: bool = True,
                         in_memory: bool = False, residual_rows: Callable[[Path], Any] | None = None
                         ) -> CompactRegions:
    """The embeddings of a gallery stored compactly (``--regions-storage compact``): decoded on demand from its
    region index's centroids, codes and packed residuals (each checked against its sha256). ``in_memory``: the
    files are copied by positional reads and the copies verified (:func:`read_npy_copy`), never mapped.
    ``residual_rows``: the packed residuals (9 KB an image at 2 bits, 90% of the bytes: 9 GB at 1M images) are
    not copied but verified in place and handed to this factory (a shard's reader by position, which reads the
    rows a search decodes), so that memory holds the centroids, codes and lists alone."""
    index = manifest.region_index
    assert index is not None and index.residuals is not None and index.buckets is not None  # value_problem
    listed = manifest.files()
    arrays = {}
    for role, item in (("centroids", index.centroids), ("codes", index.codes), ("residuals", index.residuals),
                       ("buckets", index.buckets), ("bits", index.bits)):
        if item is None:  # bits: absent before they were allocated per dimension
            continue
        by_position = residual_rows if role == "residuals" else None
        if in_memory and by_position is None:
            path, sha256 = member(root, item.file, "gallery", REMEDY), listed.get(item.file) if verify else None
            if verify and sha256 is None:
                raise ItmrtError(f"gallery {root} uses {item.file}, which its file list does not hold with a sha256; "
                                 f"{REMEDY}")
            arrays[role] = read_npy_copy(path, f"compact regions ({role})", sha256, REMEDY)
            continue
        path = verified_member(root, item.file, listed, "gallery", REMEDY) if verify else root / item.file
        arrays[role] = by_position(path) if by_position is not None else open_npy(path, f"compact regions ({role})")
    centroids, buckets = np.asarray(arrays["centroids"]), np.asarray(arrays["buckets"])
    if not np.isfinite(centroids).all() or ("bits" not in arrays and not np.isfinite(buckets).all()):
        raise ItmrtError(f"gallery {root}: its region centroids or residual buckets are not finite; {REMEDY}")
    if centroids.ndim != 2 or buckets.ndim != 2 or buckets.shape[0] != centroids.shape[1] \
            or arrays["codes"].ndim != 2:
        raise ItmrtError(f"gallery {root}: its compact region files do not fit together; {REMEDY}")
    if not codes_fit(np.asarray(arrays["codes"]), len(centroids)):
        raise ItmrtError(f"gallery {root}: its region codes are not ids of its {len(centroids)} centroids; {REMEDY}")
    bits = np.asarray(arrays["bits"]) if "bits" in arrays else None
    if bits is not None and (bits.dtype != np.uint8 or bits.shape != (centroids.shape[1],)):
        raise ItmrtError(f"gallery {root}: its residual bits are not one uint8 per dimension; {REMEDY}")
    regions = CompactRegions(centroids, arrays["codes"], arrays["residuals"], buckets, bits)
    if arrays["residuals"].shape[-1] != regions.codec.packed_width(int(centroids.shape[1])) \
            or np.dtype(arrays["residuals"].dtype) != np.uint8:
        raise ItmrtError(f"gallery {root}: its packed residuals do not fit its residual bits; {REMEDY}")
    return regions


def _read_ids(root: Path, entry: IdsEntry, rows: int) -> list[str]:
    path = member(root, entry.file, "gallery", REMEDY)
    try:
        raw = read_regular_bytes(path)
    except OSError as exc:
        raise ItmrtError(f"cannot read the image ids {path} ({exc.strerror}); {REMEDY}") from None
    if sha256_bytes(raw) != entry.sha256:
        raise ItmrtError(f"{path} does not match the sha256 in {GALLERY_MANIFEST}; {REMEDY}")
    try:
        ids = parse_json(raw)
    except (ValueError, RecursionError) as exc:
        raise ItmrtError(f"cannot read the image ids {path} ({type(exc).__name__}); {REMEDY}") from None
    if not isinstance(ids, list) or len(ids) != rows or not all(isinstance(x, str) for x in ids):
        raise ItmrtError(f"{path} does not hold one image id per embedding row ({rows}); {REMEDY}")
    return ids


def gallery_bundle(folder: str | Path) -> BundleInfo:
    """The bundle that made the gallery at ``folder``, found where ``gallery.json`` says it was.

    That path is the one a gallery names outside itself, so nothing there is used until the
    bundle's ``manifest.json`` hashes to the recorded sha256.
    """
    recorded = recorded_bundle(folder)
    bundle = Path(recorded.path)
    hint = f"give the bundle and the gallery: `itmrt infer BUNDLE --gallery {folder}`"
    if not (bundle / MANIFEST_NAME).is_file():  # looked at, not opened: it may be anything
        raise ItmrtError(f"gallery {folder} was made with the bundle {bundle}, which is not there any more; {hint}")
    try:
        found = sha256_file(member(bundle, MANIFEST_NAME, "bundle", "export it again"))
    except OSError as exc:
        raise ItmrtError(f"cannot read {bundle / MANIFEST_NAME} ({exc.strerror}); {hint}") from None
    if found == recorded.manifest_sha256:
        return read_bundle(bundle)
    if recorded.image_encoder_sha256 is None:  # an older gallery: only its own manifest is known to fit
        raise ItmrtError(f"the bundle at {bundle} is not the one gallery {folder} was made with (its manifest "
                         f"changed, and the gallery predates image-encoder records); re-index the gallery with "
                         f"`itmrt index {bundle}`")
    opened = read_bundle(bundle)  # parsed and checked like any bundle; its files are verified when they are used
    if image_encoder_identity(opened.manifest) != recorded.image_encoder_sha256:
        raise ItmrtError(f"the bundle at {bundle} has another image encoder than the one that made gallery "
                         f"{folder}; re-index the gallery with `itmrt index {bundle}`")
    return opened


def gallery_source(
    source: str | Path, gallery: str | Path | None = None, expected: str = "a bundle folder or a gallery folder"
) -> tuple[Path, Path | None]:
    """(bundle, gallery or None) from a source that is a gallery (its bundle is the one that made it) or a
    bundle with an optional separate ``gallery``; ``expected`` names the accepted sources in the errors."""
    source = Path(source)
    if is_gallery(source):
        if gallery is not None:
            raise ItmrtError("give either a gallery as the source or --gallery, not both")
        return gallery_bundle(source).path, source
    if is_bundle(source) or (source / MANIFEST_NAME).is_file():  # a damaged manifest: reading it says how
        return source, None if gallery is None else Path(gallery)
    if not source.exists():
        raise ItmrtError(f"{source} does not exist; give {expected}")
    raise ItmrtError(f"{source} is not {expected}")


def _check_target(out: Path, overwrite: bool) -> None:
    check_output_folder(out, overwrite, "gallery", is_gallery)


EmbeddingsStore = Callable[[Path, np.ndarray], tuple[EmbeddingsEntry, dict[str, Any]]]
"""``store(staging, embeddings)`` writes files of its own into the staging folder from the checked embeddings (in
memory, the rows kept) and returns the document's embeddings entry and its further fields: compact region storage
(:mod:`itmrt.scale.region_files`) builds its index this way without writing the dense embeddings first."""


def write_gallery(
    out: str | Path,
    bundle: BundleInfo,
    encode_into: Callable[[np.ndarray], Sequence[str] | None],
    shape: tuple[int, ...],
    details: dict[str, Any],
    overwrite: bool = False,
    dtype: str = "float32",
    store: EmbeddingsStore | None = None,
    given: np.ndarray | None = None,
) -> Gallery:
    """Create a gallery at ``out``: ``encode_into(array)`` fills a ``.npy`` memmap of ``shape`` and ``dtype``.

    ``encode_into`` may return the image ids of the rows it filled, in order: the
    gallery then keeps them (``image_ids.json``), and only those rows when there
    are fewer ids than rows (images skipped as unreadable). ``details``: the
    ``backend``, ``precision`` and ``source`` the document records. ``store``:
    keep the embeddings another way than as a ``.npy`` (:data:`EmbeddingsStore`);
    ``encode_into`` then fills an array in memory, or ``given``, embeddings
    already checked and in ``dtype``, go to ``store`` as they are (no copy).
    """
    target = as_path(out, "out (the gallery folder to create)")
    if dtype not in STORAGE_DTYPES:
        raise ItmrtError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, not {dtype!r}")
    _check_target(target, overwrite)
    with staged_folder(target) as staging:
        if store is not None:
            embeddings, further, ids = _store_in_memory(staging, encode_into, shape, dtype, store, given)
        else:
            ids = _write_npy(staging, encode_into, shape, dtype)
            if ids is not None and len(ids) < shape[0]:
                shape = (len(ids), *shape[1:])
            embeddings, further = EmbeddingsEntry(file=EMBEDDINGS_FILE, sha256=sha256_file(staging / EMBEDDINGS_FILE),
                                                  shape=list(shape), dtype=dtype), {}
        ids_entry = None
        if ids is not None:
            payload = json.dumps(list(ids), ensure_ascii=False).encode("utf-8")
            atomic_write_bytes(staging / IDS_FILE, payload)
            ids_entry = IdsEntry(file=IDS_FILE, sha256=sha256_bytes(payload), count=len(ids))
        manifest = GalleryManifest(
            bundle=GalleryBundle(path=str(bundle.path.resolve()), manifest_sha256=bundle.manifest_sha256,
                                 family=bundle.family, image_encoder_sha256=image_encoder_identity(bundle.manifest)),
            embeddings=embeddings,
            ids=ids_entry, backend=details.get("backend"), precision=details.get("precision"),
            source=details.get("source"), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **further,
        )
        atomic_write_text(staging / GALLERY_MANIFEST, gallery_manifest_text(manifest))
        _check_target(target, overwrite)
        publish_folder(staging, target, "replace" if overwrite else "refuse")
    return read_gallery(target, verify=False)


def _write_npy(staging: Path, encode_into: Callable[[np.ndarray], Sequence[str] | None], shape: tuple[int, ...],
               dtype: str) -> Sequence[str] | None:
    """Fill the gallery's ``.npy`` (a memmap in ``staging``) by ``encode_into``; the ids it returned."""
    array = allocated_memmap(staging / EMBEDDINGS_FILE, dtype, shape)
    ids = encode_into(array)
    array.flush()
    if dtype != "float32":
        _check_finite(array)
    if ids is not None and len(ids) < shape[0]:
        _keep_rows(staging / EMBEDDINGS_FILE, array, len(ids))
    return ids


def _store_in_memory(staging: Path, encode_into: Callable[[np.ndarray], Sequence[str] | None],
                     shape: tuple[int, ...], dtype: str, store: EmbeddingsStore, given: np.ndarray | None = None
                     ) -> tuple[EmbeddingsEntry, dict[str, Any], Sequence[str] | None]:
    """Fill an array in memory by ``encode_into`` (or take ``given``, checked already) and hand its kept rows to
    ``store``: the document's embeddings entry and further fields, and the ids ``encode_into`` returned."""
    if given is not None:
        if given.dtype != np.dtype(dtype) or tuple(given.shape) != tuple(shape):
            raise ItmrtError(f"embeddings of {given.dtype} {tuple(given.shape)} given where {dtype} {shape} is stored")
        entry, further = store(staging, given)
        return entry, further, None
    scratch = staging / SCRATCH_FILE
    on_disk = int(np.prod(shape)) * np.dtype(dtype).itemsize > memory_for_scratch()
    array = allocated_memmap(scratch, dtype, shape) if on_disk else np.empty(shape, dtype=dtype)
    ids = encode_into(array)
    kept = array if ids is None or len(ids) >= shape[0] else array[: len(ids)]
    if len(kept) == 0:  # every image unreadable: an empty gallery, as without a store (a sharded writer drops it)
        del array, kept
        scratch.unlink(missing_ok=True)
        empty = np.empty((0, *shape[1:]), dtype=dtype)
        np.save(staging / EMBEDDINGS_FILE, empty, allow_pickle=False)
        return EmbeddingsEntry(file=EMBEDDINGS_FILE, sha256=sha256_file(staging / EMBEDDINGS_FILE),
                               shape=list(empty.shape), dtype=dtype), {}, ids
    if dtype != "float32":
        _check_finite(kept)
    entry, further = store(staging, kept)
    del array, kept
    scratch.unlink(missing_ok=True)
    return entry, further, ids


SCRATCH_FILE = ".embeddings-scratch.npy"
"""Where a store's embeddings are encoded when they would not fit in memory: a memory-mapped file in the staging
folder (the page cache can write it out), never hashed or listed, deleted before the folder is published."""


def memory_for_scratch() -> int:
    """Bytes of embeddings a store may hold in memory: half of what the system says is available (``MemAvailable``
    on Linux; elsewhere the free physical pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError, AttributeError):
        return 1 << 30


def allocated_memmap(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` memmap whose disk blocks are reserved before it is written: a full disk is an OSError
    here (one line, the staging folder removed) instead of a SIGBUS on the first page that finds no block."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: written as before
        return array
    handle = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(handle, 0, os.fstat(handle).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: write as before
            del array
            raise
    finally:
        os.close(handle)
    return array


def check_encoded_rows(embeddings: np.ndarray, inputs: np.ndarray | None = None, first: int = 0,
                       block: int = 1024) -> None:
    """Refuse image embeddings that are not finite, or all zero where the input row was not (an encoder that
    overflowed float32 and normalised the infinities away): a one-line :class:`ItmrtError` naming the rows
    (``first``: the number of the first row, for messages about a part of a larger input)."""
    bad: list[int] = []
    for start in range(0, len(embeddings), block):
        rows = np.asarray(embeddings[start : start + block]).reshape(min(block, len(embeddings) - start), -1)
        broken = ~np.isfinite(rows).all(axis=1)
        if inputs is not None:
            given = np.asarray(inputs[start : start + block]).reshape(len(rows), -1)
            broken |= ~rows.any(axis=1) & given.any(axis=1)
        bad.extend((start + np.flatnonzero(broken)).tolist())
        if len(bad) > 10:
            break
    if bad:
        shown = ", ".join(str(first + row) for row in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ItmrtError(f"the image encoder gave embeddings that are not finite or are all zero for non-zero "
                         f"input (image {shown}); check the inputs' scale (region features must be finite and "
                         f"of the model's range)")


def _check_finite(array: np.ndarray, block: int = 4096) -> None:
    """Refuse embeddings that overflowed a narrower storage type (read in blocks: a memmap)."""
    for start in range(0, len(array), block):
        if not np.isfinite(array[start : start + block]).all():
            raise ItmrtError(f"image embeddings from row {start} do not fit {array.dtype} storage; "
                             "index with --dtype float32")


def _keep_rows(path: Path, array: np.ndarray, rows: int, block: int = 4096) -> None:
    """Rewrite the ``.npy`` at ``path`` (open as ``array``) with its first ``rows`` rows only."""
    smaller = path.with_name(path.name + ".rows")
    kept = allocated_memmap(smaller, array.dtype, (rows, *array.shape[1:]))
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
