"""Reading what itmrt and its users wrote: itmrt JSON documents (bundle and gallery manifests, reports) read
strictly and checked for their kind and schema, sha256 hashes of files and bytes, and the one-line reason a path
that is not a regular file cannot be read as one. Writing lives in :mod:`itmrt.publish`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

from itmrt.errors import ItmrtError, os_error_message

MAX_DOCUMENT_BYTES = 64 << 20
"""The largest itmrt JSON document read (manifests are kilobytes; this only stops a runaway file)."""


def as_path(value: object, role: str) -> Path:
    """``value``, a ``str`` or ``os.PathLike``, as a Path; anything else is one line naming ``role`` (pathlib
    raised a TypeError for a number or None, and took an empty string as the current folder)."""
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value):
        return Path(value)
    given = "an empty string" if value == "" else type(value).__name__
    raise ItmrtError(f"{role} must be a path (a str or pathlib.Path), not {given}")


def not_a_file(path: str | os.PathLike[str], missing: str = "does not exist") -> str:
    """Why ``path``, which is not a regular file, cannot be read as one: a phrase that ends "PATH ..."
    (``missing`` when nothing is there). A device, pipe or socket is named as such: it may never end
    (``/dev/zero``) or block (a FIFO)."""
    path = Path(path)
    if path.is_dir():
        return "is a folder"
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "is a symbolic link that leads back to itself (a loop of links)"
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if path.exists():
        return "is not a regular file (a device, pipe or socket)"
    return missing


def open_regular(path: str | os.PathLike[str]) -> io.BufferedReader:
    """``path`` opened for reading in binary, refused with an :class:`OSError` (one line: "not a regular file")
    unless it is a regular file. The open itself cannot block: a FIFO put where a file should be would otherwise
    wait for a writer forever (and keep a process from exiting), a device may never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a folder, pipe, socket or device)", str(path))
        os.set_blocking(fd, True)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`)."""
    with open_regular(path) as handle:
        return handle.read()


# -- hashes ---------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory (a file about to be written, a manifest as read)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files are not loaded whole."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- JSON documents ---------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice: which value was meant is not said (``json`` keeps the last)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _value in pairs:
        if key in seen:
            raise DuplicateKeyError(f"the key {key[:80]!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def parse_json(raw: bytes) -> Any:
    """Strict JSON from bytes: UTF-8, no NaN or Infinity, no key twice in an object; ``ValueError`` (or
    ``RecursionError``) otherwise."""
    return json.loads(raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def read_json_document(
    path: Path, kinds: tuple[str, ...], schema_version: int, what: str, remedy: str
) -> tuple[dict[str, Any], bytes]:
    """Read an itmrt JSON document (bundle or gallery manifest, report) and check its ``kind`` and schema.

    Returns the parsed document and its raw bytes (for hashing). Every failure is a
    one-line :class:`~itmrt.errors.ItmrtError` naming the file, ending with ``remedy``.
    """
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise ItmrtError(f"{path} is {size >> 20} MB, too large for an itmrt {what}; {remedy}")
        raw = read_regular_bytes(path)
    except OSError as exc:
        raise ItmrtError(f"{os_error_message(exc, 'read')}; {remedy}") from None
    try:
        data = parse_json(raw)
    except DuplicateKeyError as exc:
        raise ItmrtError(f"{path} is not valid for itmrt: {exc}; {remedy}") from None
    except (ValueError, RecursionError) as exc:
        raise ItmrtError(f"{path} is not valid JSON ({exc.__class__.__name__}); {remedy}") from None
    if not isinstance(data, dict) or data.get("kind") not in kinds:
        raise ItmrtError(f"{path} is not an itmrt {what}")
    if data.get("schema_version") != schema_version:
        raise ItmrtError(
            f"{path} has schema version {data.get('schema_version')!r}; this itmrt reads version {schema_version}: "
            f"{remedy}"
        )
    return data, raw
