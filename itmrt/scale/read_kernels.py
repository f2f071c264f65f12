"""The numba kernel that reads a shard's rows by position (:class:`itmrt.scale.positional.PositionalRows`) with
the interpreter lock released.

The residual stage reads a few hundred scattered rows per block on each of the
search's threads. Read in Python (a loop of ``os.preadv``), every row takes
and gives back the interpreter lock, and two threads queued on it: the stage
took 10.2 ms for a shard's 1,000 candidates on two threads against 13.7 on
one. The same reads as one compiled loop of ``pread(2)`` hold no lock: 6.0 ms
on two threads, 11.4 on one (session 15, docs/region-index.md).

The kernel only reads. A run it could not read whole (a file that became
shorter, an interrupted call) is returned to the caller, which reads that run
again through Python's checked path: that one completes the run or says what
happened to the file (:class:`~itmrt.errors.GalleryChanged`).

Importing this module imports numba (the ``cpu`` extra); without it the rows
are read in Python.
"""

from __future__ import annotations

from typing import Any

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _pread(typingctx: Any, fd: Any, address: Any, size: Any, offset: Any) -> Any:
    """``pread(fd, (void *) address, size, offset)`` from the C library, as a compiled call (an external symbol
    resolved when the kernel is loaded, so the kernel stays cacheable; a ctypes pointer would not be)."""
    signature = types.int64(types.int64, types.int64, types.int64, types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.IntType(64), [ir.IntType(32), ir.IntType(8).as_pointer(), ir.IntType(64), ir.IntType(64)]), "pread")
        return builder.call(function, [builder.trunc(args[0], ir.IntType(32)),
                                       builder.inttoptr(args[1], ir.IntType(8).as_pointer()), args[2], args[3]])

    return signature, codegen


@numba.njit(cache=True, nogil=True)
def read_runs(fd, out, row_bytes, offset, rows, firsts, lasts, start):  # type: ignore[no-untyped-def]
    """Run ``i`` (file rows from ``rows[i]``; the file's rows begin at byte ``offset``) into rows
    ``firsts[i]:lasts[i]`` of ``out`` (a C-contiguous uint8 array of whole rows), for the runs from ``start`` on.
    Returns the first run not read whole, or -1 when every one was."""
    base = out.ctypes.data
    for i in range(start, len(rows)):
        size = (lasts[i] - firsts[i]) * row_bytes
        if _pread(fd, base + firsts[i] * row_bytes, size, offset + rows[i] * row_bytes) != size:
            return i
    return -1
