"""The shortlist index of one shard: its images' global vectors in a FAISS index, searched by inner product.

The global vectors are :func:`itmrt.runtime.shortlist.image_global_vectors`
(l2-normalised means of l2-normalised regions), so inner product is the
cosine the numpy shortlist ranks by. Three kinds (:data:`INDEX_KINDS`):

- ``flat``: ``IndexFlatIP``, exact. It picks the numpy shortlist's candidates
  (:func:`itmrt.runtime.shortlist.top_candidates`) except where two images'
  global scores tie, or are equal to float rounding, at the K-th place: FAISS
  and numpy sum the products in other orders, and FAISS's heap keeps either
  of two equal scores. Within the K, candidates are ordered as numpy orders
  them (best first, ties by the lower row).
- ``ivf``: ``IndexIVFFlat``: k-means lists (``ivf_lists``, default about
  4 sqrt(N), at least 39 training vectors per list), ``ivf_probe`` of them
  searched per query.
- ``hnsw``: ``IndexHNSWFlat``: a graph of ``hnsw_m`` links per vector, built with
  ``hnsw_ef_construction``, searched with ``max(hnsw_ef_search, K)``.

A FAISS id is the shard's row. The index is stored with FAISS's own
serialisation; its record in the shard's ``gallery.json`` holds the resolved
parameters, the file's sha256 and the sha256 of the vectors it was built from.

faiss comes with ``pip install 'itmrt[scale]'`` (``faiss-cpu``; ``faiss-gpu`` builds
provide the same module, and their flat and IVF indexes move to a GPU when one
is asked for).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.documents import read_regular_bytes
from itmrt.errors import ItmrtError, first_line
from itmrt.limits import MAX_COUNT, MAX_HNSW_M, is_integer
from itmrt.optional import require
from itmrt.scale.regions import (
    DEFAULT_CANDIDATES,
    DEFAULT_EXACT_PASS,
    DEFAULT_NPROBE,
    DEFAULT_SAMPLE,
    RegionParams,
    centroid_count,
)
from itmrt.scale.sketches import check_sketch_bits

INDEX_KINDS = ("flat", "ivf", "hnsw", "none", "regions")
"""Shortlist index kinds; ``none`` keeps only the global vectors (numpy shortlist); ``regions`` is the region
index of cross-attention bundles (:mod:`itmrt.scale.regions`: no global vectors)."""
MIN_TRAIN_PER_LIST = 39
"""FAISS's k-means wants at least this many training vectors per IVF list."""


def python_number(value: Any) -> Any:
    """A NumPy number (a count read from an array or a config) as Python's; anything else as given."""
    return value.item() if isinstance(value, np.generic) and not isinstance(value, np.bool_) else value


def faiss_module() -> Any:
    return require("faiss", "the FAISS shortlist index")


def sketch_setting(value: Any) -> tuple[int | None, int | None]:
    """``--region-sketch`` as :class:`RegionParams` takes it, ``(bits, fine)``: ``auto`` (None, None), ``off``
    (0, 0), ``BITS`` (BITS, None: the fine sketch as the storage's default) and ``BITS:FINE`` (FINE 0: none)."""
    text = str(value).strip().lower()
    if text == "auto":
        return None, None
    if text in ("off", "0"):
        return 0, 0
    parts = text.split(":")
    if isinstance(value, bool) or len(parts) > 2 or not all(part.isdigit() for part in parts):
        raise ItmrtError(f"--region-sketch takes auto, off, BITS or BITS:FINE (bits a region of the scanned and of "
                         f"the fine sketch, e.g. 256 or 256:512), not {value!r}")
    fine = int(parts[1]) if len(parts) == 2 else None
    return check_sketch_bits(int(parts[0]), fine), fine


@dataclass(frozen=True)
class IndexSpec:
    """Which shortlist index to build per shard, and how to search it."""

    kind: str = "flat"
    ivf_lists: int | None = None  # None: about 4 sqrt(N), at least MIN_TRAIN_PER_LIST vectors per list
    ivf_probe: int = 16
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    region_centroids: int | None = None  # None: centroid_count(images, regions) per shard
    nprobe: int = DEFAULT_NPROBE
    candidates: int = DEFAULT_CANDIDATES
    exact_pass: int = DEFAULT_EXACT_PASS
    regions_storage: str = "exact"
    residual_bits: float = 2  # compact storage: average bits per dimension (RESIDUAL_BITS range)
    region_sample: int = DEFAULT_SAMPLE
    region_sketch: str = "auto"  # auto (SKETCH_BITS on a poorly fitting shard), off, BITS or BITS:FINE

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:  # FAISS's constructors and the gallery's JSON take Python numbers
            object.__setattr__(self, name, python_number(getattr(self, name)))

    def check(self) -> IndexSpec:
        if self.kind not in INDEX_KINDS:
            raise ItmrtError(f"--shortlist-index must be one of {', '.join(INDEX_KINDS)}, not {self.kind!r}")
        self._check_types()
        positive = {"--ivf-probe": self.ivf_probe, "--hnsw-m": self.hnsw_m,
                    "--hnsw-ef-construction": self.hnsw_ef_construction, "--hnsw-ef-search": self.hnsw_ef_search}
        if self.ivf_lists is not None:
            positive["--ivf-lists"] = self.ivf_lists
        for flag, value in positive.items():
            if value < 1:
                raise ItmrtError(f"{flag} must be at least 1, not {value}")
        if self.kind != "regions" and self.regions_storage != "exact":
            raise ItmrtError("--regions-storage compact is storage of the region index: add --shortlist-index regions")
        self.region_params(1, 1)
        return self

    def _check_types(self) -> None:
        """Counts are integers and the bits a number: a float or a string failed inside FAISS or numpy, or was
        recorded in the gallery as given (``nprobe: 2.5``), and a NaN made a document no reader takes."""
        counts = {"--ivf-probe": self.ivf_probe, "--hnsw-m": self.hnsw_m, "--hnsw-ef-construction":
                  self.hnsw_ef_construction, "--hnsw-ef-search": self.hnsw_ef_search, "--nprobe": self.nprobe,
                  "--candidates": self.candidates, "--exact-pass": self.exact_pass,
                  "--region-sample": self.region_sample}
        optional = {"--ivf-lists": self.ivf_lists, "--region-centroids": self.region_centroids}
        for flag, value in [*counts.items(), *((f, v) for f, v in optional.items() if v is not None)]:
            if not is_integer(value):
                raise ItmrtError(f"{flag} must be an integer, not {value!r}")
            # a count past FAISS's int failed inside it (or, recorded, in every search); 10**7 links took GBs
            high = MAX_HNSW_M if flag == "--hnsw-m" else MAX_COUNT
            if value > high:
                raise ItmrtError(f"{flag} must be at most {high}, not {value}: lower it")
        if isinstance(self.residual_bits, bool) or not isinstance(self.residual_bits, numbers.Real):
            raise ItmrtError(f"--residual-bits must be a number of bits per dimension, not {self.residual_bits!r}")

    def region_params(self, images: int, regions: int) -> RegionParams:
        """The region index parameters for a shard of ``images`` x ``regions`` region vectors."""
        count = self.region_centroids if self.region_centroids is not None else centroid_count(images, regions)
        sketch_bits, fine_bits = sketch_setting(self.region_sketch)
        return RegionParams(count, self.nprobe, self.candidates, self.exact_pass, self.regions_storage,
                            self.residual_bits, self.region_sample, sketch_bits=sketch_bits,
                            fine_bits=fine_bits).check()

    def lists_for(self, rows: int) -> int:
        """IVF lists for a shard of ``rows`` images (never more lists than images)."""
        if self.ivf_lists is not None:
            return max(1, min(self.ivf_lists, rows))
        return max(1, min(int(4 * math.sqrt(rows)), rows // MIN_TRAIN_PER_LIST))

    def params(self, rows: int) -> dict[str, Any]:
        """The parameters a shard of ``rows`` images is built and searched with (recorded with it)."""
        if self.kind == "ivf":
            lists = self.lists_for(rows)
            return {"ivf_lists": lists, "ivf_probe": min(self.ivf_probe, lists)}
        if self.kind == "hnsw":
            return {"hnsw_m": self.hnsw_m, "hnsw_ef_construction": self.hnsw_ef_construction,
                    "hnsw_ef_search": self.hnsw_ef_search}
        return {}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        return cls(**known).check()


def build_index(vectors: np.ndarray, spec: IndexSpec) -> tuple[bytes, dict[str, Any]]:
    """FAISS index of ``vectors [N, d]`` (float32, l2-normalised) serialised, and its record (kind, parameters,
    build seconds, FAISS version)."""
    faiss = faiss_module()
    rows, depth = int(vectors.shape[0]), int(vectors.shape[1])
    params = spec.params(rows)
    started = time.perf_counter()
    rows_in = np.ascontiguousarray(vectors, dtype=np.float32)
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(depth)
    elif spec.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(depth), depth, params["ivf_lists"], faiss.METRIC_INNER_PRODUCT)
        index.train(rows_in)
        index.nprobe = params["ivf_probe"]
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(depth, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["hnsw_ef_construction"]
    else:
        raise ItmrtError(f"no FAISS index for kind {spec.kind!r}")
    index.add(rows_in)
    raw = faiss.serialize_index(index).tobytes()
    record = {"kind": spec.kind, "params": params, "rows": rows, "dims": depth,
              "build_seconds": round(time.perf_counter() - started, 3), "faiss_version": faiss.__version__}
    return raw, record


class ShortlistIndex:
    """A shard's loaded FAISS index: :meth:`candidates` gives each query's K best rows by inner product."""

    def __init__(self, index: Any, record: dict[str, Any]) -> None:
        self.index, self.record = index, record
        self.kind: str = record["kind"]
        self.rows = int(record["rows"])
        params = record.get("params") or {}
        if self.kind == "ivf":
            index.nprobe = int(params.get("ivf_probe", 1))
        self.ef_search = int(params.get("hnsw_ef_search", 0))

    @classmethod
    def load(cls, path: Path, record: dict[str, Any], gpu: bool = False) -> ShortlistIndex:
        """Read and check an index file against its record (sha256, rows); ``gpu`` moves a flat or IVF index
        to the first GPU when this FAISS build has one."""
        faiss = faiss_module()
        try:
            raw = read_regular_bytes(path)
        except OSError as exc:
            raise ItmrtError(f"cannot read the shortlist index {path} ({first_line(exc)}); "
                             "re-index the gallery") from None
        if hashlib.sha256(raw).hexdigest() != record.get("sha256"):
            raise ItmrtError(f"{path} does not match the sha256 its gallery.json records; re-index the gallery")
        try:
            index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
        except RuntimeError as exc:
            raise ItmrtError(f"{path} is not a FAISS index FAISS {faiss.__version__} can read "
                             f"({first_line(exc)}); re-index the gallery") from None
        if int(index.ntotal) != int(record.get("rows", -1)):
            raise ItmrtError(f"{path} holds {index.ntotal} vectors, not the {record.get('rows')} its record says; "
                             "re-index the gallery")
        if gpu and record["kind"] in ("flat", "ivf") and _gpus(faiss) > 0:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return cls(index, record)

    def candidates(self, queries: np.ndarray, shortlist: int) -> np.ndarray:
        """``[Q, K]`` rows (K = min(shortlist, rows)), best first, ties by the lower row; an approximate index
        that finds fewer than K is topped up with the lowest rows it did not find, so every row is a real image."""
        k = min(shortlist, self.rows)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        order = np.lexsort((np.where(rows < 0, self.rows, rows), -np.where(rows < 0, -np.inf, scores)), axis=1)
        rows = np.take_along_axis(rows, order, axis=1)
        for q in np.flatnonzero((rows < 0).any(axis=1)):
            found = rows[q][rows[q] >= 0]
            others = np.setdiff1d(np.arange(self.rows), found, assume_unique=False)[: k - len(found)]
            rows[q] = np.concatenate([found, others])
        return rows.astype(np.int64)


def _gpus(faiss: Any) -> int:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if callable(get_num_gpus) and hasattr(faiss, "StandardGpuResources") else 0
