"""``.npy`` files read defensively: the header is checked before numpy maps the data.

``np.load`` takes any file that does not start with NumPy's magic string for
a pickle (and with ``allow_pickle=False`` says "pickled data" about a text
file), and maps a truncated file until a read fails. :func:`read_npy_header`
reads the header itself - magic, version, the dictionary (with numpy's own
parser and its header-size cap), dtype and shape - and checks the file holds
all the data the header announces, so every malformed file is a one-line
:class:`~itmrt.errors.DataError` saying what it is.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import tokenize
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itmrt.documents import not_a_file, open_regular
from itmrt.errors import DataError, first_line
from itmrt.file_states import LISTED, file_state, hash_started

NPY_MAGIC = b"\x93NUMPY"
HEADER_PARSING = threading.Lock()
"""Held while numpy parses a header (``ast.literal_eval``): CPython 3.11 raised "SystemError: AST constructor
recursion depth mismatch" when two threads did it at once - shards are opened on one thread per core, and a
service's reloader opens a version while its worker checks the files in use - and a good version was refused."""
NUMERIC_KINDS = "biuf"
"""Array kinds itmrt reads: booleans, signed and unsigned integers, floats."""
_HEADER_ERRORS = (ValueError, TypeError, SyntaxError, tokenize.TokenError, KeyError, EOFError, OverflowError,
                  UnicodeDecodeError, RecursionError, MemoryError)
"""What numpy's header parser (``ast.literal_eval`` over a ``tokenize``-filtered dict) raises on damaged bytes."""


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header says: shape, dtype, order, and where the data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _not_npy(path: Path, head: bytes, what: str) -> DataError:
    if head.startswith(b"PK"):
        kind = "it is a .npz archive of several arrays"
    elif head[:1] == b"\x80":
        kind = "it holds pickled Python data"
    else:
        kind = "it does not start with NumPy's header (is it text?)"
    return DataError(f"{what} file {path} is not a readable .npy file: {kind}; save one array with numpy.save")


def read_npy_header(path: Path, what: str = "array") -> NpyHeader:
    """The header of the ``.npy`` file at ``path``, checked; a one-line :class:`DataError` for anything else."""
    try:
        size = path.stat().st_size
        with open_regular(path) as handle:
            head = handle.read(len(NPY_MAGIC) + 2)
            if not head.startswith(NPY_MAGIC):
                raise _not_npy(path, head, what)
            version = (head[6], head[7]) if len(head) == 8 else None
            if version not in ((1, 0), (2, 0)):
                raise DataError(f"{what} file {path} has .npy format version {version}, which itmrt does not read; "
                                "save it with numpy.save")
            handle.seek(0)
            np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            with HEADER_PARSING:
                shape, fortran_order, dtype = reader(handle)
            offset = handle.tell()
    except OSError as exc:
        raise DataError(f"cannot read {what} file {path}: {exc.strerror or first_line(exc)}") from None
    except _HEADER_ERRORS as exc:
        raise DataError(f"{what} file {path} has a damaged .npy header ({first_line(exc)[:120]}); "
                        "save it again with numpy.save") from None
    return _checked_header(path, what, NpyHeader(tuple(shape), dtype, bool(fortran_order), offset), size)


def _checked_header(path: Path, what: str, header: NpyHeader, size: int) -> NpyHeader:
    if header.dtype.hasobject:
        raise DataError(f"{what} file {path} holds Python objects (pickled data), which itmrt does not load; "
                        "save a numeric array")
    if header.dtype.kind not in NUMERIC_KINDS or header.dtype.fields is not None:
        raise DataError(f"{what} file {path} has dtype {header.dtype}, not a numeric array; save a float32 array")
    if any(dim < 0 for dim in header.shape):
        raise DataError(f"{what} file {path} has a negative size in its shape {header.shape}")
    if size < header.data_offset + header.data_bytes:
        raise DataError(
            f"{what} file {path} is truncated: its header announces {header.data_bytes} bytes of data "
            f"({header.shape}, {header.dtype}), the file holds {max(size - header.data_offset, 0)}; write it again"
        )
    if size > header.data_offset + header.data_bytes:  # numpy maps only what the header says: rows left unread
        raise DataError(
            f"{what} file {path} holds {size - header.data_offset - header.data_bytes} bytes past the "
            f"{header.data_bytes} its header announces ({header.shape}, {header.dtype}): the header does not "
            "describe the whole file; write it again with numpy.save"
        )
    return header


def open_npy(path: Path, what: str) -> np.ndarray:
    """Memory-map a .npy file (never unpickling); one-line :class:`DataError` when it is missing or unreadable."""
    if path.is_dir():
        raise DataError(f"{what} file {path} is a folder; give the path of a .npy file")
    if not path.is_file():
        raise DataError(f"{what} file {path} {not_a_file(path, 'not found')}")
    read_npy_header(path, what)
    try:
        with HEADER_PARSING:  # np.load parses the header again
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{what} file {path} is not a readable .npy array ({first_line(exc)}); "
                        "re-save it with numpy.save") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{what} file {path} is not a single .npy array; re-save it with numpy.save")
    return array


def _pread_into(fd: int, view: memoryview, position: int, path: Path, what: str, remedy: str) -> None:
    done = 0
    while done < len(view):
        try:
            count = os.preadv(fd, [view[done:]], position + done)
        except OSError as exc:
            raise DataError(f"cannot read {what} file {path}: {exc.strerror or first_line(exc)}") from None
        if count <= 0:
            raise DataError(f"{what} file {path} ended after {position + done} bytes, before the {position + len(view)}"
                            f" its header announces (truncated while it was read); {remedy}")
        done += count


def read_npy_copy(path: Path, what: str, sha256: str | None = None, remedy: str = "write it again") -> np.ndarray:
    """A whole ``.npy`` file copied into this process's memory by positional reads, its header checked and, given
    ``sha256``, the bytes read hashed against it (unless the file was found as listed before and did not change
    while it was read: :mod:`itmrt.file_states`).

    No memory map exists at any moment, so a file truncated while it is read is a short read - a one-line
    :class:`DataError` - never SIGBUS; and the copy is exactly the bytes that matched the sha256, whatever happens
    to the file before or after (a check of the file followed by a read of it could not promise either). A copy read
    against a ``sha256`` is read-only, and shared with later reads of files of the same content (:data:`_COPIES`)."""
    header = read_npy_header(path, what)
    if header.fortran_order:
        raise DataError(f"{what} file {path} is stored in Fortran order; {remedy}")
    if sha256 is not None:
        held = _COPIES.get(sha256)
        if held is not None and LISTED.known(file_state(path, sha256)):
            return held
    array = np.empty(header.shape, dtype=header.dtype)
    data = array.reshape(-1).view(np.uint8)
    started = hash_started()
    try:
        handle = open_regular(path)
    except OSError as exc:
        raise DataError(f"cannot read {what} file {path}: {exc.strerror or first_line(exc)}") from None
    fd = handle.fileno()  # read by position (os.preadv), never through the buffer
    try:
        before = file_state(path, sha256, os.fstat(fd)) if sha256 is not None else None
        head = np.empty(header.data_offset, dtype=np.uint8)
        _pread_into(fd, head.data, 0, path, what, remedy)
        _pread_into(fd, data.data, header.data_offset, path, what, remedy)
        end = header.data_offset + data.nbytes
        tail = np.empty(max(0, os.fstat(fd).st_size - end), dtype=np.uint8) if sha256 is not None else data[:0]
        _pread_into(fd, tail.data, end, path, what, remedy)
        unchanged = before is not None and file_state(path, str(sha256), os.fstat(fd)) == before
    finally:
        handle.close()
    if sha256 is not None and not (unchanged and before is not None and LISTED.known(before)):
        digest = hashlib.sha256(head.data)
        digest.update(data.data)
        digest.update(tail.data)
        if digest.hexdigest() != sha256:
            raise DataError(f"{path} does not match the sha256 its file list records (truncated or changed after "
                            f"it was written); {remedy}")
        if unchanged and before is not None:
            LISTED.remember(before, started)
    if sha256 is not None:
        array.flags.writeable = False
        _COPIES[sha256] = array
    return array


_COPIES: weakref.WeakValueDictionary[str, np.ndarray] = weakref.WeakValueDictionary()
"""Copies made by :func:`read_npy_copy` that are still in use, by the sha256 they matched: another file found
with the same content (the centroids and codec every shard of a build shares: 20 copies of 32 MB at a million
images) is not read again while its state shows it unchanged since it was found as listed; its copy is shared,
read-only."""
