"""Giving memory back to the system: a long-running service must return to its idle size after a burst.

glibc's allocator keeps freed heap memory for reuse, and by default it raises
its threshold for serving large blocks from their own mappings each time such
a block is freed (up to 32 MB): after one 4 MB request body, every later one
is carved from the heap, and a burst of them leaves the heap grown for good
(measured: +71% resident after 20 senders of 4 MB documents for 5 s).
:func:`fixed_mmap_threshold` pins that threshold, so large blocks - request
bodies, parsed documents, encoded answers - are mapped on their own and
returned to the system the moment they are freed; :func:`release_memory`
trims what the heap and the thread arenas hold free (after a swap, the old
version; after a burst of bodies). Both do nothing outside glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import platform
from typing import Any

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 256 << 10
"""Blocks of at least this size are mapped on their own (glibc's own starting threshold is 128 KB)."""


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def fixed_mmap_threshold(size: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve blocks of ``size`` bytes and more from their own mappings, with no dynamic raising of that
    threshold; whether it was set (False outside glibc)."""
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(mallopt(M_MMAP_THRESHOLD, int(size))) if mallopt is not None else False


def release_memory(collect: bool = True) -> None:
    """Give freed memory back to the system now: after a swap, the old version; after a burst of large request
    bodies, their buffers. ``collect``: run the garbage collector first."""
    if collect:
        gc.collect()
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def freeze_survivors() -> None:
    """Collect garbage once, then exempt every object alive now - the loaded model, the gallery, the libraries:
    what lives as long as the service - from later collections (``gc.freeze``). A full collection holds the
    interpreter lock for as long as it walks the objects: about 100 ms with the small NAAF loaded, and about 2 ms
    once they are frozen; Python runs one from time to time, and the service after each burst of request bodies
    and each swap, stalling the event loop and the worker for that long. Objects frozen are still freed by
    reference counting; only reference cycles among them are never collected."""
    gc.collect()
    gc.freeze()

