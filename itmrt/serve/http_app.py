"""The ASGI app (Starlette): the Open Inference Protocol's HTTP endpoints over a :class:`Batcher`.

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
``GET /v2/models/text_to_image[/versions/1]``, ``GET .../ready``,
``POST .../infer``, ``GET /metrics`` and the model repository's
``POST /v2/repository/index`` and ``POST /v2/repository/models/text_to_image/load``
(swap in the gallery on disk now, :mod:`itmrt.serve.swap`) and ``/unload``, which
answer only under ``--model-control explicit`` (403 with the reason otherwise, as Triton refuses them
unless its model control mode is explicit).
With a token, every route but the two health probes needs ``Authorization: Bearer TOKEN``.
:mod:`itmrt.serve.guard` stands in front of them all (Host, Origin, Content-Type).

Errors are ``{"error": "one line"}`` with the protocol's status: 400 bad
input, 401 missing or wrong token, 403 a foreign Host or Origin or a repository
load/unload the model control mode refuses, 404 unknown
model or route, 408 a body that did not arrive in time, 409 a gallery version
refused by the load endpoint, 413 body over the limit, 415 an unknown
Content-Type or Content-Encoding, 429 queue full, 503 not ready, stopping or
holding too many bodies, 504 past the request's deadline, 500 a failure inside
the service (one log line, with a number the client's message quotes; no
internals reach the client; the service carries on). A client's fault is
never logged as an error; every one is counted in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from itmrt import __version__
from itmrt.errors import first_line
from itmrt.limits import is_integer
from itmrt.optional import require
from itmrt.serve import protocol
from itmrt.serve.auth import authorized
from itmrt.serve.batcher import Batcher, DeadlineExceeded, NotReady, QueueFull, Refused
from itmrt.serve.guard import BrowserGuard, BrowserPolicy
from itmrt.serve.memory import release_memory
from itmrt.serve.metrics import ServiceMetrics
from itmrt.serve.protocol import MODEL_NAME, MODEL_VERSION, ProtocolError, RequestLimits

log = logging.getLogger("itmrt.serve")

INLINE_BODY_BYTES = 64 << 10
"""Request bodies up to this size are parsed on the event loop; larger ones on the codec pool."""
INLINE_ANSWER_RESULTS = 2048
"""Answers of up to this many results (captions x top_k) are encoded on the event loop; larger on the pool."""
RETRY_AFTER_S = 1
"""What a 429 or 503 tells the client to wait (``Retry-After``); how long a caller's refusal for its own backlog is
held before it is sent."""
LARGE_BODY_LANES = 2
"""Bodies over ``INLINE_BODY_BYTES`` (or of no declared length) read and parsed at once at most; more: 503."""


@dataclass(frozen=True)
class HttpLimits:
    """What one request may cost, and how long each part of an exchange may take.

    Body bytes (after decompression), captions, bytes per caption, seconds to
    answer; results per answer (captions x top_k); seconds for the request
    headers, for the whole body, and for a client to take an answer it is
    sent; bytes of request bodies held at once across all connections; seconds
    a kept-alive connection may idle.
    """

    max_body_bytes: int = 1 << 20  # a real request weighs far less: docs/serving-faults.md, "Transport limits"
    max_captions: int = 256
    max_caption_bytes: int = 2048
    timeout_s: float = 30.0
    max_answer: int = 10_000
    header_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    write_timeout_s: float = 10.0
    max_buffered_bytes: int = 64 << 20
    keep_alive_s: float = 5.0


class BodyBudget:
    """Bytes of request bodies the service holds at once, across every connection (event-loop thread only).

    When the bodies held drop back to none after at least ``trim_after`` bytes went through, ``trim`` is called
    (at most once a second; a drop within the second after a trim gets its trim when the second is over, if
    nothing is held then): the service gives the freed buffers back to the system instead of keeping them.
    """

    def __init__(self, limit: int, trim: Callable[[], object] | None = None, trim_after: int = 8 << 20) -> None:
        self.limit, self.used = limit, 0
        self.trim, self.trim_after = trim, trim_after
        self.since_trim, self.last_trim = 0, 0.0
        self._deferred: asyncio.TimerHandle | None = None

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise ProtocolError(503, f"the service holds {self.limit >> 20} MB of request bodies already "
                                     "(--max-buffered-mb); retry shortly")
        self.used += size
        self.since_trim += size

    def give(self, size: int) -> None:
        self.used -= size
        self._maybe_trim()

    def _maybe_trim(self) -> None:
        self._deferred = None
        if self.used or self.since_trim < self.trim_after or self.trim is None:
            return
        wait = self.last_trim + 1.0 - time.monotonic()
        if wait <= 0:
            self.since_trim, self.last_trim = 0, time.monotonic()
            self.trim()
        elif self._deferred is None:
            try:
                self._deferred = asyncio.get_running_loop().call_later(wait, self._maybe_trim)
            except RuntimeError:  # no event loop (a test calling it directly): the next give trims
                pass


@dataclass
class BodyRead:
    """A body read under the limits: its bytes, the budget it holds until the answer, whether all arrived."""

    data: bytes = b""
    held: int = 0
    complete: bool = False


def _declared_size(request: Any, limit: int) -> int | None:
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        return None
    if len(declared) > 18 or int(declared) > limit:
        raise ProtocolError(
            413, f"the request body is {declared[:20]} bytes, over the limit of {limit}; send fewer or shorter captions"
        )
    return int(declared)


async def read_body(request: Any, limits: HttpLimits, budget: BodyBudget, read: BodyRead) -> None:
    """Fill ``read`` with the request body: 413 as soon as it (or its gzip/deflate content) passes the limit,
    408 when it has not all arrived ``body_timeout_s`` after it began, 503 when the budget is spent."""
    limit = limits.max_body_bytes
    declared = _declared_size(request, limit)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise ProtocolError(
            415, f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or no encoding"
        )
    inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15) if encoding != "identity" else None
    if declared is not None and inflate is None:
        budget.take(declared)  # the whole body at once: refused before any of it is buffered
        read.held = declared
    header = request.headers.get(protocol.HEADER_LENGTH, "")
    scan = StringRuns(6 * limits.max_caption_bytes + 1024, int(header) if header.isdigit() else None)
    try:  # one deadline for the whole body (one timer, not one task per chunk)
        await asyncio.wait_for(_read_chunks(request, limit, inflate, encoding, budget, read, scan),
                               limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ProtocolError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                                 "(--body-timeout-s); send it in one go") from None


class ImpossibleBody(ProtocolError):
    """A body that no request can be, seen before it was all read: its 400 is held for ``RETRY_AFTER_S`` before
    it is sent (no real client sends one; a sender of many cannot make the service read and refuse them as fast
    as it can send)."""


class StringRuns:
    """A check of a JSON body as it streams in: no run of more than ``longest`` bytes without a double quote.

    In a request every long stretch of the document is a caption, and a caption of ``--max-caption-bytes``
    bytes takes at most six times that as a JSON string (``\\u00XX`` escapes); the quotes around strings come
    far more often in any request of the protocol's shape. A body with such a run - one caption of a megabyte,
    or a megabyte of padding - is refused (400) as soon as the run is seen, before the rest is read and parsed.
    ``json_bytes``: only the first bytes are JSON (the binary extension's header); the binary tensors after them
    are not looked at."""

    def __init__(self, longest: int, json_bytes: int | None = None) -> None:
        self.longest, self.left = longest, json_bytes
        self.run = 0  # bytes since the last quote

    def feed(self, chunk: bytes) -> None:
        if self.left is not None:
            chunk, self.left = chunk[: self.left], max(0, self.left - len(chunk))
        if not chunk:
            return
        first = chunk.find(b'"')
        if first < 0:
            self.run += len(chunk)
        else:
            pieces = chunk.split(b'"')
            self.run = max(self.run + first, max(map(len, pieces[1:-1]), default=0))
            if self.run <= self.longest:
                self.run = len(pieces[-1])
        if self.run > self.longest:
            raise ImpossibleBody(400, f"the body holds more than {self.longest} bytes without a quote, which no "
                                     "request does (a caption within --max-caption-bytes takes fewer, even escaped)")


async def _read_chunks(request: Any, limit: int, inflate: Any, encoding: str, budget: BodyBudget,
                       read: BodyRead, scan: StringRuns) -> None:
    chunks, received, size = [], 0, 0
    async for chunk in request.stream():
        received += len(chunk)
        if inflate is not None and chunk:
            try:
                chunk = inflate.decompress(chunk, limit + 1 - size)
            except zlib.error:
                raise ProtocolError(400, f"the body is not valid {encoding} data") from None
        size += len(chunk)
        if size > limit or received > limit:
            raise ProtocolError(
                413, f"the request body is over the limit of {limit} bytes; send fewer or shorter captions"
            )
        if size > read.held:
            budget.take(size - read.held)
            read.held = size
        scan.feed(chunk)
        chunks.append(chunk)
    if inflate is not None and (not inflate.eof or inflate.unused_data):  # cut short, or more after its end
        raise ProtocolError(400, f"the body is not one whole {encoding} stream (it ends early, or bytes follow its "
                                 "end); send it again whole")
    read.data, read.complete = b"".join(chunks), True


def caller_of(request: Any, header: str | None = None) -> str:
    """Whom the fair queue shares the worker between (docs/serving-faults.md, "Who a caller is"): the value of
    ``header`` where the operator names one (set by a proxy they trust); else a remote peer's address (an IPv6
    peer's /64), so a client's many connections share one turn; else - a loopback peer, which may be any local
    program or a proxy on this host, all with one address - its connection."""
    if header:
        value = request.headers.get(header)
        if value:
            return "header " + value[:128]
    client = request.client
    if client is None:
        return "?"
    try:
        address = ipaddress.ip_address(client.host)
    except ValueError:  # not an IP peer (a Unix socket): its connection
        return f"connection {client.host}:{client.port}"
    if address.is_loopback:
        return f"connection {client.host}:{client.port}"
    if address.version == 6:
        return f"address {ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"address {address}"


class ClientGone(Exception):
    """The client closed its connection before its request was read: nobody to answer."""


class InferenceRoutes:
    """The endpoints' handlers, sharing the batcher, the metrics, the limits and the token."""

    def __init__(self, batcher: Batcher, metrics: ServiceMetrics, limits: HttpLimits, token: str | None) -> None:
        self.batcher, self.metrics, self.limits, self.token = batcher, metrics, limits, token
        self.responses = require("starlette.responses", "itmrt serve")
        self.client_disconnect = require("starlette.requests", "itmrt serve").ClientDisconnect
        self.codec = ThreadPoolExecutor(2, thread_name_prefix="itmrt-serve-codec")
        self.budget = BodyBudget(limits.max_buffered_bytes, lambda: self.codec.submit(release_memory))
        self.failures = 0
        self.large_bodies = 0  # bodies over INLINE_BODY_BYTES being read or parsed (event-loop thread only)
        self.reloader: Any = None  # itmrt.serve.swap.Reloader where the service can load its gallery again
        self.model_control = "explicit"  # what ``--model-control`` says: the load/unload endpoints answer if explicit
        self.caller_header: str | None = None  # ``--caller-header``: names the caller (see :func:`caller_of`)

    def error(self, status: int, message: str, close: bool = False) -> Any:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 \
            else {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {}
        if close:  # the body may be unread: the connection is not reused
            headers["Connection"] = "close"
        return self.responses.JSONResponse({"error": message}, status_code=status, headers=headers or None)

    def check(self, request: Any, model: bool = True) -> None:
        """Token (where set), then the model name and version in the path."""
        if not authorized(request.headers.get("authorization"), self.token):
            raise ProtocolError(401, "missing or wrong token; send the header 'Authorization: Bearer TOKEN'")
        params = request.path_params
        if model and params.get("name") != MODEL_NAME:
            raise ProtocolError(
                404, f"unknown model {params.get('name', '')[:80]!r}; this server serves {MODEL_NAME!r}"
            )
        if model and params.get("version", MODEL_VERSION) != MODEL_VERSION:
            raise ProtocolError(
                404, f"model {MODEL_NAME!r} has no version {params['version'][:20]!r}; it has version {MODEL_VERSION}"
            )

    def limits_now(self) -> RequestLimits:
        searcher = self.batcher.searcher
        size = searcher.size if searcher is not None else 1
        # A sharded service's --budget scores that many images a caption: a larger top_k was a 500 per request.
        found: Any = getattr(searcher, "regions", {}).get("budget") if searcher is not None else None
        budget = min(int(found), size) if is_integer(found) else size
        bounded = budget < size
        return RequestLimits(
            self.limits.max_captions,
            self.limits.max_caption_bytes,
            budget,
            searcher is not None and searcher.ids is not None,
            self.limits.max_answer,
            "this service's --budget" if bounded else "the gallery's size",
        )

    # -- health and metadata -------------------------------------------------------

    async def live(self, request: Any) -> Any:
        return self.responses.JSONResponse({"live": True})

    async def ready(self, request: Any) -> Any:
        if self.batcher.ready_now(probe=True):
            return self.responses.JSONResponse({"ready": True})
        return self.responses.JSONResponse({"ready": False, "reason": self.batcher.unready_reason()}, status_code=503)

    async def server_metadata(self, request: Any) -> Any:
        self.check(request, model=False)
        return self.responses.JSONResponse(
            {"name": "itmrt", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    async def model_metadata(self, request: Any) -> Any:
        self.check(request)
        outputs = [
            {"name": protocol.INDICES, "datatype": "INT64", "shape": [-1, -1]},
            {"name": protocol.SCORES, "datatype": "FP32", "shape": [-1, -1]},
        ]
        if self.limits_now().has_ids:
            outputs.append({"name": protocol.IDS, "datatype": "BYTES", "shape": [-1, -1]})
        return self.responses.JSONResponse(
            {
                "name": MODEL_NAME,
                "versions": [MODEL_VERSION],
                "platform": "itmrt",
                "inputs": [{"name": protocol.CAPTIONS, "datatype": "BYTES", "shape": [-1]}],
                "outputs": outputs,
            }
        )

    async def model_ready(self, request: Any) -> Any:
        self.check(request)
        ready = self.batcher.ready_now(probe=True)
        return self.responses.JSONResponse({"name": MODEL_NAME, "ready": ready}, status_code=200 if ready else 503)

    async def metrics_page(self, request: Any) -> Any:
        self.check(request, model=False)
        body, content_type = self.metrics.exposition()
        return self.responses.Response(body, media_type=content_type)

    # -- inference ---------------------------------------------------------------------

    async def infer(self, request: Any) -> Any:
        arrived = time.monotonic()
        read = BodyRead()
        try:
            response = await self.infer_response(request, read, arrived)
        except ProtocolError as exc:
            if isinstance(exc, ImpossibleBody):
                self.budget.give(read.held)  # the pause holds a connection, not the bytes read so far
                read.held = 0
                await self.hold_refusal()
            response = self.error(exc.status, exc.message, close=not read.complete)
        except (QueueFull, NotReady) as exc:
            # A refusal closes the connection: requests pipelined behind it would each be read, parsed and refused
            # on the event loop (a burst of a thousand from a few connections), while the client is told to retry.
            if isinstance(exc, QueueFull) and exc.backlog:
                # Its caller has work queued and sends more: its refusal goes out after Retry-After, so a caller
                # that ignores Retry-After - reconnecting at once, over many connections - cannot make the event
                # loop refuse it thousands of times a second. A caller with nothing queued is refused at once.
                await self.hold_refusal()
            response = self.error(429 if isinstance(exc, QueueFull) else 503, str(exc), close=True)
        except ClientGone:
            response = None
        except Exception as exc:  # a bug here answers this request with a 500, not the whole service
            response = self.server_error(exc)
        finally:
            self.budget.give(read.held)
        self.metrics.count(response.status_code if response is not None else 499, time.monotonic() - arrived)
        return response if response is not None else self.responses.Response(status_code=499)

    async def hold_refusal(self) -> None:
        """Wait ``RETRY_AFTER_S`` before a refusal goes out (counted in ``itmrt_refusals_held``)."""
        self.metrics.refusals_held.inc()
        await asyncio.sleep(RETRY_AFTER_S)

    async def infer_response(self, request: Any, read: BodyRead, arrived: float) -> Any:
        self.check(request)
        if not self.batcher.ready_now():
            raise NotReady(self.batcher.unready_reason())
        declared = request.headers.get("content-length", "")
        large = not declared.isdigit() or int(declared) > INLINE_BODY_BYTES
        if large and self.large_bodies >= LARGE_BODY_LANES:  # no real request is that large: refused at once
            raise ProtocolError(503, f"the service is reading {LARGE_BODY_LANES} bodies over "
                                     f"{INLINE_BODY_BYTES >> 10} KB already; retry shortly")
        self.large_bodies += large
        try:
            parsed = await self.read_and_parse(request, read)
        finally:
            self.large_bodies -= large
        timeout = min(self.limits.timeout_s, parsed.timeout_s or self.limits.timeout_s)
        answer = await self.answer(parsed, arrived + timeout, caller_of(request, self.caller_header))
        content, headers = await self.coded(answer.indices.size > INLINE_ANSWER_RESULTS, protocol.infer_response,
                                            parsed, answer.indices, answer.scores, answer.ids, answer.version)
        return self.responses.Response(content, headers=headers)

    async def read_and_parse(self, request: Any, read: BodyRead) -> protocol.InferRequest:
        try:
            await read_body(request, self.limits, self.budget, read)
        except self.client_disconnect:
            raise ClientGone from None
        # Large documents are parsed and large answers encoded on a small pool (a large document must not hold
        # the event loop); small ones here, where they take well under a millisecond and never queue behind
        # the large ones in the pool.
        parse = (protocol.parse_infer_request, read.data, request.headers.get(protocol.HEADER_LENGTH),
                 self.limits_now())
        parsed: protocol.InferRequest = await self.coded(len(read.data) > INLINE_BODY_BYTES, *parse)
        read.data = b""
        return parsed

    async def coded(self, pooled: bool, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` on the codec pool when ``pooled``, else here on the event loop."""
        if not pooled:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self.codec, function, *args)

    def server_error(self, exc: BaseException) -> Any:
        """A 500: one log line (the traceback at debug level), and a reference instead of internals."""
        self.failures += 1
        log.error("request failure #%d: %s: %s", self.failures, type(exc).__name__, first_line(exc))
        log.debug("request failure #%d", self.failures, exc_info=exc)
        return self.error(500, f"the service failed on this request (failure #{self.failures} in its log)")

    async def answer(self, parsed: protocol.InferRequest, deadline: float, caller: str) -> Any:
        """The batcher's answer to ``parsed``, or the ProtocolError that stands for its failure."""
        future = self.batcher.submit(parsed.captions, parsed.top_k, deadline, caller)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise ProtocolError(
                504,
                f"no answer within the deadline ({self.limits.timeout_s:g} s or the request's timeout); retry later",
            ) from None
        except Refused as exc:
            raise ProtocolError(400, str(exc)) from None


    # -- the model repository: load (swap in what is on disk now) and unload ------------------------

    async def repository_index(self, request: Any) -> Any:
        self.check(request, model=False)
        ready = self.batcher.ready_now()
        entry = {"name": MODEL_NAME, "version": MODEL_VERSION, "state": "READY" if ready else "UNAVAILABLE"}
        if not ready:
            entry["reason"] = self.batcher.unready_reason()
        return self.responses.JSONResponse([entry])

    def check_model_control(self, request: Any) -> None:
        """Token and model first (401, 404), then the mode: load and unload answer only when it is explicit."""
        self.check(request)
        if self.model_control != "explicit":
            raise ProtocolError(403, f"this service runs with --model-control {self.model_control}: the repository "
                                     "load and unload endpoints are refused; start it with --model-control explicit "
                                     "(SIGHUP reloads the gallery in every mode)")

    async def repository_load(self, request: Any) -> Any:
        self.check_model_control(request)
        if self.reloader is None:
            raise ProtocolError(404, "this service was started without a gallery folder to load again")
        outcome = await asyncio.wrap_future(self.reloader.reload("the repository load endpoint"))
        if outcome.error is not None:
            raise ProtocolError(409, "the gallery on disk was refused (see the service's log); it keeps answering "
                                     "from the version it had")
        return self.responses.JSONResponse({"name": MODEL_NAME, "loaded": True, "gallery_sha256": outcome.version})

    async def repository_unload(self, request: Any) -> Any:
        self.check_model_control(request)
        self.batcher.unload()
        return self.responses.JSONResponse({"name": MODEL_NAME, "loaded": False})


def create_app(
    batcher: Batcher,
    metrics: ServiceMetrics,
    limits: HttpLimits,
    token: str | None = None,
    policy: BrowserPolicy | None = None,
    reloader: Any = None,
    drain_s: float | None = None,
    model_control: str = "explicit",
    caller_header: str | None = None,
) -> Any:
    """The Starlette app behind :class:`~itmrt.serve.guard.BrowserGuard`; its lifespan starts the batcher's
    worker and, on shutdown, lets it finish the queue (for at most ``drain_s`` seconds)."""
    applications = require("starlette.applications", "itmrt serve")
    routing = require("starlette.routing", "itmrt serve")
    routes = InferenceRoutes(batcher, metrics, limits, token)
    routes.reloader, routes.model_control, routes.caller_header = reloader, model_control, caller_header
    model_paths = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        yield
        wait = limits.timeout_s if drain_s is None else drain_s
        await asyncio.get_running_loop().run_in_executor(None, batcher.close, wait)
        routes.codec.shutdown(wait=False)

    async def not_found(request: Any, exc: Any) -> Any:
        return routes.error(exc.status_code, f"no such endpoint: {request.method[:20]} {request.url.path[:200]}")

    table = [
        routing.Route("/v2/health/live", routes.live, methods=["GET"]),
        routing.Route("/v2/health/ready", routes.ready, methods=["GET"]),
        routing.Route("/v2", routes.server_metadata, methods=["GET"]),
        routing.Route("/metrics", routes.metrics_page, methods=["GET"]),
        routing.Route("/v2/repository/index", routes.repository_index, methods=["POST"]),
        routing.Route("/v2/repository/models/{name}/load", routes.repository_load, methods=["POST"]),
        routing.Route("/v2/repository/models/{name}/unload", routes.repository_unload, methods=["POST"]),
    ]
    for path in model_paths:
        table += [
            routing.Route(path, routes.model_metadata, methods=["GET"]),
            routing.Route(path + "/ready", routes.model_ready, methods=["GET"]),
            routing.Route(path + "/infer", routes.infer, methods=["POST"]),
        ]
    app = applications.Starlette(routes=table, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})

    async def protocol_error(request: Any, exc: Exception) -> Any:
        assert isinstance(exc, ProtocolError)
        return routes.error(exc.status, exc.message)

    async def server_error(request: Any, exc: Exception) -> Any:
        return routes.server_error(exc)

    app.add_exception_handler(ProtocolError, protocol_error)
    app.add_exception_handler(Exception, server_error)
    app.state.routes = routes
    return BrowserGuard(app, policy or BrowserPolicy(), metrics)
