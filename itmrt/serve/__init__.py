"""``itmrt serve``: a gallery behind the Open Inference Protocol (v2) over HTTP, with dynamic batching.

- :mod:`itmrt.serve.protocol` - requests and responses (JSON and Triton's binary tensor data);
- :mod:`itmrt.serve.searcher` - what the worker asks of a gallery (:class:`Searcher`) and the runtime's searcher;
- :mod:`itmrt.serve.batcher` - the bounded queue and the worker thread that batches requests;
- :mod:`itmrt.serve.app` - the ASGI app (Starlette): endpoints, limits, token, errors;
- :mod:`itmrt.serve.metrics` - Prometheus metrics;
- :mod:`itmrt.serve.server` - :class:`Service`: socket, uvicorn, graceful stop;
- :mod:`itmrt.serve.client` - a standard-library client (``itmrt query``).

Starlette, uvicorn and prometheus-client come with ``pip install 'itmrt[serve]'``;
the client needs none of them. Nothing here is imported by ``import itmrt``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeOptions", "Service", "ServiceClient"]


def __getattr__(name: str) -> Any:
    if name in ("ServeOptions", "Service"):
        from itmrt.serve import server

        return getattr(server, name)
    if name == "ServiceClient":
        from itmrt.serve.client import ServiceClient

        return ServiceClient
    raise AttributeError(f"module 'itmrt.serve' has no attribute {name!r}")
