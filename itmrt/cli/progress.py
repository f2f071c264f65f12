"""Progress bars for long CLI work: tqdm on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yield a factory ``bar(label, total) -> advance(n)``; every bar is closed on exit."""
    bars: list[tqdm] = []

    def factory(label: str, total: int) -> Callable[[int], None]:
        # disable=None: tqdm stays quiet when stderr is not a terminal (logs, CI, captured output).
        bar = tqdm(total=total, desc=label, unit="it", file=sys.stderr, disable=None if enabled else True,
                   leave=False, dynamic_ncols=True)
        bars.append(bar)
        return bar.update

    try:
        yield factory
    finally:
        for bar in bars:
            bar.close()
