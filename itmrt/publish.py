"""Publishing outputs: atomic writes (temp file in the same folder, then rename), folders published
whole (built under a hidden staging name, then renamed into place). Reading (itmrt JSON documents, hashes) lives
in :mod:`itmrt.documents`.

Outputs are claimed safely:

- a file is written to a temp file beside it and renamed into place; whether
  an existing file may be replaced is decided *at* the rename: without
  ``overwrite`` the name is claimed with ``link(2)``, which fails when it exists,
  so of two writers racing for one new name one wins and the other gets a
  one-line error (its temp file removed);
- a folder is built in a staging folder and renamed into place the same way;
  replacing one swaps the two in one step (``renameat2(RENAME_EXCHANGE)`` on
  Linux), or where that is missing moves the old one aside first and moves it
  back if anything fails - and, should the process die between the two
  renames, the next writer of that target moves it back;
- every temp file and staging folder carries its writer's pid
  (``.NAME.<pid>.<random>.tmp|partial|old``): the next writer of the same target
  removes those of writers that are gone, and only those;
- outputs get the modes the umask gives (``mkstemp``/``mkdtemp``'s private
  0600/0700 are widened when the output is published), so a bundle made by one
  user can be read by the service account that serves it.

Every ``OSError`` here becomes a one-line :class:`~itmrt.errors.ItmrtError`
naming the path and the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from itmrt.errors import ItmrtError, os_error_message

STAGING_SUFFIX = ".partial"
TEMP_SUFFIX = ".tmp"
RETIRED_SUFFIX = ".old"


class TargetExistsError(ItmrtError, FileExistsError):
    """An output path that exists (or was created meanwhile) and may not be replaced."""


# -- modes ------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` where Linux reports it (setting it to read it back
    would change it for every thread for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def umask_mode(mode: int = 0o777) -> int:
    """``mode`` with the process umask applied (what ``mkdir`` would give)."""
    return mode & ~current_umask()


# -- leftovers of writers that died --------------------------------------------------------


def writer_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this one included); a process of another user counts as alive."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale(target: Path) -> None:
    """Remove the temp files and staging folders of ``target`` whose writer is gone; put back an old folder
    a dead writer had moved aside when ``target`` is missing (its replacement never arrived)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[a-z0-9_]+(\.tmp|\.partial|\.old)$")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        found = pattern.match(entry.name)
        if found is None or writer_alive(int(found.group(1))) or entry.is_symlink():
            continue
        try:
            if found.group(2) == TEMP_SUFFIX and entry.is_file():
                os.unlink(entry.path)
            elif found.group(2) == RETIRED_SUFFIX and entry.is_dir() and not os.path.lexists(target):
                os.rename(entry.path, target)
            elif entry.is_dir():
                shutil.rmtree(entry.path)
        except OSError:
            continue  # another writer got there first, or it is not ours to remove after all


# -- files ------------------------------------------------------------------------------


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ItmrtError(os_error_message(exc, f"create the folder for {target}")) from None


def _exists_error(target: Path) -> TargetExistsError:
    if target.is_dir():
        return TargetExistsError(f"{target} is a folder; give a file path")
    return TargetExistsError(f"{target} already exists (written meanwhile by another run?); nothing was replaced: "
                             "pass --overwrite to replace it or choose another path")


def claim_file(temp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``temp`` to ``target``; without ``overwrite``, only if ``target`` does not exist
    at that moment (an error otherwise, ``temp`` left for the caller to remove)."""
    if overwrite:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)  # atomic: fails when the name exists
    except FileExistsError:
        raise _exists_error(target) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        try:  # a file system without hard links: claim the name with an exclusive create, then replace it
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise _exists_error(target) from None
        os.replace(temp, target)
        return
    os.unlink(temp)


def _write_temp(target: Path, data: bytes) -> Path:
    """``data`` in a new temp file beside ``target`` (pid in its name, mode from the umask, synced)."""
    _make_parent(target)
    remove_stale(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), umask_mode(0o666))
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def atomic_write_files(outputs: Sequence[tuple[str | os.PathLike[str], bytes]], overwrite: bool = True) -> None:
    """Write several files as one result, each atomically (see :func:`atomic_write_bytes`).

    Every file is written to its temp file first, then the names are claimed in
    order; when one cannot be claimed (it appeared meanwhile and ``overwrite``
    is off), the files this call already claimed are removed again, so a
    result is never left half-written.
    """
    temps: list[tuple[Path, Path]] = []
    claimed: list[tuple[Path, int]] = []
    current = Path(outputs[0][0]) if outputs else Path()
    try:
        for path, data in outputs:
            current = Path(path)
            temps.append((_write_temp(current, data), current))
        for temp, current in temps:
            inode = temp.stat().st_ino
            claim_file(temp, current, overwrite)
            claimed.append((current, inode))
    except BaseException as exc:
        for target, inode in claimed if not overwrite else []:
            with contextlib.suppress(OSError):
                if target.stat().st_ino == inode:  # still the file this call wrote
                    target.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, ItmrtError):
            reason = OSError(exc.errno, exc.strerror or str(exc))  # the temp file's name would only confuse
            raise ItmrtError(os_error_message(reason, f"write {current}")) from None
        raise
    finally:
        for temp, _target in temps:
            if os.path.lexists(temp):
                os.unlink(temp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` so readers never see a half-written file (mode: what the umask gives).

    ``overwrite=False``: an existing ``path`` - even one that appeared while writing - is left alone and
    a :class:`TargetExistsError` raised.
    """
    atomic_write_files([(path, data)], overwrite)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def float32_npy_bytes(array: Any) -> bytes:
    """``array`` as the bytes of a float32 ``.npy`` file."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def atomic_save_float32_npy(path: str | os.PathLike[str], array: Any, overwrite: bool = True) -> Path:
    """Save ``array`` as a float32 ``.npy`` atomically (score matrices and the like)."""
    return atomic_write_bytes(path, float32_npy_bytes(array), overwrite)


# -- folders ----------------------------------------------------------------------------


def staging_folder(target: str | os.PathLike[str]) -> Path:
    """A new hidden folder beside ``target`` to build it in: ``.NAME.<pid>.<random>.partial``.

    The writer's process id is in the name, so a leftover of a writer that died
    can be told from one still being written; such leftovers of ``target`` are
    removed here.
    """
    final = Path(target)
    _make_parent(final)
    remove_stale(final)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=final.parent))
    except OSError as exc:
        raise ItmrtError(os_error_message(exc, f"create a folder beside {final}")) from None


@contextmanager
def staged_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build ``target`` in a staging folder; the staging folder is removed if the block fails
    (and whatever is left of it after the block, when the block published it)."""
    staging = staging_folder(target)
    try:
        yield staging
    except ItmrtError:
        raise
    except OSError as exc:
        raise ItmrtError(os_error_message(exc, f"write {target}")) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True, kw_only=True)
class OutputOptions:
    """How a command writes its outputs: the one group of output options (``--overwrite``, ``--progress``,
    ``--plots``) the CLI declares once (:func:`itmrt.cli.flags.output_group`)."""

    overwrite: bool = False  # replace what is already there (never an input of the same command)
    progress: bool = True  # progress bars on stderr (only on a terminal; reports also print lines when logged)
    plots: bool = True  # reports: also write PNG plots (needs matplotlib)


def check_output_folder(out: Path, overwrite: bool, what: str, is_ours: Callable[[Path], bool]) -> None:
    """Refuse an output folder that exists and holds something, unless it holds a ``what`` (an itmrt
    bundle, a gallery: ``is_ours``) and ``overwrite`` is set; one-line errors."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ItmrtError(f"--out {out} is a file; give a folder path for the {what}")
    if not any(out.iterdir()):
        return
    if not is_ours(out):
        article = "an itmrt" if what == "bundle" else "a"
        raise ItmrtError(
            f"--out {out} is a non-empty folder that is not {article} "
            f"{what}; itmrt will not delete it: choose another --out"
        )
    if not overwrite:
        raise ItmrtError(f"--out {out} already holds a {what}; pass --overwrite to replace it or choose another --out")


def check_empty_folder(out: Path, overwrite: bool, remedy: str = "pass --overwrite (overwrite=True) to write into it",
                       error: type[ItmrtError] = ItmrtError) -> None:
    """Refuse an output path that is a file, or a folder that holds something unless ``overwrite``: for writers
    that add their files to the folder (datasets, training runs); ``remedy`` ends the message."""
    if out.exists() and not out.is_dir():
        raise error(f"{out} exists and is not a folder; choose another output folder")
    for document, what in (("manifest.json", "an itmrt bundle"), ("gallery.json", "an itmrt gallery")):
        if os.path.lexists(out / document):  # a closed world: its own files only, overwrite or not
            raise error(f"{out} is {what}; nothing else is written into it, --overwrite or not: choose another "
                        "output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise error(f"output folder {out} is not empty; choose an empty folder or {remedy}")


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux ``renameat2``: True when done, False where this system or file system lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def _rename_new(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target`` only if ``target`` does not exist at that moment."""
    try:
        if _renameat2(staging, target, _RENAME_NOREPLACE):
            return
        os.rename(staging, target)  # a folder onto a non-empty folder fails; an empty one was free anyway
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise TargetExistsError(f"{target} was created meanwhile by another run; nothing was replaced: "
                                    "pass --overwrite to replace it or choose another path") from None
        raise


def _swap_in(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` and delete the folder that was there: in one step where the system
    can exchange two names, else by moving the old one aside first (and back, should the second rename fail)."""
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        shutil.rmtree(staging, ignore_errors=True)  # it holds the old folder now
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=RETIRED_SUFFIX, dir=target.parent))
    retired.rmdir()
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def publish_folder(staging: Path, target: Path, existing: Literal["refuse", "replace", "merge"] = "refuse") -> None:
    """Rename the finished ``staging`` folder to ``target`` (its mode widened to what the umask gives).

    A missing or empty ``target`` is simply replaced. Otherwise ``existing``
    decides: ``refuse`` raises :class:`TargetExistsError` (decided at the
    rename, so a folder another run published meanwhile is never replaced);
    ``replace`` swaps the new folder in (see :func:`_swap_in`); ``merge``
    moves each file of ``staging`` into ``target`` (each rename atomic).
    """
    try:
        staging.chmod(umask_mode())
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if existing == "merge" and target.exists():
            for item in sorted(staging.iterdir()):
                os.replace(item, target / item.name)
            return
        if existing != "replace" or not target.exists():
            try:
                _rename_new(staging, target)
                return
            except TargetExistsError:
                if existing != "replace":
                    raise
        _swap_in(staging, target)
    except OSError as exc:
        if isinstance(exc, ItmrtError):
            raise
        raise ItmrtError(os_error_message(exc, f"publish {target}")) from None
