"""A shard's region index on disk: written beside its embeddings, listed with sha256 in its ``gallery.json``.

:func:`add_region_index` builds the index of a shard the writer has just made
(:mod:`itmrt.scale.regions`) and records it under ``region_index`` (files,
sha256, parameters, the embeddings' sha256 it was built from). With compact
storage it then drops ``image_embeddings.npy``: the document's embeddings
entry says ``stored: region_index`` and names the packed residuals, and the
gallery's embeddings are decoded from them when searched
(:class:`itmrt.runtime.compact_regions.CompactRegions`).

:func:`drift_message` is the check at ``--append``: how well the new images'
regions fit an existing shard's centroids, against how well that shard's own
regions fit them when it was built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.bundle.gallery_manifest import EMBEDDINGS_FILE, EmbeddingsEntry, GalleryFile, RegionIndexEntry
from itmrt.data.npy import open_npy
from itmrt.documents import sha256_file
from itmrt.errors import ItmrtError
from itmrt.publish import atomic_write_text
from itmrt.runtime.gallery import GALLERY_MANIFEST, Gallery, read_gallery
from itmrt.scale.regions import (
    BITS_FILE,
    BUCKETS_FILE,
    CENTROIDS_FILE,
    CODES_FILE,
    FINE_SKETCHES_FILE,
    LISTS_FILE,
    POOR_FIT,
    POOR_FIT_EXACT_PASS,
    PROJECTION_FILE,
    RESIDUALS_FILE,
    SKETCH_RESCORE,
    SKETCHES_FILE,
    SharedCodebook,
    build_region_index,
    fine_counts,
    fit_under,
)

FILES = {"centroids": CENTROIDS_FILE, "codes": CODES_FILE, "lists": LISTS_FILE, "residuals": RESIDUALS_FILE,
         "buckets": BUCKETS_FILE, "bits": BITS_FILE, "projection": PROJECTION_FILE, "sketches": SKETCHES_FILE,
         "fine_sketches": FINE_SKETCHES_FILE}
DRIFT_DROP = 0.05
"""An append whose regions' mean cosine to an existing shard's centroids is this much below that shard's own
is reported as a change of distribution."""


def add_region_index(folder: Path, spec: Any, shared: SharedCodebook | None = None) -> Gallery:
    """Build the region index of the gallery at ``folder`` (written just now) with ``spec`` (an
    :class:`itmrt.scale.index.IndexSpec` of kind regions) and record it in its ``gallery.json``.
    ``shared``: the centroids (and codec) trained on an earlier shard of the same build, used instead of k-means
    (and a codec fit)."""
    gallery = read_gallery(folder, verify=False)
    embeddings = gallery.embeddings
    if embeddings.ndim != 3:
        raise ItmrtError(NOT_REGIONS)
    params = spec.region_params(int(embeddings.shape[0]), int(embeddings.shape[1]))
    manifest = gallery.manifest.to_json()
    entry = _write_index(folder, build_region_index(embeddings, params, shared), gallery.manifest.embeddings.sha256)
    manifest["region_index"] = entry.to_json()
    if params.storage == "compact" and entry.residuals is not None:
        embedded = manifest["embeddings"]
        assert isinstance(embedded, dict)
        embedded.update(file=RESIDUALS_FILE, sha256=entry.residuals.sha256, stored="region_index")
    atomic_write_text(folder / GALLERY_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if params.storage == "compact":
        del gallery, embeddings
        (folder / EMBEDDINGS_FILE).unlink()
    return read_gallery(folder, verify=False)


NOT_REGIONS = ("--shortlist-index regions indexes region embeddings (NAAF, SCAN); a global model's gallery is "
               "searched exactly by one matrix product: use --shortlist-index flat or none")


def _write_index(folder: Path, built: dict[str, Any], built_from: str) -> RegionIndexEntry:
    """Save the arrays of ``built`` (:func:`build_region_index`) in ``folder``: their document entry."""
    entries: dict[str, object] = {}
    for role, array in built["arrays"].items():
        np.save(folder / FILES[role], array, allow_pickle=False)
        entries[role] = GalleryFile(file=FILES[role], sha256=sha256_file(folder / FILES[role])).to_json()
    return RegionIndexEntry.from_json({"built_from": built_from, **entries, **built["record"]}, "region_index")


@dataclass(frozen=True)
class CompactShardStore:
    """A compact shard's embeddings kept as its region index, built from the encoder's output in memory
    (:data:`itmrt.runtime.gallery.EmbeddingsStore`): the dense embeddings are never written.

    The result is the gallery :func:`add_region_index` makes from a dense shard, file for file; its recorded
    ``built_from`` is the sha256 the dense ``.npy`` would have had (hashed in memory). The shard's float16
    embeddings are held in memory while its index is built (73.7 KB an image at 36 x 1024)."""

    spec: Any
    shared: SharedCodebook | None = None
    before_build: Callable[[np.ndarray], None] | None = None
    """Called with the embeddings first (the writer's drift check at ``--append``)."""

    def __call__(self, staging: Path, embeddings: np.ndarray) -> tuple[EmbeddingsEntry, dict[str, Any]]:
        if embeddings.ndim != 3:
            raise ItmrtError(NOT_REGIONS)
        if self.before_build is not None:
            self.before_build(embeddings)
        params = self.spec.region_params(int(embeddings.shape[0]), int(embeddings.shape[1]))
        entry = _write_index(staging, build_region_index(embeddings, params, self.shared), npy_sha256(embeddings))
        assert entry.residuals is not None, "compact storage writes its residuals"
        stored = EmbeddingsEntry(file=RESIDUALS_FILE, sha256=entry.residuals.sha256, shape=list(embeddings.shape),
                                 dtype=str(embeddings.dtype), stored="region_index")
        return stored, {"region_index": entry}


def npy_sha256(array: np.ndarray) -> str:
    """The sha256 of ``array`` saved as a ``.npy`` (header and data), computed without writing it."""

    class _Sink:
        def __init__(self) -> None:
            self.digest = hashlib.sha256()

        def write(self, data: bytes) -> int:
            self.digest.update(data)
            return len(data)

    sink = _Sink()
    np.lib.format.write_array(sink, np.ascontiguousarray(array), allow_pickle=False)  # type: ignore[arg-type]
    return sink.digest.hexdigest()


def poor_fit_message(shard: Gallery, name: str) -> str | None:
    """A warning when a shard's regions fit its centroids too loosely for centroid-level candidates to be
    trusted (its recorded fit below the recorded ``poor_fit``): say what the search will do and how to check."""
    entry = shard.manifest.region_index
    if entry is None:
        return None
    recorded = entry.params.get("poor_fit", POOR_FIT)
    below = float(recorded) if isinstance(recorded, (int, float)) else POOR_FIT
    if entry.fit >= below:
        return None
    sketched = entry.sketches is not None
    keep, rescore = fine_counts(int(entry.rows)) if entry.fine_sketches is not None else (0, SKETCH_RESCORE)
    fine = (f", the scan's best {keep} estimated again from a {entry.params.get('fine_bits')}-bit sketch"
            if entry.fine_sketches is not None else "")
    found = (f"its candidates come from a scan of every region's {entry.params.get('sketch_bits')}-bit sketch "
             f"instead{fine}, the best {rescore} re-estimated from their stored regions") if sketched \
        else (f"searches score {POOR_FIT_EXACT_PASS} images a shard exactly by default (--region-sketch 256 adds "
              "a scan of every region's sketch)")
    knob = ("--refine, --rescore" if fine else "--rescore") if sketched else "--exact-pass"
    return (f"{name}'s regions fit their {entry.params.get('centroids')} centroids loosely (mean cosine "
            f"{entry.fit:.3f}, below {below:g}): on such data centroid-level candidates can miss exhaustive "
            f"scoring's answers, so {found}. Check recall on your own captions with "
            f"`itmrt audit GALLERY --captions CAPS.txt`; if it is short, raise {knob} or --shortlist, or search "
            "exhaustively (--shortlist-index none) (docs/region-index.md, 'Data no index can search')")


def shared_codebook(folder: Path, name: str) -> SharedCodebook:
    """The centroids (and compact storage's codec) of the shard just built at ``folder``, for the later shards
    of its build."""
    from itmrt.runtime.compact_regions import ResidualCodec

    centroids = np.load(folder / CENTROIDS_FILE, allow_pickle=False)
    codec = None
    if (folder / BUCKETS_FILE).is_file():
        bits = np.load(folder / BITS_FILE, allow_pickle=False) if (folder / BITS_FILE).is_file() else None
        codec = ResidualCodec.from_buckets(np.load(folder / BUCKETS_FILE, allow_pickle=False), bits)
    return SharedCodebook(name, centroids, codec)


def drift_message(shard: Gallery, new: np.ndarray) -> str | None:
    """A warning when the region embeddings ``new`` fit ``shard``'s centroids clearly worse than its own did."""
    entry = shard.manifest.region_index
    if entry is None or new.ndim != 3 or len(new) == 0:
        return None
    centroids = np.asarray(open_npy(shard.path / entry.centroids.file, "region centroids"))
    fit = fit_under(centroids, new)
    if fit >= entry.fit - DRIFT_DROP:
        return None
    return (f"the appended images' regions fit {shard.path.name}'s centroids worse than its own (mean cosine "
            f"{fit:.3f} against {entry.fit:.3f}): the images changed in kind. Each new shard has its own region "
            "index, but the search defaults were chosen on the old images: check recall with `itmrt audit "
            "GALLERY --captions CAPS.txt`, and if it fell, rebuild the gallery in one go (`itmrt index ... "
            "--shortlist-index regions --overwrite` over every image)")
