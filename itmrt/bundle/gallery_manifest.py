"""A gallery's ``gallery.json`` as typed records, checked on read like a bundle's manifest.

A gallery folder (``itmrt index``) holds its image embeddings, optionally each
image's id, and this document, which lists both with their sha256 and ties
the gallery to the bundle that made it. Every value is type-checked on read
and a wrong one is one line naming its key; ``gallery.schema.json`` beside
this module is the same contract as a JSON Schema, generated from the records.

The gallery is a closed world (:mod:`itmrt.bundle.closed`): its files are
named by plain relative paths inside its folder and verified against their
sha256 before use. The one path that points elsewhere is ``bundle.path``, the
bundle that made it: it is followed only to find that bundle, whose
``manifest.json`` must hash to ``bundle.manifest_sha256`` before anything in
it is used (:func:`itmrt.runtime.gallery.gallery_bundle`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itmrt import __version__
from itmrt.bundle.closed import member
from itmrt.bundle.names import BACKENDS, PRECISIONS
from itmrt.bundle.record import (
    SAFE_RELATIVE_PATH,
    SHA256,
    JsonRecord,
    RecordError,
    bounded,
    json_schema,
    optional,
    parse_document,
    sha256_field,
)
from itmrt.documents import read_json_document, sha256_bytes
from itmrt.errors import ItmrtError

GALLERY_KIND = "itmrt-gallery"
GALLERY_SCHEMA = 1
GALLERY_MANIFEST = "gallery.json"
EMBEDDINGS_FILE = "image_embeddings.npy"
IDS_FILE = "image_ids.json"
SHARDED_GALLERY_KIND = "itmrt-sharded-gallery"
"""The ``kind`` of a sharded gallery's top ``gallery.json`` (:mod:`itmrt.scale.layout`)."""
STORAGE_DTYPES = ("float32", "float16")
"""How a gallery may store its embeddings (float16 halves the file; scorers upcast one tile at a time)."""
EMBEDDING_STORES = ("dense", "region_index")
"""``dense``: the embeddings file holds the vectors; ``region_index``: the shard keeps only its region index's
centroid ids and packed residuals (``--regions-storage compact``), and ``file`` names the residuals."""
REMEDY = "re-index the gallery"
SCHEMA_FILE = Path(__file__).with_name("gallery.schema.json")
SCHEMA_ID = "https://itmrt.invalid/schemas/gallery-manifest-v1.json"
INSIDE = {"pattern": SAFE_RELATIVE_PATH, "means": "a file inside the gallery"}


@dataclass(kw_only=True)
class GalleryFile(JsonRecord):
    """A file inside the gallery folder and its sha256."""

    file: str = field(metadata=INSIDE)
    sha256: str = sha256_field()


@dataclass(kw_only=True)
class EmbeddingsEntry(GalleryFile):
    """The image embeddings: a ``.npy`` of ``shape`` (images first) and ``dtype``."""

    shape: list[int] = bounded(minimum=0, maximum=1 << 40)
    dtype: str = field(default="float32", metadata={"choices": STORAGE_DTYPES})
    stored: str = field(default="dense", metadata={"choices": EMBEDDING_STORES})


@dataclass(kw_only=True)
class IdsEntry(GalleryFile):
    """Each image's id (its path as listed), a JSON list with one string per embedding row."""

    count: int = bounded(minimum=0)


@dataclass(kw_only=True)
class VectorsEntry(GalleryFile):
    """A shard's global vectors (one float32 vector per image, for the shortlist), made from its embeddings."""

    shape: list[int] = bounded(minimum=0, maximum=1 << 40)
    made_from: str = sha256_field()


@dataclass(kw_only=True)
class IndexEntry(GalleryFile):
    """A shard's FAISS index of its global vectors: how it was built, and from which vectors."""

    built_from: str = sha256_field()
    kind: str = field(metadata={"choices": ("flat", "ivf", "hnsw")})
    rows: int = bounded(minimum=0)
    dims: int = bounded(minimum=1)
    params: dict[str, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class ShortlistEntry(JsonRecord):
    """What a shard of a sharded gallery (:mod:`itmrt.scale`) adds: global vectors and their index."""

    vectors: VectorsEntry
    index: IndexEntry | None = None


@dataclass(kw_only=True)
class RegionIndexEntry(JsonRecord):
    """A shard's region index (:mod:`itmrt.scale.regions`): centroids, each region's centroid id, inverted lists
    and, for compact storage, packed residuals, their levels (``buckets``) and each dimension's bits (``bits``;
    absent in galleries written before bits were allocated per dimension); on a shard its centroids fit poorly,
    every region's sign-bit sketch and their projection (and, under exact storage, a fine sketch);
    built from the embeddings ``built_from``."""

    built_from: str = sha256_field()
    centroids: GalleryFile
    codes: GalleryFile
    lists: GalleryFile
    residuals: GalleryFile | None = None
    buckets: GalleryFile | None = None
    bits: GalleryFile | None = None
    projection: GalleryFile | None = None
    sketches: GalleryFile | None = None
    fine_sketches: GalleryFile | None = None
    rows: int = bounded(minimum=0)
    regions: int = bounded(minimum=1)
    dims: int = bounded(minimum=1)
    params: dict[str, object] = field(default_factory=dict)
    fit: float = 0.0
    build_seconds: float = 0.0
    faiss_version: str = ""

    def files(self) -> list[GalleryFile]:
        return [self.centroids, self.codes, self.lists,
                *[entry for entry in (self.residuals, self.buckets, self.bits, self.projection, self.sketches,
                                      self.fine_sketches) if entry is not None]]


@dataclass(kw_only=True)
class GalleryBundle(JsonRecord):
    """The bundle whose image encoder made the embeddings: where it was, the sha256 of its manifest then, and
    the identity of its image encoder (:func:`image_encoder_identity`; absent in galleries made before it was
    recorded, which then need the very manifest they were made with)."""

    path: str
    manifest_sha256: str = sha256_field()
    family: str = field(metadata={"pattern": r"^[a-z][a-z0-9_]{0,31}$", "means": "a model family name"})
    image_encoder_sha256: str | None = optional(None, **SHA256)


def image_encoder_identity(manifest: Any) -> str:
    """What a gallery's embeddings depend on, as one sha256: the family, the fp32 image encoder graph and its
    weights (the sha256 the bundle lists for the graph file and its external data), the graph's inputs and
    outputs (dimensions and dtypes) and the image preprocessing. Engines, precision variants, calibration,
    shape ranges and the text side are left out: adding them to a bundle does not change an embedding."""
    graph = manifest.graphs["image_encoder"]
    stem, folder = Path(graph.file).stem, Path(graph.file).parent
    # The graph's own files only: precision variants (precision/fp16/image_encoder.onnx) share its name, not
    # its folder, and are left out like engines.
    weights = {name: sha for name, sha in sorted(manifest.files.items())
               if name == graph.file or (Path(name).parent == folder and Path(name).name.startswith(stem + "."))}
    record = {
        "family": manifest.family,
        "graph": {"file": graph.file, "sha256": graph.sha256},
        "weights": weights,
        "inputs": [spec.to_json() for spec in graph.inputs],
        "outputs": [spec.to_json() for spec in graph.outputs],
        "preprocessing": manifest.image_preprocessing.to_json() if manifest.image_preprocessing else None,
    }
    return sha256_bytes(json.dumps(record, sort_keys=True).encode("utf-8"))


@dataclass(kw_only=True)
class GalleryManifest(JsonRecord):
    """``gallery.json``: the embeddings, the image ids, the bundle that made them, and how.

    Read access by key (``manifest["embeddings"]``) gives the JSON view of a field (a copy).
    """

    kind: str = field(default=GALLERY_KIND, metadata={"const": GALLERY_KIND, "required": True})
    schema_version: int = field(default=GALLERY_SCHEMA, metadata={"const": GALLERY_SCHEMA, "required": True})
    bundle: GalleryBundle
    embeddings: EmbeddingsEntry
    ids: IdsEntry | None = None
    shortlist: ShortlistEntry | None = optional()
    region_index: RegionIndexEntry | None = optional()
    backend: str | None = field(default=None, metadata={"choices": BACKENDS})
    precision: str | None = field(default=None, metadata={"choices": PRECISIONS})
    source: str | None = None
    itmrt_version: str = __version__
    created: str = ""

    def __getitem__(self, key: str) -> object:
        return self.to_json()[key]

    def get(self, key: str, default: object = None) -> object:
        return self.to_json().get(key, default)

    def files(self) -> dict[str, str]:
        """The files the gallery holds, with their sha256."""
        entries: list[GalleryFile] = [self.embeddings, *([self.ids] if self.ids is not None else [])]
        if self.shortlist is not None:
            entries += [self.shortlist.vectors, *([self.shortlist.index] if self.shortlist.index is not None else [])]
        if self.region_index is not None:
            entries += self.region_index.files()
        return {entry.file: entry.sha256 for entry in entries}


def value_problem(manifest: GalleryManifest) -> RecordError | None:
    """What the schema cannot say: ids that do not match the rows, embeddings without an image axis."""
    shape = manifest.embeddings.shape
    if len(shape) < 2:
        return RecordError("embeddings.shape", f"is {shape}; embeddings have an image axis and at least one more")
    if 0 in shape:  # no value per image: the scorers divided by it; no image: every search answered nothing
        return RecordError("embeddings.shape", f"is {shape}; a gallery holds at least one image and values for "
                                               "each (itmrt never writes an empty one)")
    if manifest.embeddings.stored == "region_index" and (manifest.region_index is None
                                                         or manifest.region_index.residuals is None):
        return RecordError("embeddings.stored", "is region_index, but the gallery holds no compact region index")
    if manifest.ids is not None and manifest.ids.count != shape[0]:
        return RecordError("ids.count", f"is {manifest.ids.count}, not the {shape[0]} embedding rows")
    return None


def parse_gallery_manifest(data: object, source: str | Path) -> GalleryManifest:
    """A parsed ``gallery.json`` as a :class:`GalleryManifest`; a wrong value is one line naming its key."""
    return parse_document(GalleryManifest, data, source, REMEDY, value_problem)


def _gallery_document(folder: str | Path) -> tuple[Path, Path, dict[str, Any], bytes]:
    """``folder``, its ``gallery.json`` (inside it), the parsed document of either kind and its raw bytes."""
    root = Path(folder)
    path = member(root, GALLERY_MANIFEST, "gallery", REMEDY)
    if not path.is_file():
        raise ItmrtError(f"{root} is not an itmrt gallery (no {GALLERY_MANIFEST}); make one with `itmrt index`")
    data, raw = read_json_document(path, (GALLERY_KIND, SHARDED_GALLERY_KIND), GALLERY_SCHEMA, "gallery manifest",
                                   REMEDY)
    return root, path, data, raw


def read_gallery_manifest(folder: str | Path) -> tuple[GalleryManifest, str]:
    """The gallery document of ``folder`` and its sha256; every file it names must stay inside the folder."""
    root, path, data, raw = _gallery_document(folder)
    if data["kind"] == SHARDED_GALLERY_KIND:
        raise ItmrtError(f"{root} is a sharded gallery; search it with `itmrt infer {root}` or itmrt.scale.open_shards")
    manifest = parse_gallery_manifest(data, path)
    for name in manifest.files():
        member(root, name, "gallery", REMEDY)
    return manifest, sha256_bytes(raw)


@dataclass(kw_only=True)
class _RecordedBundle(JsonRecord):
    """The ``bundle`` entry every gallery document holds (a sharded gallery's top document too)."""

    bundle: GalleryBundle


@dataclass(kw_only=True)
class ShardEntry(JsonRecord):
    """One shard as a sharded gallery's top document lists it: its folder, its first row, its images and the
    sha256 of its own ``gallery.json``."""

    name: str
    first: int = bounded(minimum=0)
    images: int = bounded(minimum=1)
    sha256: str = sha256_field()


@dataclass(kw_only=True)
class ShardedGalleryDocument(JsonRecord):
    """A sharded gallery's top ``gallery.json`` (:mod:`itmrt.scale.layout`), type-checked on read."""

    kind: str = field(default=SHARDED_GALLERY_KIND, metadata={"const": SHARDED_GALLERY_KIND, "required": True})
    schema_version: int = field(default=GALLERY_SCHEMA, metadata={"const": GALLERY_SCHEMA, "required": True})
    bundle: GalleryBundle
    images: int = bounded(minimum=1)
    dtype: str = field(metadata={"choices": STORAGE_DTYPES})
    item_shape: list[int] = bounded(minimum=1)
    ids: bool
    shard_images: int = bounded(minimum=1)
    shortlist_index: dict[str, object] | None = None
    shards: list[ShardEntry]


def parse_sharded_document(data: object, source: str | Path, remedy: str) -> ShardedGalleryDocument:
    """A sharded gallery's parsed top document, checked (one line naming the file and the key)."""

    def images_add_up(document: ShardedGalleryDocument) -> RecordError | None:
        held = sum(shard.images for shard in document.shards)
        if not document.shards:
            return RecordError("shards", "lists no shards")
        if held != document.images:
            return RecordError("images", f"is {document.images}, but the shards hold {held} images")
        return None

    return parse_document(ShardedGalleryDocument, data, source, remedy, images_add_up)


def recorded_bundle(folder: str | Path) -> GalleryBundle:
    """The bundle a gallery (sharded or not) records as the one that made it, type-checked."""
    _root, path, data, _raw = _gallery_document(folder)
    if data["kind"] == GALLERY_KIND:
        return parse_gallery_manifest(data, path).bundle
    return parse_recorded_bundle(data, path)


def parse_recorded_bundle(data: object, source: str | Path) -> GalleryBundle:
    """The ``bundle`` entry of a parsed gallery document (a sharded gallery's top document), type-checked."""
    return parse_document(_RecordedBundle, data, source, REMEDY, lambda _record: None).bundle


def same_image_encoder(one: GalleryBundle, other: GalleryBundle) -> bool:
    """Whether two gallery records name embeddings of one image encoder: the same manifest, or the same
    recorded :func:`image_encoder_identity` (the shards of a gallery appended to after its bundle grew)."""
    if one.manifest_sha256 == other.manifest_sha256:
        return True
    return one.image_encoder_sha256 is not None and one.image_encoder_sha256 == other.image_encoder_sha256


def gallery_schema() -> dict[str, object]:
    """The JSON Schema of ``gallery.json`` (what ``gallery.schema.json`` holds)."""
    return json_schema(GalleryManifest, "itmrt gallery manifest (schema version 1)", SCHEMA_ID)


def gallery_manifest_text(manifest: GalleryManifest) -> str:
    return json.dumps(manifest.to_json(), indent=2) + "\n"
