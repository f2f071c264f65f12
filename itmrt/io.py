"""Small file helpers: atomic writes (temp file in the same folder, then rename), folders published
whole (built under a hidden staging name, then renamed into place), hashing, itmrt JSON documents."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal


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


STAGING_SUFFIX = ".partial"


def staging_folder(target: str | os.PathLike[str]) -> Path:
    """A new hidden folder beside ``target`` to build it in: ``.NAME.<pid>.<random>.partial``.

    The writer's process id is in the name, so a leftover of a writer that
    died can be told from one still being written.
    """
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=final.parent))


@contextmanager
def staged_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build ``target`` in a staging folder; the staging folder is removed if the block fails
    (and whatever is left of it after the block, when the block published it)."""
    staging = staging_folder(target)
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def check_output_folder(out: Path, overwrite: bool, what: str, is_ours: Callable[[Path], bool]) -> None:
    """Refuse an output folder that exists and holds something, unless it holds a ``what`` (an itmrt
    bundle, a gallery: ``is_ours``) and ``overwrite`` is set; one-line errors."""
    from itmrt.errors import ItmrtError

    if not out.exists():
        return
    if not out.is_dir():
        raise ItmrtError(f"--out {out} is a file; give a folder path for the {what}")
    if not any(out.iterdir()):
        return
    if not is_ours(out):
        article = "an itmrt" if what == "bundle" else "a"
        raise ItmrtError(
            f"--out {out} is a non-empty folder that is not {article} {what}; itmrt will not delete it: choose another --out"
        )
    if not overwrite:
        raise ItmrtError(f"--out {out} already holds a {what}; pass --overwrite to replace it or choose another --out")


def publish_folder(staging: Path, target: Path, existing: Literal["refuse", "replace", "merge"] = "refuse") -> None:
    """Rename the finished ``staging`` folder to ``target``.

    A missing or empty ``target`` is simply replaced. Otherwise ``existing``
    decides: ``refuse`` raises :class:`FileExistsError`; ``replace`` moves the
    old folder aside, moves the new one in and deletes the old one, restoring
    the old folder if the second rename fails; ``merge`` moves each file of
    ``staging`` into ``target`` (each rename atomic).
    """
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(staging, target)
        return
    if existing == "refuse":
        raise FileExistsError(f"{target} exists")
    if existing == "merge":
        for item in sorted(staging.iterdir()):
            os.replace(item, target / item.name)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=target.parent))
    retired.rmdir()
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def umask_mode(mode: int = 0o777) -> int:
    """``mode`` with the process umask applied (what ``mkdir`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask
