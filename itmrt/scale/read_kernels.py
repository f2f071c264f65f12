"""The numba kernel that reads a shard's rows by position (:class:`itmrt.scale.positional.PositionalRows`) with
the interpreter lock released.

The residual stage reads a few hundred scattered rows per block on each of the
search's threads. Read in Python (a loop of ``os.preadv``), every row takes
and gives back the interpreter lock, and two threads queued on it: the stage
took 10.2 ms for a shard's 1,000 candidates on two threads against 13.7 on
one. The same reads as one compiled loop of ``pread(2)`` hold no lock: 6.0 ms
on two threads, 11.4 on one (session 15, docs/region-index.md). The loop also finds the
runs of consecutive rows itself, so a block's read is one call from Python.

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
def read_sorted(fd, out, row_bytes, offset, rows, start):  # type: ignore[no-untyped-def]
    """File rows ``rows`` (sorted, no repeats; the file's rows begin at byte ``offset``) into the same rows of
    ``out`` (a C-contiguous uint8 array of whole rows), from position ``start`` on: each run of consecutive
    file rows in one call. Returns the position of the first row of a run not read whole, or -1 when every one
    was. The runs are found here rather than by the caller: for the residual stage's blocks of 32 rows, numpy's
    passes to find them cost more than the reads (session 16)."""
    base = out.ctypes.data
    count = len(rows)
    first = start
    while first < count:
        last = first + 1
        while last < count and rows[last] == rows[last - 1] + 1:
            last += 1
        size = (last - first) * row_bytes
        if _pread(fd, base + first * row_bytes, size, offset + rows[first] * row_bytes) != size:
            return first
        first = last
    return -1
