"""A shard's region index read from the files its document lists, and checked before anything searches it.

Each file's sha256 is checked against the shard's ``gallery.json`` (and that
document's against the gallery's), but a gallery's top document is its own
root of trust: whoever can edit it can write every hash below it too. So the
values are checked as well, as a hostile gallery could set them, before they
reach code that trusts them: the compiled kernels index centroids by the
stored codes and images by the inverted lists without bounds checks, and the
search defaults recorded in the document become array sizes. Anything out of
place is refused in one line that names it and says to re-index the gallery.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import numpy as np

from itmrt.bundle.gallery_manifest import REMEDY
from itmrt.errors import ItmrtError
from itmrt.limits import MAX_COUNT, is_integer
from itmrt.runtime.compact_regions import codes_fit
from itmrt.scale.region_search import RegionIndex, RegionSketch

RECORDED_COUNTS = {"centroids": (1, True), "nprobe": (1, True), "candidates": (1, True), "refine": (0, False),
                   "exact_pass": (0, False), "union": (0, False), "prefilter": (0, False)}
"""The counts a shard's document records under ``region_index.params`` that a search reads: each one's least
value, and whether every gallery records it (the others are absent from galleries written before them:
:class:`~itmrt.scale.region_search.RegionIndex` gives them its defaults, as it does ``poor_fit``)."""


def recorded_params(folder: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The document's search parameters as a search uses them: every count recorded an integer within its
    bounds (a string failed deep inside ``int()``, a negative one became an array size), ``poor_fit`` where
    recorded a finite number."""
    checked: dict[str, Any] = dict(params)
    for key, (least, required) in RECORDED_COUNTS.items():
        if key not in params and not required:
            continue
        value = params.get(key)
        count = int(cast(int, value)) if is_integer(value) else None
        if count is None or not least <= count <= MAX_COUNT:
            what = "missing" if value is None else f"{value!r}"
            raise ItmrtError(f"{folder}: its region index records {key} {what}, not an integer from {least} to "
                             f"{MAX_COUNT}; {REMEDY}")
        checked[key] = count
    if "poor_fit" in params:
        poor_fit = params["poor_fit"]
        if isinstance(poor_fit, bool) or not isinstance(poor_fit, (int, float)) or not math.isfinite(poor_fit):
            raise ItmrtError(f"{folder}: its region index records poor_fit {poor_fit!r}, not a number; {REMEDY}")
        checked["poor_fit"] = float(poor_fit)
    return checked


def check_index_arrays(folder: Path, centroids: np.ndarray, lists: np.ndarray, codes: np.ndarray, count: int,
                       entry: Any) -> None:
    """``count`` finite centroids of the shard's dimension; inverted lists whose offsets start at 0, never
    decrease and end at the list's length, holding rows of the shard; one code per region, each a centroid."""
    rows = int(entry.rows)
    if centroids.shape != (count, entry.dims) or centroids.dtype.kind != "f" or not np.isfinite(centroids).all():
        raise ItmrtError(f"{folder}: the region index's centroids are not {count} finite vectors of {entry.dims}; "
                         f"{REMEDY}")
    offsets, members = lists[: count + 1], lists[count + 1 :]
    if lists.ndim != 1 or lists.dtype != np.int32 or len(lists) < count + 1 or int(offsets[0]) != 0 \
            or int(offsets[-1]) != len(members) or bool((np.diff(offsets) < 0).any()) \
            or (len(members) and not 0 <= int(members.min()) <= int(members.max()) < rows):
        raise ItmrtError(f"{folder}: the region index's inverted lists do not list rows of its {rows} images by "
                         f"its {count} centroids; {REMEDY}")
    if codes.shape != (rows, entry.regions) or not codes_fit(codes, count):
        raise ItmrtError(f"{folder}: the region index's codes are not one of its {count} centroids for each of "
                         f"{entry.regions} regions of {rows} images; {REMEDY}")


def checked_sketch(folder: Path, projection: np.ndarray, sketches: np.ndarray, fine: np.ndarray | None,
                   entry: Any) -> RegionSketch:
    """The shard's sketches (scanned, and fine where there is one) and their projection, their shapes checked
    against each other and the shard, the projection finite."""
    words = int(sketches.shape[0]) if sketches.ndim == 3 else 0
    fine_words = int(fine.shape[2]) if fine is not None and fine.ndim == 3 else 0
    rows, regions = int(entry.rows), int(entry.regions)
    if projection.dtype != np.float32 or projection.shape != (entry.dims, 64 * (words + fine_words)) or not words \
            or sketches.dtype != np.uint64 or sketches.shape != (words, regions, rows) \
            or (fine is not None and (fine.dtype != np.uint64 or not fine_words
                                      or fine.shape != (rows, regions, fine_words))) \
            or not np.isfinite(projection).all():
        raise ItmrtError(f"{folder}: the region index's sketches do not fit its projection and "
                         f"{entry.rows} images; {REMEDY}")
    return RegionSketch(projection, sketches, fine)


def load_region_index(folder: Path, entry: Any, verify: bool = True, in_memory: bool = False) -> RegionIndex:
    """A shard's region index from the files its document lists (each checked against its sha256, then its
    values); memory-mapped, or (``in_memory``: a running service) copied by positional reads and the copies
    verified, never mapped."""
    from itmrt.bundle.closed import member, verified_member
    from itmrt.data.npy import open_npy, read_npy_copy

    listed = {item.file: item.sha256 for item in entry.files()}
    arrays = {}
    sketched: tuple[str, ...] = ()
    if entry.projection is not None and entry.sketches is not None:
        sketched = ("projection", "sketches", *(("fine_sketches",) if entry.fine_sketches is not None else ()))
    for role in ("centroids", "lists", "codes", *sketched):
        item = getattr(entry, role)
        if in_memory:
            arrays[role] = read_npy_copy(member(folder, item.file, "gallery", REMEDY), f"region index {role}",
                                         listed[item.file] if verify else None, REMEDY)
            continue
        path = verified_member(folder, item.file, listed, "gallery", REMEDY) if verify else folder / item.file
        arrays[role] = np.asarray(open_npy(path, f"region index {role}"))
    record = entry.to_json()
    record["params"] = recorded_params(folder, record["params"])
    check_index_arrays(folder, arrays["centroids"], arrays["lists"], arrays["codes"], record["params"]["centroids"],
                       entry)
    index = RegionIndex(arrays["centroids"], arrays["lists"], arrays["codes"], record)
    if sketched:
        index.sketch = checked_sketch(folder, arrays["projection"], arrays["sketches"], arrays.get("fine_sketches"),
                                      entry)
    if verify:  # the file's verified sha256 names its content (its header holds the shape and dtype)
        index.centroids_key = entry.centroids.sha256
    return index
