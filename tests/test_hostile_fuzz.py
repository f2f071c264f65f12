"""Property-based fuzzing (hypothesis) of the readers hostile files reach first: the caption reader, the
``.npy`` header reader, and the bundle and gallery manifest readers. Whatever the bytes, each reader either
succeeds or raises a one-line :class:`~itmrt.errors.ItmrtError` - never another exception."""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from itmrt.errors import ItmrtError

EXAMPLES = int(os.environ.get("ITMRT_FUZZ_EXAMPLES", "300"))
"""Examples per property: 300 keeps the suite fast; ``ITMRT_FUZZ_EXAMPLES=5000`` searches harder."""
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIXTURES = Path(__file__).parent / "data" / "manifests_v1"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def one_line_or_success(call: Any) -> Any:
    try:
        return call()
    except ItmrtError as exc:
        assert "\n" not in str(exc) and str(exc), repr(exc)
        return None


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(lambda text: text.encode("utf-8")))
def test_caption_reader(scratch: Path, data: bytes) -> None:
    from itmrt.data.precomp import read_captions

    path = scratch / "captions.txt"
    path.write_bytes(data)
    captions = one_line_or_success(lambda: read_captions(path))
    if captions is not None:
        assert captions and all(c and c == c.strip() and "\n" not in c and "\r" not in c for c in captions)


def _npy(shape: tuple[int, ...], dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()


@FUZZ
@given(shape=st.lists(st.integers(0, 5), max_size=3).map(tuple), dtype=st.sampled_from(["<f4", "<f2", "<i8", "|u1"]),
       cut=st.integers(0, 200), start=st.integers(0, 140), junk=st.binary(max_size=40))
def test_npy_header_reader(scratch: Path, shape: tuple[int, ...], dtype: str, cut: int, start: int,
                           junk: bytes) -> None:
    """A valid file, then cut short and with a run of bytes replaced: only a one-line error or a checked header."""
    from itmrt.data.npy import read_npy_header

    valid = _npy(shape, dtype)
    data = (valid[:start] + junk + valid[start + len(junk):])[: max(len(valid) - cut, 0)]
    path = scratch / "array.npy"
    path.write_bytes(data)
    header = one_line_or_success(lambda: read_npy_header(path))
    if header is not None:
        assert len(data) >= header.data_offset + header.data_bytes and not header.dtype.hasobject


@FUZZ
@given(data=st.binary(max_size=400))
def test_npy_header_reader_on_any_bytes(scratch: Path, data: bytes) -> None:
    from itmrt.data.npy import read_npy_header

    path = scratch / "any.npy"
    path.write_bytes(b"\x93NUMPY" + data if data[:1] == b"\x01" else data)
    one_line_or_success(lambda: read_npy_header(path))


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


def _replace(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


@FUZZ
@given(choice=st.integers(0, 10_000), value=json_values, name=st.sampled_from(["naaf", "scan", "cmpm"]))
def test_manifest_reader_on_mutated_manifests(scratch: Path, choice: int, value: Any, name: str) -> None:
    """One value anywhere in a real manifest replaced by any JSON value."""
    from itmrt.bundle.folder import read_bundle

    document = json.loads((FIXTURES / f"{name}_v1.json").read_text())
    paths = _paths(document)
    mutated = _replace(copy.deepcopy(document), paths[choice % len(paths)], value)
    (scratch / "manifest.json").write_text(json.dumps(mutated))
    one_line_or_success(lambda: read_bundle(scratch))


@FUZZ
@given(data=st.binary(max_size=300))
def test_manifest_reader_on_any_bytes(scratch: Path, data: bytes) -> None:
    from itmrt.bundle.folder import read_bundle

    (scratch / "manifest.json").write_bytes(data)
    one_line_or_success(lambda: read_bundle(scratch))


@FUZZ
@given(choice=st.integers(0, 10_000), value=json_values)
def test_gallery_manifest_reader_on_mutated_documents(scratch: Path, choice: int, value: Any) -> None:
    from itmrt.bundle.gallery_manifest import read_gallery_manifest

    document = {"kind": "itmrt-gallery", "schema_version": 1,
                "bundle": {"path": "/b", "manifest_sha256": "a" * 64, "family": "naaf"},
                "embeddings": {"file": "image_embeddings.npy", "sha256": "b" * 64, "shape": [6, 10, 32],
                               "dtype": "float32"},
                "ids": {"file": "image_ids.json", "sha256": "c" * 64, "count": 6}}
    paths = _paths(document)
    mutated = _replace(copy.deepcopy(document), paths[choice % len(paths)], value)
    folder = scratch / "gallery"
    folder.mkdir(exist_ok=True)
    (folder / "gallery.json").write_text(json.dumps(mutated))
    one_line_or_success(lambda: read_gallery_manifest(folder))
