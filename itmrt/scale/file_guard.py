"""The files a sharded gallery keeps memory-mapped, checked before they are read again.

A shard's embeddings, global vectors and region index are memory-mapped, since
a sharded gallery may be larger than memory. A mapped file that is truncated
kills the reading process with SIGBUS, and one rewritten in place changes the
answers without any hash noticing. :class:`FileGuard` records each mapped
file's size, modification and change times (nanoseconds), inode and device when
the shard is opened, and :meth:`FileGuard.check` compares them before every
search of that shard: a difference raises :class:`~itmrt.errors.GalleryChanged`
(one line naming the shard and the file, no absolute path) and nothing of the
file is read.

What remains: a change made after the check and before the search's last read
of the file is not seen (a truncation then still ends the process), and a
writer that restores the size and both times exactly is not seen either (ctime
cannot be set back by an ordinary user). ``itmrt serve --copy-shards-mb``
copies shards that fit its budget into memory instead: nothing done to their
files then reaches the service at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from itmrt.errors import GalleryChanged


@dataclass(frozen=True)
class FileState:
    """What a changed file cannot keep: its size, mtime and ctime (ns), inode and device."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> FileState:
        found = os.stat(path, follow_symlinks=False)
        return cls(found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino, found.st_dev)

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

    def __init__(self, label: str, paths: list[Path], before: dict[Path, FileState] | None = None) -> None:
        self.label = label
        before = before or {}
        self.states = {path: before.get(path) or FileState.of(path) for path in paths}

    def __len__(self) -> int:
        return len(self.states)

    def changed(self) -> str | None:
        """Why a file is no longer the one opened (one line), or None while every file is as it was."""
        for path, state in self.states.items():
            try:
                now = FileState.of(path)
            except OSError as exc:
                reason = f"{path.name} cannot be examined any more ({exc.strerror or exc})"
            else:
                if now == state:
                    continue
                reason = f"{path.name} changed after it was opened ({state.difference(now)})"
            return f"{self.label}: {reason}; nothing is read from it - restart the service or re-index the gallery"
        return None

    def check(self) -> None:
        """Raise :class:`~itmrt.errors.GalleryChanged` when a file changed (call before reading the files)."""
        reason = self.changed()
        if reason is not None:
            raise GalleryChanged(reason)
