"""The HTTP connection layer: uvicorn's h11 protocol with the deadlines and limits a small exposed box needs.

uvicorn times out idle kept-alive connections, but not a client that sends its
headers a byte at a time, nor one that never reads its answer, and it counts
such connections against ``limit_concurrency`` until they leave. This protocol
(passed to uvicorn as its ``http`` class) adds:

- a **header deadline**: from the moment a connection opens, or its previous
  answer went out, the next request's headers must be complete within
  ``header_timeout_s`` or the connection is closed;
- a **write deadline**: once an answer is complete but the client has not
  taken it - it fills the process's buffer, or more than ``UNREAD_LIMIT`` bytes
  of it still wait in the kernel's send queue (on Linux, where that queue can be
  read; a loopback or LAN socket buffer holds megabytes, dozens of answers) -
  the client has ``write_timeout_s`` to take it or the connection is aborted,
  dropping what was buffered; meanwhile the connection's next (pipelined)
  request is not taken up, so a client that does not read costs a held socket
  and one answer, not the worker's time for every request it queued;
- **eviction** at ``max_connections``: a new connection pushes out the one that
  has waited longest for its next request's headers (slow, stalled or idle);
  only when every connection has a request in progress is the new one refused
  (503, closed).

The body's deadline, its size and the bytes held across connections are the
app's (:func:`itmrt.serve.http_app.read_body`): it reads the body. Each closed
connection is counted in ``itmrt_connections_dropped_total{reason}``.

The class relies on uvicorn's ``H11Protocol`` hooks (``connection_made``,
``handle_events``, ``on_response_complete``, ``pause_writing``,
``resume_writing``, ``connection_lost``, ``cycle``, ``flow.write_paused``); a test starts a real
server and checks each deadline, so a uvicorn that changes them fails there.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
import time
from typing import Any

from itmrt.optional import require
from itmrt.serve.metrics import ServiceMetrics

_REFUSED_BODY = b'{"error": "the service has too many connections open; retry shortly"}'
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
           b"retry-after: 1\r\ncontent-length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY)


UNREAD_LIMIT = 64 << 10
"""Bytes of a complete answer the kernel may still hold unsent before the client counts as not reading."""
_SIOCOUTQNSD = 0x894B  # Linux: bytes in a TCP socket's send queue not yet sent (the peer's window is full)
_DRAIN_POLL_S = 0.02


def unsent_bytes(transport: Any) -> int:
    """Bytes written to ``transport``'s socket that the kernel has not sent yet (0 where it cannot be read)."""
    if not sys.platform.startswith("linux"):
        return 0
    import fcntl

    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    with contextlib.suppress(OSError, ValueError):
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0" * 4))[0])
    return 0


def guarded_protocol(header_timeout_s: float, write_timeout_s: float, max_connections: int,
                     metrics: ServiceMetrics) -> type:
    """uvicorn's h11 protocol class with the deadlines and eviction above, for ``uvicorn.Config(http=...)``."""
    h11_impl = require("uvicorn.protocols.http.h11_impl", "itmrt serve")
    settings = {"header_timeout_s": header_timeout_s, "write_timeout_s": write_timeout_s,
                "max_connections": max_connections, "metrics": metrics}
    return type("GuardedH11Protocol", (Deadlines, h11_impl.H11Protocol), settings)


class Deadlines:
    """The hooks over uvicorn's ``H11Protocol`` (mixed in before it by :func:`guarded_protocol`)."""

    header_timeout_s: float
    write_timeout_s: float
    max_connections: int
    metrics: ServiceMetrics
    # uvicorn's H11Protocol provides these:
    flow: Any
    connections: set[Any]
    transport: Any
    loop: Any
    cycle: Any

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None
        self._completion_deferred = False
        self._await_headers()
        if len(self.connections) > self.max_connections and not self._evict_one():
            self.metrics.dropped.labels("over_limit").inc()
            transport.write(REFUSED)
            transport.close()

    def _await_headers(self) -> None:
        self._waiting_since = time.monotonic()
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_arrived(self) -> None:
        self._waiting_since = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._waiting_since is not None and not self.transport.is_closing():
            self.metrics.dropped.labels("header_timeout").inc()
            self.transport.close()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for headers (not this one); False if none waits."""
        waiting = [c for c in self.connections
                   if c is not self and getattr(c, "_waiting_since", None) is not None
                   and not c.transport.is_closing()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._waiting_since)
        self.metrics.dropped.labels("evicted").inc()
        oldest.transport.abort()
        return True

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()  # type: ignore[misc]
        if self.cycle is not before:  # a new request's headers are in
            self._headers_arrived()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing() and (self.flow.write_paused or self._unread()):
            self._completion_deferred = True  # the client is not reading: no next request until it does
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_late)
            if not self.flow.write_paused:  # nothing left in the process: watch the kernel's queue drain
                self.loop.call_later(_DRAIN_POLL_S, self._check_drained)
            return
        self._complete()

    def _unread(self) -> bool:
        return self.transport.get_write_buffer_size() > 0 or unsent_bytes(self.transport) > UNREAD_LIMIT

    def _check_drained(self) -> None:
        if self.transport.is_closing() or not self._completion_deferred or self.flow.write_paused:
            return  # closed, already resumed, or resume_writing will take it from here
        if self._unread():
            self.loop.call_later(_DRAIN_POLL_S, self._check_drained)
            return
        self._drained()

    def _drained(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._completion_deferred:
            self._completion_deferred = False
            self._complete()

    def _complete(self) -> None:
        if not self.transport.is_closing():
            self._await_headers()
        super().on_response_complete()  # type: ignore[misc]

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_late)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        if self._completion_deferred and self._unread():  # the process's buffer went out; the kernel's has not
            self.loop.call_later(_DRAIN_POLL_S, self._check_drained)
            return
        self._drained()

    def _write_late(self) -> None:
        self._write_timer = None
        self.metrics.dropped.labels("write_timeout").inc()
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._write_timer = None
        self._waiting_since = None
        super().connection_lost(exc)  # type: ignore[misc]
