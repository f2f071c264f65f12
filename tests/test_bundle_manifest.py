"""The typed manifest: schema version 1 manifests still read, wrong values are one line naming the key,
and the JSON Schema shipped for other tools accepts exactly what the reader accepts."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from itmrt.bundle.folder import read_bundle
from itmrt.bundle.manifest import SCHEMA_FILE, Manifest, manifest_schema, parse_manifest
from itmrt.bundle.record import RecordError
from itmrt.errors import ItmrtError

FIXTURES = Path(__file__).parent / "data" / "manifests_v1"
ENGINE_ENTRY = {  # what `itmrt build` wrote for an engine at fe33df8 (engine/build.py's entry)
    "file": "engines/fp16/scorer.plan", "sha256": "ab" * 32, "graph_file": "precision/fp16/scorer.onnx",
    "graph_sha256": "cd" * 32, "tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA Jetson Orin",
    "compute_capability": "8.7", "profile": {"lengths": {"min": [1], "opt": [32], "max": [128]}},
    "workspace_mb": None, "built": "2026-01-01T00:00:00+00:00",
}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}_v1.json").read_text())


def with_engine() -> dict[str, Any]:
    data = fixture("naaf")
    data["engines"] = {"fp16": {"scorer": copy.deepcopy(ENGINE_ENTRY)}}
    return data


def write_bundle(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("name", ["naaf", "scan", "cmpm"])
def test_manifests_written_by_schema_v1_itmrt_read(name: str, tmp_path: Path) -> None:
    data = fixture(name)
    info = read_bundle(write_bundle(tmp_path / name, data))
    manifest = info.manifest
    assert manifest.family == name and manifest.graph("scorer").file == "scorer.onnx"
    assert manifest.vocab.size == data["vocab"]["size"] and manifest.files == data["files"]
    assert manifest.graph("text_encoder").input_names() == ["token_ids", "lengths"]
    assert (manifest.threshold is not None) == (name == "naaf")
    assert manifest.parity is not None and manifest.parity.top10_identical is True
    again = Manifest.from_json(json.loads(json.dumps(manifest.to_json())))
    assert again == manifest  # written back, it reads the same
    for key in data:  # and the dict view still answers what the dict did
        assert manifest[key] == data[key] or key == "precisions"


def test_precision_calibration_and_engine_entries_are_typed() -> None:
    manifest = parse_manifest(with_engine(), "manifest.json")
    assert manifest.precisions_made() == ["fp32", "fp16", "int8"]
    assert manifest.graph_file("fp16", "scorer") == "precision/fp16/scorer.onnx"
    assert manifest.variant("int8", "text_encoder").calibration is None  # type: ignore[union-attr]
    assert manifest.calibration is not None and set(manifest.calibration.graphs) == {"image_encoder", "scorer"}
    engine = manifest.engine("fp16", "scorer")
    assert engine is not None and engine.profile["lengths"].max == [128] and engine.workspace_mb is None
    assert manifest.engine("int8", "scorer") is None


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (lambda m: m["graphs"]["scorer"]["inputs"][0].update(dtype=3), "graphs.scorer.inputs[0].dtype",
         "must be a string, not 3"),
        (lambda m: m["vocab"].update(size="50"), "vocab.size", 'must be an integer, not "50"'),
        (lambda m: m["graphs"]["scorer"].pop("sha256"), "graphs.scorer.sha256", "is missing"),
        (lambda m: m["threshold"].update(value=None), "threshold.value", "must be a number, not null"),
        (lambda m: m.update(files=[]), "files", "must be an object, not list"),
        (lambda m: m["graphs"]["scorer"].update(file="../../outside.onnx"), "graphs.scorer.file",
         "not a relative path inside the folder"),
        (lambda m: m["files"].update({"/etc/passwd": "00"}), "files./etc/passwd",
         "not a relative path inside the folder"),
        (lambda m: m["engines"]["fp16"]["scorer"].update(gpu_name=8.7), "engines.fp16.scorer.gpu_name",
         "must be a string"),
    ],
)
def test_a_wrong_value_is_one_line_naming_its_key(tmp_path: Path, change: Any, key: str, problem: str) -> None:
    data = with_engine()
    change(data)
    with pytest.raises(ItmrtError) as error:
        read_bundle(write_bundle(tmp_path / "bundle", data))
    message = str(error.value)
    assert "\n" not in message
    assert f"'{key}' " in message and problem in message and message.endswith("export the bundle again")


def test_unknown_keys_are_kept_when_the_manifest_is_written_back() -> None:
    data = fixture("naaf")
    data["made_by_a_newer_itmrt"] = {"x": 1}
    data["graphs"]["scorer"]["note"] = "kept"
    written = parse_manifest(data, "manifest.json").to_json()
    assert written["made_by_a_newer_itmrt"] == {"x": 1}
    assert written["graphs"]["scorer"]["note"] == "kept"  # type: ignore[index]


# -- the JSON Schema and the reader agree ----------------------------------------------------------


def test_schema_file_is_generated_from_the_records() -> None:
    """``manifest.schema.json`` is :func:`manifest_schema` (regenerate it when a record changes)."""
    assert json.loads(SCHEMA_FILE.read_text()) == manifest_schema()


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))


WRONG_VALUES = ["text", 7, 2.5, True, None, [1], {"k": "v"}]


def _wrong_value(value: Any, turn: int) -> Any:
    """A value of another JSON type than ``value`` (which one turns with ``turn``: every type gets tried)."""
    others = [
        c for c in WRONG_VALUES if type(c) is not type(value) and not (isinstance(value, float) and type(c) is int)
    ]
    return others[turn % len(others)]


def _setter(document: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = document
    for key in path[:-1]:
        node = node[key]

    def put(value: Any) -> None:
        node[path[-1]] = value

    return put


def _small(value: Any, key: Any = None) -> Any:
    """The document with every list cut to its first item and every per-graph map to the scorer's entry
    (one of each kind of value is enough to compare the two checks; jsonschema is slow on the full one)."""
    if isinstance(value, list):
        return [_small(item) for item in value[:1]]
    if isinstance(value, dict):
        keys = ["scorer"] if key == "graphs" and "scorer" in value else list(value)[: 2 if key == "files" else None]
        return {k: _small(value[k], k) for k in keys}
    return value


def _reader_accepts(document: dict[str, Any]) -> bool:
    try:
        Manifest.from_json(document)
    except RecordError:
        return False
    return True


def test_schema_and_reader_accept_and_refuse_the_same_manifests() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(manifest_schema())
    documents = [fixture("naaf"), fixture("scan"), fixture("cmpm"), with_engine()]
    for document in documents:
        assert validator.is_valid(document) and _reader_accepts(document)
    base = _small(with_engine())
    refused = mutations = 0
    for turn, (path, value) in enumerate(list(_leaves(base))[1:]):
        put, wrong = _setter(base, path), _wrong_value(value, turn)
        put(wrong)
        mutations += 1
        reader, schema = _reader_accepts(base), validator.is_valid(base)
        assert reader == schema, f"{'/'.join(map(str, path))} = {wrong!r}: reader {reader}, schema {schema}"
        refused += not reader
        put(value)
    assert mutations > 150 and refused > 0.8 * mutations
