"""Writing sharded galleries: a new one built whole and renamed into place, or new shards appended to one.

:class:`ShardedWriter` takes shards one at a time - each written by a callback
as an ordinary gallery folder (:meth:`itmrt.runtime.Runtime.index`, or
:func:`itmrt.runtime.gallery.write_gallery` for embeddings made elsewhere) -
adds its global vectors and FAISS index, and on :meth:`~ShardedWriter.commit`
publishes them:

- a new gallery is built in a hidden staging folder beside ``out`` and renamed
  into place whole (an existing gallery is replaced only with ``overwrite``);
- an append builds its shards in a hidden staging folder inside the gallery,
  renames each into place, then replaces ``gallery.json`` in one rename. Old
  shards are never touched; until that rename the new shards are not part of
  the gallery. Appends to one gallery take turns (an exclusive lock on its
  folder).

:func:`index_sharded` is the ``itmrt index --shard-images`` path: images (a
features array or image files) cut into shards and encoded by a runtime.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from itmrt import __version__
from itmrt.bundle.gallery_manifest import image_encoder_identity
from itmrt.documents import as_path, sha256_file
from itmrt.errors import ItmrtError
from itmrt.limits import check_flag, is_integer
from itmrt.publish import atomic_write_bytes, atomic_write_text, check_output_folder, publish_folder, staging_folder
from itmrt.runtime.gallery import (
    GALLERY_MANIFEST,
    GALLERY_SCHEMA,
    SHARDED_GALLERY_KIND,
    STORAGE_DTYPES,
    EmbeddingsStore,
    Gallery,
    is_gallery,
    read_gallery,
)
from itmrt.runtime.given_embeddings import check_given_embeddings
from itmrt.runtime.image_files import ImageFiles
from itmrt.runtime.shortlist import image_global_vectors
from itmrt.scale.index import IndexSpec, build_index, python_number
from itmrt.scale.layout import (
    INDEX_FILE,
    SHARD_PREFIX,
    SHORTLIST_KEY,
    VECTORS_FILE,
    ShardedGallery,
    ShardRecord,
    is_sharded_gallery,
    read_sharded_gallery,
    shard_name,
)

if TYPE_CHECKING:
    from itmrt.runtime.api import Runtime
    from itmrt.runtime.bundle import BundleInfo
    from itmrt.scale.regions import SharedCodebook

Warn = Callable[[str], None]


@dataclass(frozen=True)
class ShardingOptions:
    """How a sharded gallery stores its shards; ``None`` fields: the gallery's own when appending, else the
    defaults (float32, a flat index)."""

    shard_images: int = 100_000
    dtype: str | None = None
    index: IndexSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_images", python_number(self.shard_images))

    def check(self) -> ShardingOptions:
        if not is_integer(self.shard_images) or self.shard_images < 1:
            raise ItmrtError(f"--shard-images must be an integer of at least 1, not {self.shard_images!r}")
        if self.index is not None and not isinstance(self.index, IndexSpec):
            raise ItmrtError(f"ShardingOptions.index must be an IndexSpec (or None), not a {type(self.index).__name__}")
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise ItmrtError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, not {self.dtype!r}")
        if self.index is not None:
            self.index.check()
        return self


def add_shortlist(folder: Path, spec: IndexSpec, shared: SharedCodebook | None = None) -> Gallery:
    """Give the gallery at ``folder`` its global vectors and, unless ``spec.kind`` is none, their FAISS index;
    its ``gallery.json`` records both with their sha256 (global models get neither: nothing to shortlist).
    ``regions``: the region index (:mod:`itmrt.scale.region_files`), with the ``shared`` centroids (and codec)
    of an earlier shard of the same build when given, and, with exact storage, the global vectors
    too (no FAISS index): a search adds their best images to the region index's candidates where the centroids
    fit the regions poorly (:mod:`itmrt.scale.shard`). Compact storage leaves them out (4 KB an image in float32,
    a third of its budget)."""
    if spec.kind == "regions":
        from itmrt.scale.region_files import add_region_index

        gallery = add_region_index(folder, spec, shared)
        return gallery if spec.regions_storage == "compact" else _add_global_vectors(folder, None)
    return _add_global_vectors(folder, spec if spec.kind != "none" else None)


def _add_global_vectors(folder: Path, spec: IndexSpec | None) -> Gallery:
    """Write the global vectors of the gallery at ``folder`` (and their FAISS index for ``spec``)."""
    gallery = read_gallery(folder, verify=False)  # written just now by this process
    if gallery.embeddings.ndim != 3:
        return gallery
    vectors = image_global_vectors(gallery.embeddings)
    np.save(folder / VECTORS_FILE, vectors, allow_pickle=False)
    vectors_sha256 = sha256_file(folder / VECTORS_FILE)
    entry: dict[str, Any] = {"vectors": {"file": VECTORS_FILE, "sha256": vectors_sha256, "shape": list(vectors.shape),
                                         "made_from": gallery.manifest.embeddings.sha256}}
    if spec is not None:
        raw, record = build_index(vectors, spec)
        atomic_write_bytes(folder / INDEX_FILE, raw)
        entry["index"] = {"file": INDEX_FILE, "sha256": hashlib.sha256(raw).hexdigest(), "built_from": vectors_sha256,
                          **record}
    manifest = {**gallery.manifest.to_json(), SHORTLIST_KEY: entry}
    atomic_write_text(folder / GALLERY_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return read_gallery(folder, verify=False)


@dataclass
class _Plan:
    """What the writer settled on: the document it extends and the numbering of new shards."""

    document: dict[str, Any]
    shards: list[ShardRecord] = field(default_factory=list)
    next_number: int = 0
    drift_checked: bool = False
    fit_reported: bool = False  # a poor fit of regions to centroids is reported once per build
    region_centroids: SharedCodebook | None = None
    """The first new shard's region centroids and compact codec: the later shards of this build use them
    (k-means once per build, as one codebook serves a whole collection in PLAID)."""


class ShardedWriter:
    """Adds shards to a new or an existing sharded gallery; use as a context manager, then :meth:`commit`."""

    def __init__(self, out: str | Path, bundle: BundleInfo, options: ShardingOptions, *, overwrite: bool = False,
                 append: bool = False, warn: Warn | None = None) -> None:
        self.out, self.bundle, self.append = as_path(out, "out (the gallery folder)"), bundle, append
        self.warn: Warn = warn or (lambda message: None)
        if not isinstance(options, ShardingOptions):  # None or a dict failed as a missing attribute
            raise ItmrtError(f"options must be an itmrt.scale.ShardingOptions (e.g. ShardingOptions(shard_images="
                             f"100_000)), not {type(options).__name__}")
        options.check()
        self._lock: int | None = None
        if append:
            self._lock = _lock_folder(self.out)
            try:
                self.plan, self.options = self._plan_append(options)
            except BaseException:
                self.close()
                raise
            self.staging = staging_folder(self.out / "append")
        else:
            check_output_folder(self.out, overwrite, "gallery", is_gallery)
            self.overwrite = overwrite
            self.options = ShardingOptions(options.shard_images, options.dtype or "float32",
                                           options.index or IndexSpec())
            self.plan = _Plan(self._new_document())
            self.staging = staging_folder(self.out)

    # -- set-up -----------------------------------------------------------------------

    def _new_document(self) -> dict[str, Any]:
        assert self.options.index is not None
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return {
            "kind": SHARDED_GALLERY_KIND,
            "schema_version": GALLERY_SCHEMA,
            "bundle": {"path": str(self.bundle.path.resolve()), "manifest_sha256": self.bundle.manifest_sha256,
                       "family": self.bundle.family,
                       "image_encoder_sha256": image_encoder_identity(self.bundle.manifest)},
            "images": 0,
            "dtype": self.options.dtype,
            "item_shape": None,
            "ids": None,
            "shard_images": self.options.shard_images,
            "shortlist_index": self.options.index.as_dict(),
            "shards": [],
            "itmrt_version": __version__,
            "created": now,
            "updated": now,
        }

    def _plan_append(self, options: ShardingOptions) -> tuple[_Plan, ShardingOptions]:
        if not is_sharded_gallery(self.out):
            raise ItmrtError(f"--append adds shards to a sharded gallery; {self.out} is not one "
                             "(make one with `itmrt index ... --shard-images N`)")
        gallery = read_sharded_gallery(self.out)
        gallery.check_bundle(self.bundle)
        document = gallery.manifest
        if gallery.recorded.image_encoder_sha256 is None and gallery.bundle_sha256 == self.bundle.manifest_sha256:
            # an older gallery, appended to with the very manifest that made it: its encoder is known now
            document["bundle"] = {**document["bundle"], "image_encoder_sha256": image_encoder_identity(
                self.bundle.manifest)}
        if options.dtype is not None and options.dtype != document["dtype"]:
            raise ItmrtError(f"{self.out} stores {document['dtype']}; drop --dtype or give --dtype {document['dtype']}")
        stored_spec = self._stored_spec(document)
        if options.index is not None and options.index != stored_spec:
            raise ItmrtError(f"{self.out} indexes its shards with {stored_spec.kind} "
                             f"({stored_spec.as_dict()}); drop the index options to append with the same")
        listed = {shard.name for shard in gallery.shards}
        on_disk = [p.name for p in self.out.iterdir() if p.is_dir() and re.fullmatch(SHARD_PREFIX + r"\d+", p.name)]
        for name in sorted(set(on_disk) - listed):
            self.warn(f"{self.out / name} is not listed in {GALLERY_MANIFEST} (left by an interrupted append?); "
                      "it is ignored - delete it")
        numbers = [int(name[len(SHARD_PREFIX):]) for name in [*listed, *on_disk]]
        plan = _Plan(document, list(gallery.shards), max(numbers) + 1)
        return plan, ShardingOptions(options.shard_images, document["dtype"], stored_spec)

    def _stored_spec(self, document: dict[str, Any]) -> IndexSpec:
        """How the gallery indexes its shards, as its document records it (every sharded gallery itmrt writes
        records it: without it an append fell back to flat indexes beside the region index of the shards before)."""
        recorded = document.get("shortlist_index")
        if not isinstance(recorded, dict):
            raise ItmrtError(f"{self.out / GALLERY_MANIFEST} records no shortlist index for its shards; re-index "
                             "the gallery")
        try:
            return IndexSpec.from_dict(recorded)
        except ItmrtError as exc:  # the flag's own message named a flag the user never gave
            raise ItmrtError(f"{self.out / GALLERY_MANIFEST} records a shortlist index that cannot be built again "
                             f"({exc}); re-index the gallery") from None

    # -- shards -----------------------------------------------------------------------

    @property
    def dtype(self) -> str:
        assert self.options.dtype is not None
        return self.options.dtype

    def add(self, write: Callable[[Path], Gallery]) -> ShardRecord | None:
        """Write one shard: ``write(folder)`` makes a gallery of this bundle at ``folder`` (in :attr:`dtype`);
        its shortlist is added here. A shard that came out empty (every image unreadable) is dropped."""
        name = shard_name(self.plan.next_number)
        folder = self.staging / name
        gallery = write(folder)
        if len(gallery) == 0:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        self._check_shard(gallery)
        assert self.options.index is not None
        if self.append and self.options.index.kind == "regions" and not self.plan.drift_checked:
            self._check_drift(gallery.embeddings)
        indexed = gallery if gallery.manifest.region_index is not None else \
            add_shortlist(folder, self.options.index, self.plan.region_centroids)
        if self.options.index.kind == "regions" and not self.plan.fit_reported:
            from itmrt.scale.region_files import poor_fit_message

            message = poor_fit_message(indexed, name)
            if message is not None:
                self.plan.fit_reported = True
                self.warn(message)
        if self.options.index.kind == "regions" and self.plan.region_centroids is None:
            from itmrt.scale.region_files import shared_codebook

            self.plan.region_centroids = shared_codebook(folder, name)
        first = sum(shard.images for shard in self.plan.shards)
        record = ShardRecord(name, first, len(gallery), sha256_file(folder / GALLERY_MANIFEST))
        self.plan.shards.append(record)
        self.plan.next_number += 1
        return record

    def shard_store(self) -> EmbeddingsStore | None:
        """How the next shard keeps its embeddings, for ``write`` callbacks of :meth:`add` to pass on
        (:meth:`itmrt.runtime.Runtime.index`'s ``store``): with compact region storage the shard's index is built
        from its embeddings in memory and the dense embeddings are never written
        (:class:`itmrt.scale.region_files.CompactShardStore`); otherwise None (a ``.npy``, indexed after)."""
        spec = self.options.index
        if spec is None or spec.kind != "regions" or spec.regions_storage != "compact":
            return None
        from itmrt.scale.region_files import CompactShardStore

        check = self._check_drift if self.append and not self.plan.drift_checked else None
        return CompactShardStore(spec, self.plan.region_centroids, check)

    def _check_drift(self, embeddings: np.ndarray) -> None:
        """Warn (once per append) when the new images' regions fit the last shard's centroids clearly worse."""
        from itmrt.scale.layout import read_shard_gallery
        from itmrt.scale.region_files import drift_message

        self.plan.drift_checked = True
        existing = read_sharded_gallery(self.out)
        last = read_shard_gallery(existing, existing.shards[-1], verify=False)
        message = drift_message(last, embeddings)
        if message is not None:
            self.warn(message)

    def _check_shard(self, gallery: Gallery) -> None:
        document = self.plan.document
        if gallery.manifest.bundle.manifest_sha256 != self.bundle.manifest_sha256:
            raise ItmrtError(f"{gallery.path} was made with another bundle than {self.bundle.path}")
        shape, has_ids = list(gallery.embeddings.shape[1:]), gallery.ids is not None
        if gallery.manifest.embeddings.dtype != self.dtype:
            raise ItmrtError(f"{gallery.path} stores {gallery.manifest.embeddings.dtype}, not the gallery's "
                             f"{self.dtype}")
        if document["item_shape"] is not None and document["item_shape"] != shape:
            raise ItmrtError(f"the new images embed as {shape}, the gallery's as {document['item_shape']}")
        if document["ids"] is not None and document["ids"] != has_ids:
            held = "image files (with ids)" if document["ids"] else "a features array (no ids)"
            raise ItmrtError(f"{self.out} was indexed from {held}; append images of the same kind")
        document["item_shape"], document["ids"] = shape, has_ids

    # -- publishing -------------------------------------------------------------------

    def commit(self) -> ShardedGallery:
        """Publish the shards added (see the module docstring) and return the gallery as it now is."""
        new = [shard for shard in self.plan.shards if (self.staging / shard.name).is_dir()]
        if not new:
            raise ItmrtError("no images to add: every image was skipped")
        document = {**self.plan.document, "shards": [_shard_entry(s) for s in self.plan.shards],
                    "images": sum(s.images for s in self.plan.shards),
                    "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        text = json.dumps(document, indent=2) + "\n"
        if self.append:
            for shard in new:
                os.replace(self.staging / shard.name, self.out / shard.name)
            atomic_write_text(self.out / GALLERY_MANIFEST, text)
        else:
            atomic_write_text(self.staging / GALLERY_MANIFEST, text)
            check_output_folder(self.out, self.overwrite, "gallery", is_gallery)
            publish_folder(self.staging, self.out, "replace")
        self.close()
        return read_sharded_gallery(self.out)

    def close(self) -> None:
        """Remove what was not published and release the lock (safe to call twice)."""
        staging = getattr(self, "staging", None)
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _shard_entry(shard: ShardRecord) -> dict[str, Any]:
    return {"name": shard.name, "first": shard.first, "images": shard.images, "sha256": shard.sha256}


def _lock_folder(folder: Path) -> int:
    """An exclusive lock on ``folder`` (its descriptor), or a one-line error if another writer holds it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        raise ItmrtError(f"cannot open the gallery {folder} to append to it ({exc.strerror})") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise ItmrtError(f"another process is appending to {folder}; wait for it to finish") from None
    return descriptor


def image_chunks(images: np.ndarray | ImageFiles, shard_images: int) -> list[np.ndarray | ImageFiles]:
    """``images`` cut into consecutive shards of at most ``shard_images`` (array slices stay memory-mapped)."""
    total = len(images)
    if total == 0:
        raise ItmrtError("no images to index")
    starts = range(0, total, shard_images)
    if isinstance(images, ImageFiles):
        return [ImageFiles(images.ids[s : s + shard_images], images.paths[s : s + shard_images], images.source)
                for s in starts]
    return [images[s : s + shard_images] for s in starts]


def index_sharded(
    runtime: Runtime,
    images: np.ndarray | ImageFiles | None,
    out: str | Path,
    options: ShardingOptions,
    *,
    overwrite: bool = False,
    append: bool = False,
    source: str = "image features",
    skip_bad_images: bool = False,
    progress: Callable[[int], None] | None = None,
    embeddings: np.ndarray | None = None,
) -> ShardedGallery:
    """Encode ``images`` with ``runtime`` into a new sharded gallery at ``out`` (or, with ``append``, new shards
    of the one there), ``options.shard_images`` images per shard; ``progress(n)`` after each shard.
    ``embeddings`` (with ``images`` None): image embeddings encoded elsewhere, checked once and stored as given."""
    if (images is None) == (embeddings is None):
        raise ItmrtError("give image features (or image files) or embeddings to index, one of them")
    for flag, value in (("overwrite", overwrite), ("append", append), ("skip_bad_images", skip_bad_images)):
        check_flag(value, flag)  # "no" would be truthy: a gallery replaced or extended that was not to be
    if embeddings is not None:
        check_given_embeddings(embeddings, runtime.bundle, source)
    with ShardedWriter(out, runtime.bundle, options, overwrite=overwrite, append=append, warn=runtime.warn) as writer:
        inputs: Any = images if images is not None else embeddings
        for chunk in image_chunks(inputs, writer.options.shard_images):
            def write(folder: Path, chunk: Any = chunk) -> Gallery:
                if embeddings is not None:
                    return runtime.store_embeddings(chunk, folder, source=source, dtype=writer.dtype, checked=True,
                                                    store=writer.shard_store())
                return runtime.index(chunk, folder, source=source, skip_bad_images=skip_bad_images,
                                     dtype=writer.dtype, store=writer.shard_store())

            writer.add(write)
            if progress is not None:
                progress(len(chunk))
        return writer.commit()
