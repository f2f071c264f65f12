"""Files hashed before: skipped while they stay as they were, in this process and in later ones.

A bundle's or gallery's files are checked against the sha256 their document lists before they are used. For a
large gallery that hash is most of a one-caption command: 9.4 GB at a million images, about 6 s of the 7 s a
fresh ``itmrt infer`` took on the project's 2-core machine. So a file once hashed and found as listed is
remembered by its *state*: resolved path, device, inode, size, mtime, ctime and the sha256 it matched. Any write
changes the ctime, which no user tool can set back, and a file put in its place has another inode; a state seen
again is the same bytes.

States are kept in this process's memory, and recorded for later processes as empty files named by the state's
hash in the user's cache folder: ``$ITMRT_VERIFIED_CACHE``, else ``$XDG_CACHE_HOME/itmrt/verified``, else
``~/.cache/itmrt/verified``. ``ITMRT_VERIFIED_CACHE=off`` keeps them in memory only. The folder is used only when
it belongs to this user and no one else can write to it; failing to write a record is silent (it costs a hash
next time, nothing else).

A state is recorded only when the file's ctime is older than the hash's start by more than :data:`TICK_NS` (2 s),
and its state after the hash is the one before it: a write during the hash within one timestamp tick could otherwise
leave the state of bytes that were never hashed (the "racily clean" case git's index guards against the same way).
Such a file is hashed again by the next process, and recorded then.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

TICK_NS = 2_000_000_000
"""How much older than the hash's start a file's ctime must be for its state to be recorded for later processes."""
CACHE_ENV = "ITMRT_VERIFIED_CACHE"
OFF = ("off", "0", "no", "false")

State = tuple[object, ...]


def file_state(path: Path, sha256: str, status: os.stat_result | None = None) -> State:
    """What a file hashed to ``sha256`` is remembered by (``status``: its stat, when taken already)."""
    status = status or path.stat()
    return (str(path.resolve()), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
            status.st_ctime_ns, sha256)


class HashedFiles:
    """The states of files hashed and found as listed for one kind of check (``kind``: a file list's sha256 alone,
    or a gallery's embeddings also found finite), in memory and in the user's cache folder."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._memory: set[State] = set()

    def known(self, state: State) -> bool:
        """Whether a file in ``state`` was hashed and found as listed, by this process or an earlier one."""
        if state in self._memory:
            return True
        record = self._record(state)
        if record is not None and record.is_file():
            self._memory.add(state)
            return True
        return False

    def remember(self, state: State, started_ns: int) -> None:
        """Keep ``state``, a file found as listed by a hash that began at ``started_ns`` (``time.time_ns()``)."""
        self._memory.add(state)
        ctime = state[5]
        assert isinstance(ctime, int)
        if ctime > started_ns - TICK_NS:
            return  # written too recently: a later process hashes it again
        record = self._record(state)
        if record is None:
            return
        try:
            record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if _own_private(record.parent):
                os.close(os.open(record, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        except OSError:
            pass  # a read-only or full cache folder: the next process hashes again

    def check(self, path: Path, sha256: str, verify: Callable[[], None]) -> None:
        """Run ``verify`` (it raises unless ``path`` hashes to ``sha256`` and passes this kind's check) unless the
        file is in a state known to have passed; remember its state when it passed and did not change meanwhile."""
        state = file_state(path, sha256)
        if self.known(state):
            return
        started = hash_started()
        verify()
        if file_state(path, sha256) == state:
            self.remember(state, started)

    def forget(self) -> None:
        """Forget the states kept in this process's memory (the records of later processes stay)."""
        self._memory.clear()

    def _record(self, state: State) -> Path | None:
        folder = cache_folder()
        if folder is None or (folder.exists() and not _own_private(folder)):
            return None
        name = hashlib.sha256(repr((self.kind, state)).encode("utf-8")).hexdigest()
        return folder / name


def cache_folder() -> Path | None:
    """Where states are recorded for later processes, or None when switched off."""
    given = os.environ.get(CACHE_ENV, "")
    if given.lower() in OFF:
        return None
    if given:
        return Path(given)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "itmrt" / "verified"


def _own_private(folder: Path) -> bool:
    """Whether ``folder`` is a real folder of this user that no one else can write to."""
    try:
        status = folder.lstat()
    except OSError:
        return False
    getuid = getattr(os, "getuid", None)
    mine = getuid is None or status.st_uid == getuid()
    return stat.S_ISDIR(status.st_mode) and mine and not status.st_mode & 0o022


def hash_started() -> int:
    """The start of a hash, for :meth:`HashedFiles.remember`."""
    return time.time_ns()


LISTED = HashedFiles("listed")
"""Files found to match the sha256 their bundle's or gallery's file list records."""
FINITE_EMBEDDINGS = HashedFiles("finite-embeddings")
"""Gallery embeddings files found to match their sha256 and to hold finite values only."""
