"""Progress for long CLI work: tqdm bars on stderr when stderr is a terminal, else (for the commands that ask
for it) one plain line when each stage starts and one when it ends, so a log shows the command is alive."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


class _PlainStage:
    """A stage shown as two lines on stderr (started, finished) instead of a bar."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.started = time.perf_counter()
        print(f"{label}: {total} to do", file=sys.stderr, flush=True)

    def update(self, count: int = 1) -> None:
        self.done += count

    def close(self) -> None:
        print(f"{self.label}: {self.done} of {self.total} done in {time.perf_counter() - self.started:.1f}s",
              file=sys.stderr, flush=True)


@contextmanager
def progress_bars(enabled: bool = True, lines_when_logged: bool = False
                  ) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yield a factory ``bar(label, total) -> advance(n)``; every bar is closed on exit.

    When stderr is not a terminal (logs, CI, captured output) bars stay quiet; with
    ``lines_when_logged`` each stage prints a line when it starts and when it ends instead.
    """
    bars: list[tqdm | _PlainStage] = []
    plain = enabled and lines_when_logged and not sys.stderr.isatty()

    def factory(label: str, total: int) -> Callable[[int], None]:
        bar: tqdm | _PlainStage
        if plain:
            bar = _PlainStage(label, total)
        else:
            # disable=None: tqdm stays quiet when stderr is not a terminal.
            bar = tqdm(total=total, desc=label, unit="it", file=sys.stderr, disable=None if enabled else True,
                       leave=False, dynamic_ncols=True)
        bars.append(bar)
        return bar.update

    try:
        yield factory
    finally:
        for bar in bars:
            bar.close()
