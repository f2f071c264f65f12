"""The bundle manifest (``manifest.json``) as typed records: what a bundle holds and how to verify it.

Export writes the manifest last; every later stage (``itmrt calibrate``,
``itmrt build``) *adds* entries - precision graphs, calibration statistics,
TensorRT engines - and lists each new file in ``files`` with its sha256, so
``itmrt check`` verifies it. Schema version 1; the entries are additive, so a
manifest written by an older itmrt still reads, and keys this version does
not know are kept when it writes the manifest back.

Every value is type-checked when the manifest is read (:func:`read_manifest`):
a damaged manifest is one line naming the key. ``manifest.schema.json`` beside
this module is the same contract as a JSON Schema for other tools; it is
generated from these classes (:func:`manifest_schema`).

Shapes name their symbolic axes (:data:`itmrt.bundle.names.AXES`);
``shape_ranges`` gives each one the min/opt/max a TensorRT optimisation profile
needs. Every file name is a relative path inside the bundle folder.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from itmrt import __version__
from itmrt.bundle.names import (
    BUNDLE_KIND,
    COMPONENTS,
    MANIFEST_NAME,
    PRECISIONS,
    SCHEMA_VERSION,
    VOCAB_FILE,
    Precision,
    check_family,
)
from itmrt.bundle.record import (
    SAFE_RELATIVE_PATH,
    SHA256,
    JsonRecord,
    RecordError,
    bounded,
    json_schema,
    optional,
    parse_document,
    path_field,
    sha256_field,
)
from itmrt.bundle.tolerances import DeploymentTolerance
from itmrt.bundle.traits import RuntimeTraits
from itmrt.documents import read_json_document
from itmrt.errors import ItmrtError
from itmrt.publish import atomic_write_text

SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")
SCHEMA_ID = "https://itmrt.invalid/schemas/bundle-manifest-v1.json"

Log = Callable[[str], None]
JsonScalar = str | int | float | bool
JsonNumber = int | float | bool

DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
"""The numpy dtype names a graph input or output may have."""
CALIBRATION_METHODS = ("entropy", "percentile", "minmax")
AXIS_NAME = {"pattern": r"^[A-Za-z_][A-Za-z0-9_]*$", "means": "an axis name"}
LARGEST_AXIS = 1 << 20
"""The largest size a symbolic axis may be given (a profile's maximum batch, caption length or region count)."""
COMPONENT_KEYS = {"key_choices": COMPONENTS}


# -- export ------------------------------------------------------------------------


@dataclass(kw_only=True)
class TensorSpec(JsonRecord):
    """A graph input or output: name, numpy dtype name, shape (ints, or symbolic axis names)."""

    name: str
    dtype: str = field(metadata={"choices": DTYPES})
    shape: list[int | str] = field(metadata={"minimum": 0, **AXIS_NAME})


@dataclass(kw_only=True)
class AxisRange(JsonRecord):
    """The sizes a symbolic axis takes: a TensorRT optimisation profile's min / opt / max."""

    min: int = bounded(minimum=1, maximum=LARGEST_AXIS)
    opt: int = bounded(minimum=1, maximum=LARGEST_AXIS)
    max: int = bounded(minimum=1, maximum=LARGEST_AXIS)


@dataclass(kw_only=True)
class FileEntry(JsonRecord):
    """A file inside the bundle and its sha256 (every entry that names a file starts with these two)."""

    file: str = path_field()
    sha256: str = sha256_field()


@dataclass(kw_only=True)
class GraphEntry(FileEntry):
    """One exported graph: its file and hash, its signature, the ranges of its symbolic axes."""

    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    shape_ranges: dict[str, AxisRange] = field(default_factory=dict, metadata={"key_pattern": AXIS_NAME["pattern"],
                                                                                 "key_means": AXIS_NAME["means"]})

    def input_names(self) -> list[str]:
        return [value.name for value in self.inputs]


@dataclass(kw_only=True)
class FrozenConstant(JsonRecord):
    """A model constant frozen into the scorer graph as a named float32 initializer."""

    value: float
    initializer: str
    source: str | None = optional()  # NAAF's threshold: "checkpoint thres_safe" or "--threshold override"
    checkpoint_value: float | None = optional()


@dataclass(kw_only=True)
class VocabEntry(FileEntry):
    """The bundle's copy of the vocabulary and its special ids."""

    size: int = bounded(minimum=4, maximum=1 << 24)
    content_sha256: str = sha256_field()
    pad_id: int = bounded(minimum=0)
    start_id: int = bounded(minimum=0)
    end_id: int = bounded(minimum=0)
    unk_id: int = bounded(minimum=0)


@dataclass(kw_only=True)
class SourceCheckpoint(JsonRecord):
    """The checkpoint the bundle was exported from (the only path allowed to point outside the bundle)."""

    path: str
    sha256: str = sha256_field()
    format: str


@dataclass(kw_only=True)
class ParitySample(JsonRecord):
    """The sample inputs export parity ran on."""

    batch_images: int = bounded(minimum=0)
    batch_captions: int = bounded(minimum=0)
    lengths: list[int] = bounded(minimum=0)
    seed: int


@dataclass(kw_only=True)
class ExportParity(JsonRecord):
    """ONNX Runtime against PyTorch at export: worst absolute error per graph, top-10 rankings identical."""

    provider: str
    tolerance: float = bounded(minimum=0)
    max_abs_error: dict[str, float] = field(metadata={"values": {"minimum": 0}})
    top10_identical: bool
    sample: ParitySample


@dataclass(kw_only=True)
class ResizeStep(JsonRecord):
    shorter_side: int = bounded(minimum=1, maximum=1 << 16)
    filter: str


@dataclass(kw_only=True)
class CropStep(JsonRecord):
    height: int = bounded(minimum=1, maximum=1 << 16)
    width: int = bounded(minimum=1, maximum=1 << 16)
    at: str


@dataclass(kw_only=True)
class ImagePreprocessingRecord(JsonRecord):
    """How an image file becomes the image encoder's input (a model trained on images: CMPM)."""

    decode: str
    exif_transpose: bool = True
    resize: ResizeStep
    crop: CropStep
    scale: float
    mean: list[float]
    std: list[float]
    layout: str
    trained_with: str = ""


# -- precision graphs, calibration, engines ---------------------------------------------


@dataclass(kw_only=True)
class NodeNote(JsonRecord):
    """A node a precision pass treated specially (kept in float32, left unquantized) and why."""

    node: str
    op: str
    reason: str
    measured: float | None = optional()


@dataclass(kw_only=True)
class VariantGraph(FileEntry):
    """A precision variant of one graph, made from the fp32 graph whose sha256 is ``source_sha256``."""

    source_sha256: str = sha256_field()
    max_abs_error: float = bounded(minimum=0)


@dataclass(kw_only=True)
class Fp16Graph(VariantGraph):
    """An fp16 graph: the nodes kept in float32 (islands), measured against fp32 on ``sample``."""

    islands: list[NodeNote]
    sample: str


@dataclass(kw_only=True)
class Int8Graph(VariantGraph):
    """An int8 Q/DQ graph: float16 with the fp16 variant's FP32 islands around the quantized products (``floats``
    "float16"; graphs made before that are float32 apart from their products: "float32")."""

    calibration: str | None = path_field()
    method: str | None = field(metadata={"choices": CALIBRATION_METHODS})
    quantized_nodes: list[str]
    excluded_nodes: list[NodeNote]
    per_channel: bool
    symmetric: bool
    qdq_pairs: int = bounded(minimum=0)
    sample: str | None
    floats: str = field(default="float32", metadata={"choices": ("float32", "float16")})
    islands: list[NodeNote] = field(default_factory=list)  # FP32 islands (the fp16 variant's) when floats is float16
    islands_from: str | None = None  # where the islands came from


@dataclass(kw_only=True)
class Fp16Graphs(JsonRecord):
    graphs: dict[str, Fp16Graph] = field(metadata=COMPONENT_KEYS)
    created: str
    versions: dict[str, str]


@dataclass(kw_only=True)
class Int8Graphs(JsonRecord):
    graphs: dict[str, Int8Graph] = field(metadata=COMPONENT_KEYS)
    created: str
    versions: dict[str, str]


@dataclass(kw_only=True)
class PrecisionGraphs(JsonRecord):
    fp16: Fp16Graphs | None = optional()
    int8: Int8Graphs | None = optional()


@dataclass(kw_only=True)
class CalibrationFile(FileEntry):
    """INT8 activation ranges of one graph (ONNX Runtime's TensorsData JSON)."""

    source_sha256: str = sha256_field()


@dataclass(kw_only=True)
class CalibrationRecord(JsonRecord):
    """How the saved ranges were collected: method, data, sample."""

    method: str = field(metadata={"choices": CALIBRATION_METHODS})
    split: str
    data: str
    samples: int = bounded(minimum=1)
    data_fingerprint: str
    created: str
    graphs: dict[str, CalibrationFile] = field(metadata=COMPONENT_KEYS)


@dataclass(kw_only=True)
class ProfileShapes(JsonRecord):
    min: list[int] = bounded(minimum=0)
    opt: list[int] = bounded(minimum=0)
    max: list[int] = bounded(minimum=0)


@dataclass(kw_only=True)
class Tf32Record(JsonRecord):
    """Whether an engine may use TF32 in its float32 products and, when it may, the error that costs."""

    enabled: bool
    max_abs_error_fp32_graph: float | None = optional()  # measured by CPU emulation of TF32's rounding
    emulated_products: int | None = optional()
    sample: str | None = optional()


@dataclass(kw_only=True)
class LayerInfo(FileEntry):
    """The engine inspector's layer JSON kept in the bundle, and what it says (layer types, INT8 layers...)."""

    summary: dict[str, object]


@dataclass(kw_only=True)
class TimingCacheUse(JsonRecord):
    """The TensorRT timing cache a build read and updated (outside the bundle when the user named one)."""

    file: str | None
    status: str


@dataclass(kw_only=True)
class EngineEntry(FileEntry):
    """A TensorRT engine: the graph it was built from, the TensorRT and GPU it runs with, how it was built.

    Entries written before engines recorded their build settings read with the defaults here.
    """

    graph_file: str = path_field()
    graph_sha256: str = sha256_field()
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    unified_memory: bool | None = None
    os: str | None = None  # platform.system() of the build machine (serialized engines do not cross platforms)
    arch: str | None = None  # platform.machine() of the build machine
    profile: dict[str, ProfileShapes] = field(default_factory=dict)
    axis_ranges: dict[str, AxisRange] = field(default_factory=dict)
    board: str | None = None
    workspace_mb: int | None = bounded(None, minimum=1)
    builder: dict[str, object] = field(default_factory=dict)  # the builder settings (flags, profiling verbosity...)
    tf32: Tf32Record | None = None
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    lean_runtime: str | None = None  # the lean runtime library the build loaded the plan through (information only)
    hardware_compatibility: str | None = None  # a HardwareCompatibilityLevel name; None: NONE
    dla_core: int | None = bounded(None, minimum=0)
    gpu_fallback: bool | None = None
    layer_devices: dict[str, object] | None = None  # DLA builds: engine layers on the DLA / the GPU (inspector)
    device_memory_bytes: int | None = bounded(None, minimum=0)  # an execution context's need at the maximum shapes
    largest_intermediate_bytes: int | None = bounded(None, minimum=0)  # ONNX shape inference's estimate at those
    layer_info: LayerInfo | None = None
    timing_cache: TimingCacheUse | None = None
    built: str = ""


# -- the manifest --------------------------------------------------------------------------


@dataclass(kw_only=True)
class Manifest(JsonRecord):
    """``manifest.json``: the model family, its dimensions and constants, graphs, vocabulary and files.

    Read access by key (``manifest["graphs"]``) gives the manifest.json view of
    a field - plain JSON, a copy - for code written against the manifest as a dict.
    """

    kind: str = field(default=BUNDLE_KIND, metadata={"const": BUNDLE_KIND, "required": True})
    schema_version: int = field(default=SCHEMA_VERSION, metadata={"const": SCHEMA_VERSION, "required": True})
    family: str = field(metadata={"pattern": r"^[a-z][a-z0-9_]{0,31}$", "means": "a model family name"})
    dims: dict[str, JsonNumber] = field(metadata={"values": {"minimum": 0}})
    opset: int = bounded(17, minimum=7, maximum=30)
    threshold: FrozenConstant | None = None
    lambda_softmax: FrozenConstant | None = None
    intra_factor: FrozenConstant | None = None
    scorer_options: dict[str, JsonScalar] = field(default_factory=dict)
    graphs: dict[str, GraphEntry] = field(metadata=COMPONENT_KEYS)
    vocab: VocabEntry
    files: dict[str, str] = field(metadata={"key_pattern": SAFE_RELATIVE_PATH, "values": SHA256})
    versions: dict[str, str] = field(default_factory=dict)
    source_checkpoint: SourceCheckpoint | None = None
    image_preprocessing: ImagePreprocessingRecord | None = optional()
    traits: RuntimeTraits | None = optional()  # written by export; older manifests: itmrt.bundle.traits defaults
    parity: ExportParity | None = None
    # what `itmrt parity` accepts per precision: the exporting family's limits (absent: the defaults)
    deployment_tolerances: dict[str, DeploymentTolerance] = optional(dict, key_choices=PRECISIONS)
    created: str = ""
    export_seconds: float = bounded(0.0, minimum=0)
    precisions: PrecisionGraphs = optional(PrecisionGraphs)
    calibration: CalibrationRecord | None = optional()
    engines: dict[str, dict[str, EngineEntry]] = optional(dict, key_choices=PRECISIONS, values=COMPONENT_KEYS)

    # -- the manifest.json view --------------------------------------------------------

    def __getitem__(self, key: str) -> object:
        return self.to_json()[key]

    def get(self, key: str, default: object = None) -> object:
        return self.to_json().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()

    # -- lookups ------------------------------------------------------------------------

    def graph(self, component: str) -> GraphEntry:
        try:
            return self.graphs[component]
        except KeyError:
            raise ItmrtError(f"the bundle has no '{component}' graph; export it again") from None

    def variants(self, precision: str) -> Fp16Graphs | Int8Graphs | None:
        """The precision graphs made for ``precision`` (fp16, int8); None for fp32 or when none were made."""
        return getattr(self.precisions, Precision(precision).value, None)

    def variant(self, precision: str, component: str) -> Fp16Graph | Int8Graph | None:
        made = self.variants(precision)
        return made.graphs.get(component) if made is not None else None

    def precisions_made(self) -> list[str]:
        """Precisions for which at least one component has a graph (fp32 always)."""
        found = []
        for precision in PRECISIONS:
            variants = self.variants(precision) if precision != Precision.FP32 else None
            if precision == Precision.FP32 or (variants is not None and variants.graphs):
                found.append(precision)
        return found

    def graph_file(self, precision: str, component: str) -> str:
        """The bundle-relative ONNX file of ``component`` at ``precision`` (an error when it was never made)."""
        entry = self.graph(component)
        if Precision(precision) == Precision.FP32:
            return entry.file
        variant = self.variant(precision, component)
        if variant is None:
            raise ItmrtError(
                f"the bundle has no {precision} {component}; run `itmrt build BUNDLE --precision {precision}` first"
            )
        return variant.file

    def engine(self, precision: str, component: str) -> EngineEntry | None:
        return self.engines.get(precision, {}).get(component)

    def shape_range(self, axis: str) -> AxisRange | None:
        """The min/opt/max the bundle declares for a symbolic axis, if any graph declares one."""
        for entry in self.graphs.values():
            if axis in entry.shape_ranges:
                return entry.shape_ranges[axis]
        return None

    def file_references(self) -> Iterator[tuple[str, str, str | None]]:
        """Every file an entry names: (its key, the file, the sha256 the entry records or None)."""
        for name, entry in self.graphs.items():
            yield f"graphs.{name}.file", entry.file, entry.sha256
        yield "vocab.file", self.vocab.file, self.vocab.sha256
        for precision in (Precision.FP16, Precision.INT8):
            made = self.variants(precision)
            for name, variant in (made.graphs.items() if made is not None else ()):
                key = f"precisions.{precision}.graphs.{name}"
                yield f"{key}.file", variant.file, variant.sha256
                if isinstance(variant, Int8Graph) and variant.calibration is not None:
                    yield f"{key}.calibration", variant.calibration, None
        for name, saved in (self.calibration.graphs.items() if self.calibration is not None else ()):
            yield f"calibration.graphs.{name}.file", saved.file, saved.sha256
        for engine_precision, engines in self.engines.items():
            for name, engine in engines.items():
                key = f"engines.{engine_precision}.{name}"
                yield f"{key}.file", engine.file, engine.sha256
                yield f"{key}.graph_file", engine.graph_file, engine.graph_sha256
                if engine.layer_info is not None:
                    yield f"{key}.layer_info.file", engine.layer_info.file, engine.layer_info.sha256

    def axis_ranges(self) -> Iterator[tuple[str, AxisRange]]:
        """Every axis range the manifest records, with its key."""
        for name, entry in self.graphs.items():
            for axis, limits in entry.shape_ranges.items():
                yield f"graphs.{name}.shape_ranges.{axis}", limits
        for precision, engines in self.engines.items():
            for name, engine in engines.items():
                for axis, limits in engine.axis_ranges.items():
                    yield f"engines.{precision}.{name}.axis_ranges.{axis}", limits

    # -- changes ------------------------------------------------------------------------

    def record_file(self, file: str, sha256: str) -> None:
        """List a file the bundle holds with its sha256 (``itmrt check`` verifies it)."""
        self.files[file] = sha256


def tool_versions() -> dict[str, str]:
    """Versions of what made a precision graph or an engine (recorded beside it)."""
    import onnx
    import onnxruntime

    return {"itmrt": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def report_replacement(old: FileEntry | None, new: FileEntry, what: str, log: Log | None) -> None:
    """Say when an entry replaces another (never silently): unchanged, or which file and hash it replaced."""
    if old is None or log is None:
        return
    if old.sha256 == new.sha256:
        log(f"{what}: unchanged ({new.file})")
    else:
        log(f"{what}: replaced the previous entry ({old.file}, sha256 {old.sha256[:12]})")


# -- reading and writing ---------------------------------------------------------------


def value_problem(manifest: Manifest) -> RecordError | None:
    """The first value the schema cannot say is wrong: an axis range whose min/opt/max are out of order,
    a vocabulary id outside the vocabulary, a frozen constant out of range."""
    for key, limits in manifest.axis_ranges():
        if not limits.min <= limits.opt <= limits.max:
            return RecordError(key, f"has min {limits.min}, opt {limits.opt}, max {limits.max}, not min <= opt <= max")
    vocab = manifest.vocab
    for name in ("pad_id", "start_id", "end_id", "unk_id"):
        if getattr(vocab, name) >= vocab.size:
            return RecordError(f"vocab.{name}", f"is {getattr(vocab, name)}, outside the vocabulary of {vocab.size}")
    if manifest.threshold is not None and not -1.0 <= manifest.threshold.value <= 1.0:
        return RecordError("threshold.value", f"is {manifest.threshold.value}; a similarity threshold is in -1..1")
    for key in ("lambda_softmax", "intra_factor"):
        constant = getattr(manifest, key)
        if constant is not None and not constant.value > 0:
            return RecordError(f"{key}.value", f"is {constant.value}; it must be positive")
    return None


def parse_manifest(data: object, source: str | Path) -> Manifest:
    """A parsed ``manifest.json`` document as a :class:`Manifest`; a wrong value is one line naming its key."""
    manifest = parse_document(Manifest, data, source, "export the bundle again", value_problem)
    if manifest.traits is None:  # an older manifest: only a family this itmrt knows can say how it runs
        check_family(manifest.family)
    return manifest


def load_manifest_file(path: Path) -> tuple[Manifest, bytes]:
    """Read and check ``path``; returns the manifest and the file's bytes (for its sha256)."""
    data, raw = read_json_document(path, (BUNDLE_KIND,), SCHEMA_VERSION, "bundle manifest", "export the bundle again")
    return parse_manifest(data, path), raw


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of the bundle at ``folder``; every failure is a one-line :class:`ItmrtError`."""
    from itmrt.bundle.folder import read_bundle

    return read_bundle(folder).manifest


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (the last file an export writes); a NaN or infinite value, which
    JSON cannot hold, is refused."""
    try:
        text = json.dumps(manifest.to_json(), indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise ItmrtError(f"a value for {Path(folder) / MANIFEST_NAME} is NaN or infinite (a measured error or a "
                         "constant): nothing was recorded; check the inputs that produced it") from None
    return atomic_write_text(Path(folder) / MANIFEST_NAME, text)


def update_manifest(folder: str | Path, change: Callable[[Manifest], None]) -> Manifest:
    """Read the manifest, apply ``change`` to it in memory, write it back atomically; return it."""
    manifest = read_manifest(folder)
    change(manifest)
    write_manifest(folder, manifest)
    return manifest


def manifest_schema() -> dict[str, object]:
    """The JSON Schema of ``manifest.json`` (what ``manifest.schema.json`` holds)."""
    return json_schema(Manifest, "itmrt bundle manifest (schema version 1)", SCHEMA_ID)


__all__ = [
    "VOCAB_FILE",
    "AxisRange",
    "CalibrationFile",
    "CalibrationRecord",
    "EngineEntry",
    "ExportParity",
    "FileEntry",
    "Fp16Graph",
    "Fp16Graphs",
    "FrozenConstant",
    "GraphEntry",
    "ImagePreprocessingRecord",
    "Int8Graph",
    "LayerInfo",
    "Int8Graphs",
    "Manifest",
    "NodeNote",
    "ParitySample",
    "PrecisionGraphs",
    "ProfileShapes",
    "SourceCheckpoint",
    "TensorSpec",
    "Tf32Record",
    "TimingCacheUse",
    "VariantGraph",
    "VocabEntry",
    "load_manifest_file",
    "manifest_schema",
    "parse_manifest",
    "read_manifest",
    "report_replacement",
    "timestamp",
    "tool_versions",
    "update_manifest",
    "write_manifest",
]
