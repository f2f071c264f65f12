"""A shard's embeddings read from their file by position (``os.preadv``), never through a memory map.

A memory-mapped file that is truncated while it is read kills the reading
process with SIGBUS, and no check made before the read can close that window.
A positional read of the same bytes cannot: a file that became shorter gives a
short read, which :class:`PositionalRows` turns into
:class:`~itmrt.errors.GalleryChanged` (one line naming the shard and the file,
no path), and the caller answers "not ready" instead of dying.

:class:`PositionalRows` looks like the ``[images, regions, d]`` array to the
code that searches a shard: ``rows[a:b]`` and ``rows[index_array]`` (a
shortlist's or a rerank's candidates) read just those rows; :meth:`blocks`
reads the whole file block by block into one buffer reused by the thread
(full scoring), so memory stays one block whatever the shard's size. The file
descriptor is opened once, when the shard is opened; a file replaced by another
one later (a rename) is still read from the one opened, and
:class:`~itmrt.scale.file_guard.FileGuard` reports it.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.data.npy import read_npy_header
from itmrt.documents import open_regular
from itmrt.errors import GalleryChanged, ItmrtError, first_line
from itmrt.optional import compiled_kernels
from itmrt.runtime.fused import call_compiled

BLOCK_BYTES = 64 << 20
"""Bytes of rows read per block of a full scan (one buffer of this size per searching thread)."""

_buffers = threading.local()


def read_kernels() -> Any:
    """:mod:`itmrt.scale.read_kernels` where numba is installed (the ``cpu`` extra) and already imported (the
    region index's kernels import it), else None: the compiled reads save a microsecond or two a row and free
    the interpreter lock for the residual stage's threads, which a one-shot command reading a few hundred rows
    for a global shortlist's rerank does not need at the price of importing numba (about 0.4 s)."""
    return _compiled_reads() if "numba" in sys.modules else None


@functools.cache
def _compiled_reads() -> Any:
    """The read kernels, compiled (or loaded from numba's cache) once; None where they cannot be: not a POSIX
    system, or a C library whose ``pread`` the compiler cannot link - the Python reads are then the only ones,
    as without numba (an optimisation never stops a search)."""
    module = compiled_kernels("itmrt.scale.read_kernels") if os.name == "posix" else None
    if module is None:
        return None
    try:  # no rows: nothing is read, the kernel is only compiled for the arrays take() passes
        call_compiled(module.read_sorted, 0, np.zeros(1, dtype=np.uint8), 1, 0, np.zeros(0, dtype=np.int64), 0)
    except Exception:  # noqa: BLE001 - whatever numba or LLVM raise, the Python reads serve
        return None
    return module


def _thread_buffer(nbytes: int) -> np.ndarray:
    """This thread's reusable read buffer of at least ``nbytes`` bytes (grown when asked for more)."""
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = _buffers.buffer = np.empty(nbytes, dtype=np.uint8)
    return buffer


class PositionalRows:
    """The rows of a C-order ``.npy`` file, read on demand by position (see the module docstring).

    ``label`` names the owner (``shard shard-00001``) in errors, which name the file, never its path."""

    ndim: int

    def __init__(self, path: Path, label: str, what: str = "gallery embeddings") -> None:
        header = read_npy_header(path, what)
        if header.fortran_order or len(header.shape) < 1:
            raise ItmrtError(f"{path} is not a C-order array of rows; re-index the gallery")
        self.name, self.label = path.name, label
        self.shape: tuple[int, ...] = tuple(int(axis) for axis in header.shape)
        self.dtype = np.dtype(header.dtype)
        self.ndim = len(self.shape)
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self.offset = header.data_offset
        try:  # never a blocking open (a FIFO put in the file's place), and a regular file only
            with open_regular(path) as handle:
                self.fd: int | None = os.dup(handle.fileno())
        except OSError as exc:
            raise ItmrtError(f"{label}: cannot read {path.name} ({first_line(exc)}); re-index the gallery") from None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError, TypeError):  # pragma: no cover - a descriptor that will not close, or
            pass  # the interpreter shutting down (os already gone): nothing to do

    # -- reads ----------------------------------------------------------------------------

    def _read_into(self, view: memoryview, start_row: int) -> None:
        """Fill ``view`` with the bytes from row ``start_row`` on; a short read is a :class:`GalleryChanged`."""
        if self.fd is None:
            raise GalleryChanged(f"{self.label}: {self.name} was closed; nothing is read from it")
        position, done = self.offset + start_row * self.row_bytes, 0
        while done < len(view):
            try:
                count = os.preadv(self.fd, [view[done:]], position + done)
            except OSError as exc:
                raise GalleryChanged(f"{self.label}: {self.name} cannot be read any more ({exc.strerror or exc}); "
                                     "nothing more is read from it") from None
            if count <= 0:
                row = start_row + done // max(1, self.row_bytes)
                raise GalleryChanged(f"{self.label}: {self.name} is shorter than when it was opened (ends before "
                                     f"row {row} of {self.shape[0]}); nothing more is read from it - swap in a good "
                                     "version or restart the service")
            done += count

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` (into ``out``, a C-contiguous array of their shape and dtype, when given)."""
        start, stop = max(0, start), min(stop, self.shape[0])
        shape = (max(0, stop - start), *self.shape[1:])
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.dtype} array of shape {shape}")
        if out.size:
            self._read_into(out.data.cast("B"), start)
        return out

    def take(self, rows: Any, out: np.ndarray | None = None) -> np.ndarray:
        """The rows ``rows`` (any integers, repeats allowed) in that order; runs of consecutive rows are read at
        once (one system call each). ``out``: where rows given sorted and without repeats are read (a
        C-contiguous array of their shape and dtype; a caller reading many blocks reuses one buffer instead of
        faulting in fresh memory for each)."""
        wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
        ordered = bool((wanted[1:] > wanted[:-1]).all())
        if wanted.size and not (ordered and 0 <= wanted[0] and wanted[-1] < self.shape[0]):
            if wanted.min() < -self.shape[0] or wanted.max() >= self.shape[0]:
                raise IndexError(f"row index out of range for {self.shape[0]} rows")
            wanted = np.where(wanted < 0, wanted + self.shape[0], wanted)
            ordered = bool((wanted[1:] > wanted[:-1]).all())
        if out is not None:  # the caller's sorted block (the residual stage's): no sort, no search
            if (not ordered or out.shape != (len(wanted), *self.shape[1:]) or out.dtype != self.dtype
                    or not out.flags.c_contiguous):
                raise ValueError(f"out takes sorted rows without repeats, as a C-contiguous {self.dtype} array of "
                                 f"shape {(len(wanted), *self.shape[1:])}")
            if len(wanted):
                self._read_sorted(out, wanted)
            return out.reshape(*np.shape(rows), *self.shape[1:])
        unique = wanted if ordered else np.unique(wanted)
        block = np.empty((len(unique), *self.shape[1:]), dtype=self.dtype)
        if len(unique):
            self._read_sorted(block, unique)
        picked = block if ordered else block[np.searchsorted(unique, wanted)]
        return picked.reshape(*np.shape(rows), *self.shape[1:])

    def _read_sorted(self, block: np.ndarray, rows: np.ndarray) -> None:
        """File rows ``rows`` (sorted, no repeats) into the rows of ``block`` (C-contiguous), each run of
        consecutive rows in one call. Compiled where numba is installed (:mod:`itmrt.scale.read_kernels`: no
        interpreter lock held, so the search's threads read side by side), else a tight loop of ``preadv``; a
        run that comes back short from either goes through :meth:`_read_into`, which completes it or says why
        it cannot."""
        fd, size, offset = self.fd, self.row_bytes, self.offset
        flat = block.reshape(-1).view(np.uint8)
        if fd is None:
            self._read_into(flat.data, int(rows[0]))  # says it was closed
            return
        kernels = read_kernels()
        if kernels is not None:
            at = 0
            while at < len(rows):
                short = call_compiled(kernels.read_sorted, fd, flat, size, offset, rows, at)
                if short < 0:
                    return
                end = short + 1
                while end < len(rows) and rows[end] == rows[end - 1] + 1:
                    end += 1
                self._read_into(flat[short * size : end * size].data, int(rows[short]))
                at = end
            return
        breaks = np.flatnonzero(rows[1:] - rows[:-1] != 1) + 1
        firsts, lasts = [0, *breaks.tolist()], [*breaks.tolist(), len(rows)]
        preadv, view = os.preadv, flat.data
        for first, last in zip(firsts, lasts, strict=True):
            part = view[first * size : last * size]
            try:
                complete = preadv(fd, [part], offset + int(rows[first]) * size) == len(part)
            except OSError:
                complete = False
            if not complete:
                self._read_into(part, int(rows[first]))

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:
                return self.read(start, stop)
            return self.take(np.arange(start, stop, step))
        if isinstance(key, (int, np.integer)):
            return self.take([int(key)])[0]
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])]
        return self.take(key)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.read(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype)

    def blocks(self, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` over the whole file, each block read into this thread's reused buffer: a block
        is valid only until the next one is read."""
        per_block = min(max(1, block_bytes // max(1, self.row_bytes)), max(1, self.shape[0]))
        for start in range(0, self.shape[0], per_block):
            stop = min(start + per_block, self.shape[0])
            buffer = _thread_buffer(per_block * self.row_bytes)
            out = buffer[: (stop - start) * self.row_bytes].view(self.dtype).reshape(stop - start, *self.shape[1:])
            yield start, self.read(start, stop, out)


def read_rows(stored: Any, part: np.ndarray, buffer: np.ndarray | None) -> np.ndarray:
    """Rows ``part`` of ``stored``: read into ``buffer[: len(part)]`` (a thread's, reused from block to block)
    where ``stored`` is read by position and ``part`` is sorted without repeats, else a fresh contiguous copy."""
    if buffer is not None and isinstance(stored, PositionalRows) and bool((part[1:] > part[:-1]).all()):
        return stored.take(part, out=buffer[: len(part)])
    return np.ascontiguousarray(stored[part])
