"""The region search's helper threads: a kernel's work split over even ranges, one pool kept for the process.

A pool made for each call started fresh threads, and each faulted in fresh memory for its buffers: inside
``itmrt serve``, reading the rows of the exact re-estimate on such threads took about twice as long as on
kept ones, and a one-caption query at 100,000 images went from 111 to 88-92 ms (docs/region-index.md,
2026-12-07, session 12).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def in_parallel(run: Callable[[int, int], None], count: int, parts: int) -> None:
    """``run(first, last)`` over ``parts`` even ranges of ``count`` items: the first on this thread, the others on
    the helper threads; returns when every range is done, raising a range's error."""
    bounds = [count * part // parts for part in range(parts + 1)]
    if parts <= 1:
        run(0, count)
        return
    pool = helper_pool(parts - 1)
    helpers = [pool.submit(run, bounds[part], bounds[part + 1]) for part in range(1, parts)]
    try:
        run(0, bounds[1])
    finally:
        for helper in helpers:
            helper.result()


@functools.lru_cache(maxsize=4)
def helper_pool(workers: int) -> ThreadPoolExecutor:
    """The region search's helper threads (``workers`` of them), made once per process."""
    return ThreadPoolExecutor(workers, thread_name_prefix="itmrt-region")
