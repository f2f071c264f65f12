"""A bundle or gallery folder is a closed world: every file it names lies inside it and is listed with its sha256.

The rules, in one place (the bundle and gallery readers apply them; every stage
opens a folder's files through those readers):

- a name is a plain relative path: no ``..`` segment, not absolute, no drive or
  backslash (:data:`~itmrt.bundle.record.SAFE_RELATIVE_PATH`, checked by the
  document's schema), and it *resolves* inside the folder: no symlink - the
  file's own or a folder's on the way - leads out of it;
- an ONNX graph's external data (the ONNX external-data format: a tensor whose
  ``data_location`` is ``EXTERNAL`` names a ``location`` relative to the graph's
  folder) follows the same rule, and every such file is listed and hashed like
  the graph itself, because ONNX Runtime reads it when it loads the graph;
- nothing listed is optional: a file the document names must be in its list
  with the same sha256, and that sha256 is checked before the file is used.

Errors are one line naming the folder, the name and what to do.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeGuard

from itmrt.bundle.record import SAFE_RELATIVE_PATH, matches
from itmrt.documents import sha256_file
from itmrt.errors import ItmrtError
from itmrt.file_states import LISTED

NAME_MAX = 255
"""Bytes in one segment of a path at most (Linux, macOS and Windows file systems alike)."""
_EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


def _openable_relative(name: object) -> TypeGuard[str]:
    """A plain relative path (:data:`SAFE_RELATIVE_PATH`) the system can open: no NUL byte, no lone surrogate,
    no segment over 255 bytes (each raised from deep inside pathlib or ``open`` instead of a line naming it)."""
    if not isinstance(name, str) or "\0" in name or not matches(SAFE_RELATIVE_PATH, name):
        return False
    try:
        return all(len(os.fsencode(part)) <= NAME_MAX for part in name.split("/"))
    except UnicodeEncodeError:
        return False


def member(folder: Path, name: object, what: str, remedy: str) -> Path:
    """The path of ``name`` inside ``folder``, refused unless it is a plain relative path that resolves inside.

    ``what`` names the folder in the message ("bundle", "gallery"); ``remedy`` ends it.
    """
    if not _openable_relative(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ItmrtError(f"{what} {folder} names {shown}, which is not a relative path inside the folder; {remedy}")
    path = folder / name
    root = folder.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ItmrtError(f"{what} {folder}: {name} cannot be resolved ({exc.__class__.__name__}); {remedy}") from None
    if resolved != root and root not in resolved.parents:
        raise ItmrtError(f"{what} {folder}: {name} leads outside the folder (a symlink to {resolved}); {remedy}")
    try:
        mode = resolved.stat().st_mode
    except OSError:
        return path  # absent: the caller says what it lacks
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO would block its reader forever
        raise ItmrtError(f"{what} {folder}: {name} is not a regular file (a pipe, socket or device); {remedy}")
    return path


def verified_member(folder: Path, name: str, listed: Mapping[str, str], what: str, remedy: str) -> Path:
    """:func:`member`, present, listed in ``listed`` (name -> sha256) and matching that sha256 (hashed again only
    when the file changed since it last matched: :mod:`itmrt.file_states`)."""
    path = member(folder, name, what, remedy)
    expected = listed.get(name)
    if expected is None:
        raise ItmrtError(f"{what} {folder} uses {name}, which its file list does not hold with a sha256; {remedy}")
    if not path.is_file():
        raise ItmrtError(f"{what} {folder} lacks {name}, which its file list names; {remedy}")

    def hash_as_listed() -> None:
        if sha256_file(path) != expected:
            raise ItmrtError(f"{path} does not match the sha256 in the {what}'s file list (truncated or changed "
                             f"after it was written); {remedy}")

    LISTED.check(path, expected, hash_as_listed)
    return path


# -- ONNX external data --------------------------------------------------------------------


def _graph_tensors(graph: object) -> Iterator[object]:
    """Every tensor of an ONNX graph that may hold data: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer  # type: ignore[attr-defined]
    for sparse in graph.sparse_initializer:  # type: ignore[attr-defined]
        yield sparse.values
        yield sparse.indices
    for node in graph.node:  # type: ignore[attr-defined]
        yield from _node_tensors(node)


def _node_tensors(node: object) -> Iterator[object]:
    for attribute in node.attribute:  # type: ignore[attr-defined]
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        for sparse in [attribute.sparse_tensor, *attribute.sparse_tensors]:
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for subgraph in attribute.graphs:
            yield from _graph_tensors(subgraph)


def external_data_locations(model: object) -> list[str]:
    """The external-data files an ONNX ``ModelProto`` (loaded without its external data) refers to, in order.

    A tensor stored outside the graph file names its file in its ``location`` entry;
    an entry itmrt does not know, or a ``basepath`` (which would move the folder the
    location is relative to), is refused: it could point the reader elsewhere.
    """
    from onnx import TensorProto

    locations: list[str] = []
    tensors = list(_graph_tensors(model.graph))  # type: ignore[attr-defined]
    for function in model.functions:  # type: ignore[attr-defined]
        for node in function.node:
            tensors.extend(_node_tensors(node))
    for tensor in tensors:
        if tensor.data_location != TensorProto.EXTERNAL:  # type: ignore[attr-defined]
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}  # type: ignore[attr-defined]
        unknown = sorted(set(entries) - _EXTERNAL_DATA_KEYS) + (["basepath"] if entries.get("basepath") else [])
        if unknown or not entries.get("location"):
            problem = f"external-data key {unknown[0]!r}" if unknown else "no external-data location"
            raise ItmrtError(f"tensor {tensor.name!r} has {problem}")  # type: ignore[attr-defined]
        if entries["location"] not in locations:
            locations.append(entries["location"])
    return locations


def check_graph_file(folder: Path, name: str, listed: Mapping[str, str], what: str, remedy: str,
                     verify: bool = True) -> list[str]:
    """Check the external data of the listed graph ``name`` (already verified): each location a file inside
    ``folder`` that ``listed`` holds, and with ``verify`` one that matches its sha256. Returns the external
    files' names; a one-line error otherwise."""
    import onnx

    path = folder / name
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others on a damaged file
        raise ItmrtError(f"{path} is not a readable ONNX graph ({exc.__class__.__name__}); {remedy}") from None
    try:
        locations = external_data_locations(model)
    except ItmrtError as exc:
        raise ItmrtError(f"{what} {folder}: graph {name}: {exc}; {remedy}") from None
    base = Path(name).parent
    files = []
    for location in locations:
        relative = (base / location).as_posix() if base != Path(".") else location
        if not matches(SAFE_RELATIVE_PATH, location):
            raise ItmrtError(f"{what} {folder}: graph {name} keeps weights in {location!r}, which is not a relative "
                             f"path inside the folder; {remedy}")
        if verify:
            verified_member(folder, relative, listed, what, remedy)
        elif relative not in listed:
            member(folder, relative, what, remedy)
            raise ItmrtError(f"{what} {folder}: graph {name} keeps weights in {relative}, which its file list does "
                             f"not hold with a sha256; {remedy}")
        else:
            member(folder, relative, what, remedy)
        files.append(relative)
    return files
