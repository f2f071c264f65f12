"""A small client for ``itmrt serve`` (standard library only): ``itmrt query`` and the serving benchmark use it.

::

    from itmrt.serve.client import ServiceClient
    with ServiceClient("http://127.0.0.1:8000") as client:
        hits = client.search(["a dog on grass"], top_k=5)
        hits.indices[0], hits.scores[0]

It speaks the same protocol as tritonclient (JSON tensor data by default,
``binary=True`` for Triton's binary extension) over one kept-alive connection.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from itmrt.errors import ItmrtError, first_line
from itmrt.serve import protocol


class ServiceError(ItmrtError):
    """The service answered with an error status; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Hits:
    """Best images per caption: indices and scores ``[N, k]``, and ids where the gallery has them."""

    indices: np.ndarray
    scores: np.ndarray
    ids: np.ndarray | None = None


class ServiceClient:
    """One connection to an ``itmrt serve`` at ``url`` (``http://host:port``)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0, binary: bool = False) -> None:
        example = "give the server's address, e.g. http://127.0.0.1:8000"
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port  # read here: a port out of range or not a number is a ValueError
        except ValueError as exc:
            raise ItmrtError(f"{url!r} is not a valid URL ({first_line(exc)}); {example}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ItmrtError(f"{url!r} is not an http(s) URL; {example}")
        if any(ord(c) <= 32 or ord(c) == 127 for c in url):
            raise ItmrtError(f"{url!r} holds spaces or control characters; {example}")
        self.url, self.token, self.binary = url.rstrip("/"), token, binary
        self._prefix = parts.path.rstrip("/")
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        try:
            self._connection = kind(parts.hostname, port, timeout=timeout_s)
        except (ValueError, http.client.HTTPException) as exc:
            raise ItmrtError(f"{url!r} is not a valid URL ({first_line(exc)}); {example}") from None

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, bytes]:
        """(status, response headers, body) of one HTTP request; a connection the server closed is reopened once."""
        headers = dict(headers or {})
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (1, 2):
            try:
                return self._exchange(method, path, body, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._connection.close()
                if attempt == 2:
                    raise ItmrtError(
                        f"{self.url} closed the connection ({exc}); is `itmrt serve` still running?"
                    ) from None
            except (OSError, http.client.HTTPException) as exc:
                self._connection.close()
                raise ItmrtError(f"cannot reach {self.url} ({exc}); is `itmrt serve` running there?") from None
        raise AssertionError("unreachable")

    def _exchange(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, Any, bytes]:
        """One request and its answer. A server that answers before it has read the whole body (413: a body over
        its limit) and closes makes the sending fail: the answer it gave is read all the same."""
        try:
            self._connection.request(method, self._prefix + path, body=body, headers=headers)
        except (ConnectionResetError, BrokenPipeError) as exc:
            try:
                response = self._connection.getresponse()
            except (OSError, http.client.HTTPException):
                raise exc from None  # no answer: the connection was closed before (reopened by request)
        else:
            response = self._connection.getresponse()
        return response.status, response.headers, response.read()

    def ready(self) -> bool:
        """Whether the service reports ready (gallery loaded and warmed up)."""
        status, _headers, _body = self.request("GET", "/v2/health/ready")
        return status == 200

    def search(self, captions: Sequence[str], top_k: int | None = None) -> Hits:
        """Each caption's best images (``top_k``: the server's default, 10, when None)."""
        body, headers = protocol.infer_request_body(captions, top_k, self.binary)
        path = f"/v2/models/{protocol.MODEL_NAME}/infer"
        status, reply_headers, reply = self.request("POST", path, body, headers)
        if status != 200:
            try:
                message = json.loads(reply.decode("utf-8"))["error"]
            except (ValueError, KeyError, TypeError):
                message = reply[:200].decode("utf-8", "replace") or "no error message"
            raise ServiceError(f"{self.url} answered {status}: {message}", status)
        try:
            tensors = protocol.parse_infer_response(reply, reply_headers.get(protocol.HEADER_LENGTH))
            return Hits(tensors[protocol.INDICES], tensors[protocol.SCORES], tensors.get(protocol.IDS))
        except (protocol.ProtocolError, KeyError, ValueError, TypeError) as exc:
            raise ItmrtError(f"{self.url} answered something that is not a text_to_image response ({exc})") from None


def search_in_batches(
    client: ServiceClient, captions: Sequence[str], top_k: int | None = None, batch: int = 64
) -> Iterator[tuple[int, Hits]]:
    """(first caption's number, hits) for ``captions`` sent ``batch`` at a time."""
    if batch < 1:
        raise ItmrtError(f"--batch must be at least 1, not {batch}")
    for start in range(0, len(captions), batch):
        yield start, client.search(captions[start : start + batch], top_k)
