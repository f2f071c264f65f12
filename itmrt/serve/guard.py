"""Browser safety in front of the service's routes: the ``Host`` allow-list, ``Origin`` and CORS, ``Content-Type``.

A web page a user visits can send requests to a service on that user's
machine. Three rules keep such a page from driving or reading the service:

- **Host**: the ``Host`` header must name the service by a loopback name
  (``localhost``, ``127.0.0.1``, ``::1``), by the address it listens on, or by a
  name given with ``--allowed-hosts``. A DNS-rebinding page reaches the service
  under its own domain name, so its requests are refused (403).
- **Origin**: a request that says it comes from a web page (``Origin``) is
  refused (403) unless that origin was allowed with ``--cors-origin``; only
  then does the service answer CORS preflights and add
  ``Access-Control-Allow-Origin``.
- **Content-Type**: a ``POST`` must say ``application/json`` or
  ``application/octet-stream`` (415 otherwise). A page can send ``text/plain``
  and form bodies without asking the browser first; it cannot send these types,
  nor an ``Authorization`` or ``Inference-Header-Content-Length`` header, without
  a CORS preflight the service does not grant - so a request with no
  ``Content-Type`` is accepted only when it carries one of those headers (as
  tritonclient's binary requests do).

The two health probes (``/v2/health/live`` and ``/ready``) answer whatever
the ``Host``: orchestrators probe by the pod's address, and they reveal nothing.
Every 4xx the service gives, here or in a route, is counted in ``/metrics``
(``itmrt_client_errors_total{status}``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from itmrt.errors import first_line
from itmrt.serve.metrics import ServiceMetrics

log = logging.getLogger("itmrt.serve")

PROBES = ("/v2/health/live", "/v2/health/ready")
LOOPBACK_NAMES = ("localhost", "localhost.")
BODY_TYPES = ("application/json", "application/octet-stream")
NON_SIMPLE_HEADERS = (b"authorization", b"inference-header-content-length")
"""Headers a web page cannot send without a CORS preflight: a request with one of them is not a page's."""
PREFLIGHT_HEADERS = "Authorization, Content-Type, Content-Encoding, Inference-Header-Content-Length"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class BrowserPolicy:
    """Names the service answers to besides loopback ones (``*``: any), and web origins allowed to use it."""

    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    listen_host: str = "127.0.0.1"


def host_name(header: str) -> str:
    """The host name of a ``Host`` header: without its port, IPv6 brackets and case."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(name: str, policy: BrowserPolicy) -> bool:
    """Whether a request's ``Host`` names this service (see the module docstring)."""
    if not name:
        return False
    if _is_loopback(name) or "*" in policy.allowed_hosts or name in policy.allowed_hosts:
        return True
    if name == policy.listen_host.lower() and policy.listen_host not in ("0.0.0.0", "::"):
        return True
    return any(entry.startswith(".") and name.endswith(entry) for entry in policy.allowed_hosts)


def json_error(status: int, message: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> tuple[Message, Message]:
    """The two ASGI messages of a ``{"error": message}`` response."""
    body = json.dumps({"error": message}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    return {"type": "http.response.start", "status": status, "headers": headers}, {
        "type": "http.response.body",
        "body": body,
    }


class BrowserGuard:
    """ASGI middleware applying :class:`BrowserPolicy` and counting every client error."""

    def __init__(self, app: Any, policy: BrowserPolicy, metrics: ServiceMetrics) -> None:
        self.app, self.policy, self.metrics = app, policy, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, value)
        origin = headers.get(b"origin", b"").decode("latin-1")
        refusal = self.refusal(scope, headers, origin)
        counted = self.counting(send, origin if origin in self.policy.cors_origins else None)
        if refusal is not None:
            status, message = refusal
            for part in json_error(status, message, [(b"connection", b"close")] if status != 204 else []):
                await counted(part)
            return
        if scope["method"] == "OPTIONS":
            await self.preflight(counted, origin)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await counted(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - the app's 500 handler answered and logged it; re-raised by Starlette
            if not started:
                log.error("request failed before an answer: %s: %s", type(exc).__name__, first_line(exc))
                for part in json_error(500, "the service failed on this request (see its log)"):
                    await counted(part)

    def refusal(self, scope: Scope, headers: dict[bytes, bytes], origin: str) -> tuple[int, str] | None:
        """(status, reason) when the request is refused here, else None."""
        if scope["path"] in PROBES:
            return None
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if not host_allowed(host, self.policy):
            shown = host[:80] or "(none)"
            return 403, (f"this service does not answer to the Host {shown!r}; its operator can allow it with "
                         "--allowed-hosts")
        if origin and origin not in self.policy.cors_origins:
            return 403, f"requests from web pages of origin {origin[:80]!r} are refused (allow it with --cors-origin)"
        if scope["method"] == "POST":
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
            if media not in BODY_TYPES and (media or not any(name in headers for name in NON_SIMPLE_HEADERS)):
                shown = media[:60] or "none"
                return 415, (f"Content-Type {shown!r} is not accepted; send 'application/json' (or "
                             "'application/octet-stream' with binary tensor data)")
        return None

    async def preflight(self, send: Send, origin: str) -> None:
        """A CORS preflight of an allowed origin (any other was refused before)."""
        if not origin:
            for part in json_error(405, "OPTIONS is answered only to CORS preflights of --cors-origin origins"):
                await send(part)
            return
        headers = [
            (b"access-control-allow-methods", b"GET, POST"),
            (b"access-control-allow-headers", PREFLIGHT_HEADERS.encode()),
            (b"access-control-max-age", b"600"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def counting(self, send: Send, cors_origin: str | None) -> Send:
        """``send`` that counts 4xx answers and, for an allowed origin, adds the CORS headers."""

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if 400 <= status < 500:
                    self.metrics.client_error(status)
                if cors_origin is not None:
                    message = dict(message)
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"access-control-allow-origin", cors_origin.encode("latin-1")),
                        (b"vary", b"Origin"),
                    ]
            await send(message)

        return counted
