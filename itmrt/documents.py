"""Reading what itmrt and its users wrote: itmrt JSON documents (bundle and gallery manifests, reports) read
strictly and checked for their kind and schema, sha256 hashes of files and bytes, and the one-line reason a path
that is not a regular file cannot be read as one. Writing lives in :mod:`itmrt.publish`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from itmrt.errors import ItmrtError, os_error_message

MAX_DOCUMENT_BYTES = 64 << 20
"""The largest itmrt JSON document read (manifests are kilobytes; this only stops a runaway file)."""


def not_a_file(path: str | os.PathLike[str], missing: str = "does not exist") -> str:
    """Why ``path``, which is not a regular file, cannot be read as one: a phrase that ends "PATH ..."
    (``missing`` when nothing is there). A device, pipe or socket is named as such: it may never end
    (``/dev/zero``) or block (a FIFO)."""
    path = Path(path)
    if path.is_dir():
        return "is a folder"
    if path.is_symlink() and not path.exists():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if path.exists():
        return "is not a regular file (a device, pipe or socket)"
    return missing


# -- hashes ---------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory (a file about to be written, a manifest as read)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files are not loaded whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- JSON documents ---------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """Strict JSON from bytes: UTF-8, no NaN or Infinity; ``ValueError`` (or ``RecursionError``) otherwise."""
    return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)


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
        raw = path.read_bytes()
    except OSError as exc:
        raise ItmrtError(f"{os_error_message(exc, 'read')}; {remedy}") from None
    try:
        data = parse_json(raw)
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
