"""Warnings a client can cause, logged at most once a minute of each kind.

uvicorn logs a warning for every malformed request ("Invalid HTTP request
received.") and two for every upgrade it does not speak; the searcher warns
about every request whose captions hold words the vocabulary does not know.
Each was one log line per request, so any client could fill the service's log
(and its disk) as fast as it could send. :class:`Throttle` lets the first of
each kind through, drops the others for ``every_s`` seconds, and says how many
it dropped on the next line of that kind it lets through. Errors and info
lines pass untouched.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator

CLIENT_LOG = logging.getLogger("itmrt.serve.clients")
"""Where the service's searcher warns about what a request held (unknown words, captions truncated)."""
THROTTLED = ("uvicorn.error", CLIENT_LOG.name)
"""The loggers whose warnings a client can cause."""
MAX_KINDS = 256


class Throttle(logging.Filter):
    """A logger filter: at most one warning of each kind (its message, digits aside) every ``every_s`` seconds."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self.last: dict[str, float] = {}
        self.dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        message = record.getMessage()
        kind = re.sub(r"\d+", "#", message)[:200]  # counts differ from request to request; the kind does not
        now = time.monotonic()
        with self._lock:
            last = self.last.get(kind)
            if last is not None and now - last < self.every_s:
                self.dropped[kind] = self.dropped.get(kind, 0) + 1
                return False
            if len(self.last) >= MAX_KINDS:  # kinds come from a fixed set of messages; this only bounds memory
                self.last.clear()
                self.dropped.clear()
            self.last[kind] = now
            dropped = self.dropped.pop(kind, 0)
        if dropped:
            record.msg, record.args = f"{message} ({dropped} more like it not logged since the last)", None
        return True


@contextlib.contextmanager
def client_warnings_throttled(every_s: float = 60.0) -> Iterator[None]:
    """While the block runs, the warnings of :data:`THROTTLED` go through one :class:`Throttle`."""
    throttle = Throttle(every_s)
    loggers = [logging.getLogger(name) for name in THROTTLED]
    for logger in loggers:
        logger.addFilter(throttle)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(throttle)
