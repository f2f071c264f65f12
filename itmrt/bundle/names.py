"""The names a bundle is made of: components, precisions, backends, axes, frozen constants, file layout.

This is the one home of these strings. Every stage (export, calibration,
engine build, runtime, reports) imports them from here, so a name can change in
one place. The enums are ``str`` enums: a member compares equal to its value
(``Precision.FP16 == "fp16"``), so manifests stay plain JSON and typer lists
the choices in ``--help``.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from itmrt.errors import ItmrtError

ChoiceT = TypeVar("ChoiceT", bound=Enum)


class Choice(str, Enum):
    """A str enum whose members print as their values (``f"{Precision.FP16}"`` is ``fp16``)."""

    def __str__(self) -> str:
        return str(self.value)


class Component(Choice):
    """The three graphs of every bundle."""

    IMAGE_ENCODER = "image_encoder"
    TEXT_ENCODER = "text_encoder"
    SCORER = "scorer"


class Precision(Choice):
    """Numeric precision of a graph or engine; fp16 and int8 live in the ONNX graph itself."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class BackendName(Choice):
    """What runs a bundle: ONNX Runtime sessions or native TensorRT engines."""

    ORT = "ort"
    TRT = "trt"


def parse_choice(choices: type[ChoiceT], value: str | ChoiceT, what: str) -> ChoiceT:
    """``value`` as a member of the str enum ``choices``; a one-line :class:`ItmrtError` naming the choices."""
    try:
        return choices(value)
    except ValueError:
        names = ", ".join(str(member.value) for member in choices)
        raise ItmrtError(f"unknown {what} {str(value)!r}; choose one of {names}") from None


BUILTIN_FAMILIES: tuple[str, ...] = ("naaf", "scan", "cmpm")
"""The model families itmrt ships (:mod:`itmrt.families` registers their specs)."""
_OTHER_FAMILIES: list[str] = []


_REGISTERED: dict[str, object] = {}
"""The spec objects the family registry holds, by name (opaque here: the bundle layer never calls them)."""


def note_family(name: str, spec: object | None = None) -> None:
    """Record a registered family (``itmrt.families.register`` calls this) and, when given, its spec."""
    if name not in BUILTIN_FAMILIES and name not in _OTHER_FAMILIES:
        _OTHER_FAMILIES.append(name)
    if spec is not None:
        _REGISTERED[name] = spec


def forget_family(name: str) -> None:
    if name in _OTHER_FAMILIES:
        _OTHER_FAMILIES.remove(name)
    _REGISTERED.pop(name, None)


def registered_family(name: str) -> object | None:
    """The spec registered for family ``name`` in this process, or None (its code is not loaded)."""
    return _REGISTERED.get(name)


def family_names() -> tuple[str, ...]:
    """The families a manifest may name: the built-in ones and any registered in this process."""
    return (*BUILTIN_FAMILIES, *_OTHER_FAMILIES)


def check_family(name: str) -> None:
    """Refuse a family name this itmrt does not know (the registry's own one-line message)."""
    if name not in family_names():
        raise ItmrtError(f"unknown model family {name!r}; this itmrt knows {', '.join(family_names())}")


COMPONENTS: tuple[str, ...] = tuple(c.value for c in Component)
PRECISIONS: tuple[str, ...] = tuple(p.value for p in Precision)
BACKENDS: tuple[str, ...] = tuple(b.value for b in BackendName)

# Symbolic axis names shared by every graph and by the manifest's shape ranges.
BATCH_IMAGES = "batch_images"
NUM_REGIONS = "num_regions"
BATCH_CAPTIONS = "batch_captions"
MAX_LENGTH = "max_length"
AXES: tuple[str, ...] = (BATCH_IMAGES, NUM_REGIONS, BATCH_CAPTIONS, MAX_LENGTH)

# Graph input and output names.
REGION_FEATURES = "region_features"
IMAGES = "images"
TOKEN_IDS = "token_ids"
LENGTHS = "lengths"
IMAGE_EMBEDDINGS = "image_embeddings"
CAPTION_EMBEDDINGS = "caption_embeddings"
SCORES = "scores"

# Initializer (and scorer-graph metadata) names of the constants export freezes into the scorer.
NAAF_THRESHOLD = "naaf_threshold"
NAAF_LAMBDA = "naaf_lambda"
NAAF_INTRA_FACTOR = "naaf_intra_factor"
SCAN_LAMBDA_SOFTMAX = "scan_lambda_softmax"
SCAN_LAMBDA_LSE = "scan_lambda_lse"

# SCAN's option values (its scorer graph's metadata records the chosen ones; the torch-free runtime checks them).
SCAN_CROSS_ATTN = ("t2i", "i2t")
SCAN_RAW_FEATURE_NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm")
SCAN_AGG_FUNCS = ("LogSumExp", "Mean", "Max", "Sum")

# The manifest's kind and schema version (entries are additive: new optional keys keep the version).
BUNDLE_KIND = "itmrt-bundle"
SCHEMA_VERSION = 1

# File layout inside a bundle folder.
MANIFEST_NAME = "manifest.json"
VOCAB_FILE = "vocab.json"
PRECISION_DIR = "precision"
CALIBRATION_DIR = "calibration"
ENGINE_DIR = "engines"
TIMING_CACHE_DIR = f"{ENGINE_DIR}/timing"  # TensorRT timing caches, one per TensorRT version and GPU
ORT_TENSORRT_CACHE_DIR = "cache/ort-tensorrt"  # ONNX Runtime's TensorRT provider: engine and timing caches


GRAPH_FILES: dict[str, str] = {component.value: f"{component.value}.onnx" for component in Component}
"""Bundle-relative file of each exported (fp32) graph."""


def precision_file(precision: str, component: str) -> str:
    """Bundle-relative file of a precision variant's graph (fp16 / int8)."""
    return f"{PRECISION_DIR}/{Precision(precision).value}/{Component(component).value}.onnx"


def calibration_file(component: str) -> str:
    """Bundle-relative file of a graph's INT8 calibration ranges."""
    return f"{CALIBRATION_DIR}/{Component(component).value}.json"


def engine_file(precision: str, component: str) -> str:
    """Bundle-relative file of a TensorRT engine."""
    return f"{ENGINE_DIR}/{Precision(precision).value}/{Component(component).value}.plan"


def layer_info_file(precision: str, component: str) -> str:
    """Bundle-relative file of a TensorRT engine's layer information (the engine inspector's JSON)."""
    return f"{ENGINE_DIR}/{Precision(precision).value}/{Component(component).value}.layers.json"
