"""The ASGI app (Starlette): the Open Inference Protocol's HTTP endpoints over a :class:`Batcher`.

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
``GET /v2/models/text_to_image[/versions/1]``, ``GET .../ready``,
``POST .../infer`` and ``GET /metrics``. With a token, every route but the two
health probes needs ``Authorization: Bearer TOKEN``.

Errors are ``{"error": "one line"}`` with the protocol's status: 400 bad
input, 401 missing or wrong token, 404 unknown model or route, 413 body over
the limit, 415 an unknown Content-Encoding, 429 queue full, 503 not ready or
stopping, 504 past the request's deadline, 500 a failure inside the model
(logged; the service carries on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from itmrt import __version__
from itmrt.errors import first_line
from itmrt.optional import require
from itmrt.serve import protocol
from itmrt.serve.auth import authorized
from itmrt.serve.batcher import Batcher, DeadlineExceeded, NotReady, QueueFull, Refused
from itmrt.serve.metrics import ServiceMetrics
from itmrt.serve.protocol import MODEL_NAME, MODEL_VERSION, ProtocolError, RequestLimits

log = logging.getLogger("itmrt.serve")


@dataclass(frozen=True)
class HttpLimits:
    """Limits on one request: body bytes (after decompression), captions, bytes per caption, seconds to answer."""

    max_body_bytes: int = 4 << 20
    max_captions: int = 256
    max_caption_bytes: int = 2048
    timeout_s: float = 30.0


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it (or its gzip/deflate content) passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ProtocolError(
            413, f"the request body is {int(declared)} bytes, over the limit of {limit}; send fewer or shorter captions"
        )
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise ProtocolError(
            415, f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or no encoding"
        )
    inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15) if encoding != "identity" else None
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
        chunks.append(chunk)
    return b"".join(chunks)


class InferenceRoutes:
    """The endpoints' handlers, sharing the batcher, the metrics, the limits and the token."""

    def __init__(self, batcher: Batcher, metrics: ServiceMetrics, limits: HttpLimits, token: str | None) -> None:
        self.batcher, self.metrics, self.limits, self.token = batcher, metrics, limits, token
        self.responses = require("starlette.responses", "itmrt serve")

    def error(self, status: int, message: str) -> Any:
        headers = (
            {"WWW-Authenticate": "Bearer"} if status == 401 else {"Retry-After": "1"} if status in (429, 503) else None
        )
        return self.responses.JSONResponse({"error": message}, status_code=status, headers=headers)

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
        return RequestLimits(
            self.limits.max_captions,
            self.limits.max_caption_bytes,
            size,
            searcher is not None and searcher.ids is not None,
        )

    # -- health and metadata -------------------------------------------------------

    async def live(self, request: Any) -> Any:
        return self.responses.JSONResponse({"live": True})

    async def ready(self, request: Any) -> Any:
        ready = self.batcher.ready.is_set() and not self.batcher.closing
        return self.responses.JSONResponse({"ready": ready}, status_code=200 if ready else 503)

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
        ready = self.batcher.ready.is_set() and not self.batcher.closing
        return self.responses.JSONResponse({"name": MODEL_NAME, "ready": ready}, status_code=200 if ready else 503)

    async def metrics_page(self, request: Any) -> Any:
        self.check(request, model=False)
        body, content_type = self.metrics.exposition()
        return self.responses.Response(body, media_type=content_type)

    # -- inference ---------------------------------------------------------------------

    async def infer(self, request: Any) -> Any:
        arrived = time.monotonic()
        try:
            self.check(request)
            if not self.batcher.ready.is_set():
                raise NotReady(self.batcher.failure or "the gallery is still loading")
            body = await read_body(request, self.limits.max_body_bytes)
            parsed = protocol.parse_infer_request(body, request.headers.get(protocol.HEADER_LENGTH), self.limits_now())
            timeout = min(self.limits.timeout_s, parsed.timeout_s or self.limits.timeout_s)
            answer = await self.answer(parsed, arrived + timeout)
            searcher = self.batcher.searcher
            content, headers = protocol.infer_response(
                parsed, answer.indices, answer.scores, searcher.ids if searcher else None
            )
            response = self.responses.Response(content, headers=headers)
        except ProtocolError as exc:
            response = self.error(exc.status, exc.message)
        except (QueueFull, NotReady) as exc:
            response = self.error(429 if isinstance(exc, QueueFull) else 503, str(exc))
        except Exception as exc:  # a bug here answers this request with a 500, not the whole service
            log.exception("inference request failed")
            response = self.error(500, f"the service failed on this request: {first_line(exc)}")
        self.metrics.count(response.status_code, time.monotonic() - arrived)
        return response

    async def answer(self, parsed: protocol.InferRequest, deadline: float) -> Any:
        """The batcher's answer to ``parsed``, or the ProtocolError that stands for its failure."""
        future = self.batcher.submit(parsed.captions, parsed.top_k, deadline)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise ProtocolError(
                504,
                f"no answer within the deadline ({self.limits.timeout_s:g} s or the request's timeout); retry later",
            ) from None
        except Refused as exc:
            raise ProtocolError(400, str(exc)) from None
        except Exception as exc:  # logged by the worker; the client gets one line
            raise ProtocolError(500, f"the model failed on this request: {first_line(exc)}") from None


def create_app(batcher: Batcher, metrics: ServiceMetrics, limits: HttpLimits, token: str | None = None) -> Any:
    """The Starlette app; its lifespan starts the batcher's worker and, on shutdown, lets it finish the queue."""
    applications = require("starlette.applications", "itmrt serve")
    routing = require("starlette.routing", "itmrt serve")
    routes = InferenceRoutes(batcher, metrics, limits, token)
    model_paths = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.close, limits.timeout_s)

    async def not_found(request: Any, exc: Any) -> Any:
        return routes.error(exc.status_code, f"no such endpoint: {request.method} {request.url.path[:200]}")

    table = [
        routing.Route("/v2/health/live", routes.live, methods=["GET"]),
        routing.Route("/v2/health/ready", routes.ready, methods=["GET"]),
        routing.Route("/v2", routes.server_metadata, methods=["GET"]),
        routing.Route("/metrics", routes.metrics_page, methods=["GET"]),
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

    app.add_exception_handler(ProtocolError, protocol_error)
    return app
