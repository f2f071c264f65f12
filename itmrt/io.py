"""Small file helpers: atomic writes (temp file in the same folder, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers never see a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files are not loaded whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_document(
    path: Path, kinds: tuple[str, ...], schema_version: int, what: str, remedy: str
) -> tuple[dict[str, Any], bytes]:
    """Read an itmrt JSON document (bundle or gallery manifest, report) and check its ``kind`` and schema.

    Returns the parsed document and its raw bytes (for hashing). Every failure is a
    one-line :class:`~itmrt.errors.ItmrtError` naming the file, ending with ``remedy``.
    """
    from itmrt.errors import ItmrtError

    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ItmrtError(f"{path} is not valid JSON ({exc.__class__.__name__}); {remedy}") from None
    if not isinstance(data, dict) or data.get("kind") not in kinds:
        raise ItmrtError(f"{path} is not an itmrt {what}")
    if data.get("schema_version") != schema_version:
        raise ItmrtError(
            f"{path} has schema version {data.get('schema_version')!r}; this itmrt reads version {schema_version}: {remedy}"
        )
    return data, raw


def atomic_save_float32_npy(path: str | os.PathLike[str], array: Any) -> Path:
    """Save ``array`` as a float32 ``.npy`` atomically (score matrices and the like)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())
