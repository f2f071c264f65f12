"""Where a command's time goes: named stages timed in order, plus the process's age.

Used by ``itmrt infer --timings`` (and the cold-start benchmark that reads it). It lives outside
``itmrt.runtime``, whose import loads numpy and ONNX Runtime: importing it must not be a stage of its own::

    timer = StageTimer()
    with timer.stage("load"):
        runtime = load(bundle)
    timer.as_dict()   # {"load": 1.23}
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


def process_age() -> float | None:
    """Seconds since this process started (interpreter start-up included), or None where the
    operating system does not say (read from ``/proc``, Linux only; resolution one clock tick, ~10 ms)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as uptime_file:
            uptime = float(uptime_file.read().split()[0])
        # Field 22 of /proc/PID/stat (starttime, clock ticks after boot); fields[0] is field 3.
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StageTimer:
    """Wall-clock seconds per named stage; a stage entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self, digits: int = 3) -> dict[str, float]:
        """The stages in the order they first ran, rounded."""
        return {name: round(value, digits) for name, value in self.seconds.items()}
