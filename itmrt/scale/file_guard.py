"""The files a sharded gallery reads while searching, checked before and after they are read.

A shard's embeddings stay on disk when they are too large to copy into memory
(``itmrt serve --copy-shards-mb``); each search reads what it needs from the
file by position (:mod:`itmrt.scale.positional`), so a truncated file is a
short read and an error, never SIGBUS. A file rewritten in place would still
change the answers without any hash noticing: :class:`FileGuard` records each
such file's size, modification and change times (nanoseconds), inode and
device when the shard is opened, and :meth:`FileGuard.check` compares them
before every search of that shard and again after it, so an answer read from a
file that changed during the search is not given either. A difference raises
:class:`~itmrt.errors.GalleryChanged` (one line naming the shard and the file,
no absolute path).

What remains: a writer that restores the size and both times exactly is not
seen (ctime cannot be set back by an ordinary user).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from itmrt.errors import GalleryChanged


@dataclass(frozen=True)
class FileState:
    """What a changed file cannot keep: its size, mtime and ctime (ns), inode and device (and its link count)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int
    links: int = 1

    @classmethod
    def of(cls, path: Path) -> FileState:
        return cls.from_stat(os.stat(path, follow_symlinks=False))

    @classmethod
    def from_stat(cls, found: os.stat_result) -> FileState:
        return cls(found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino, found.st_dev, found.st_nlink)

    def same_content(self, now: FileState) -> bool:
        """Whether ``now`` is this file with the bytes it had. Removing a name of the file changes its ctime
        (and link count) but not its bytes: a file read through a held descriptor may lose its names (an
        ``itmrt index --overwrite`` replacing the gallery) and still be read as it was."""
        kept = (now.size, now.mtime_ns, now.inode, now.device) == (self.size, self.mtime_ns, self.inode, self.device)
        return kept and (now.ctime_ns == self.ctime_ns or now.links < self.links)

    def difference(self, now: FileState) -> str:
        if now.inode != self.inode or now.device != self.device:
            return "replaced by another file"
        if now.size != self.size:
            return f"size {self.size} -> {now.size} bytes"
        return "modified in place"


def folder_states(folder: Path) -> dict[Path, FileState]:
    """The state of every plain file in ``folder`` now (links and folders left out)."""
    states: dict[Path, FileState] = {}
    try:
        paths = list(folder.iterdir())
    except OSError:
        return states  # no folder there: opening the shard reports it
    for path in paths:
        try:
            if path.is_file() and not path.is_symlink():
                states[path] = FileState.of(path)
        except OSError:
            continue  # gone already: opening the shard reports it
    return states


class FileGuard:
    """The state of ``paths`` (``before``'s where it holds them, else now); :meth:`check` raises when any of them
    differs later. ``label`` names their owner (a shard) in the message, which gives file names only (it may
    reach a client). Record ``before`` ahead of verifying the files (:func:`folder_states`), so a change made
    while they were being hashed is caught too."""

    def __init__(self, label: str, paths: list[Path], before: dict[Path, FileState] | None = None,
                 held: dict[Path, int] | None = None) -> None:
        self.label = label
        before = before or {}
        self.states = {path: before.get(path) or FileState.of(path) for path in paths}
        self.held = dict(held or {})  # path -> the descriptor its reads use: that file is examined, by fstat

    def __len__(self) -> int:
        return len(self.states)

    def changed(self) -> str | None:
        """Why a file is no longer the one opened (one line), or None while every file is as it was."""
        for path, state in self.states.items():
            try:
                descriptor = self.held.get(path)
                now = FileState.of(path) if descriptor is None else FileState.from_stat(os.fstat(descriptor))
            except OSError as exc:
                reason = f"{path.name} cannot be examined any more ({exc.strerror or exc})"
            else:
                if state.same_content(now) if descriptor is not None else now == state:
                    continue
                reason = f"{path.name} changed after it was opened ({state.difference(now)})"
            return (f"{self.label}: {reason}; nothing more is read from it - swap in a good version or restart the "
                    "service")
        return None

    def check(self) -> None:
        """Raise :class:`~itmrt.errors.GalleryChanged` when a file changed (call before reading the files)."""
        reason = self.changed()
        if reason is not None:
            raise GalleryChanged(reason)
