"""``itmrt serve``: a gallery behind the Open Inference Protocol (v2) over HTTP, with dynamic batching.

- :mod:`itmrt.serve.protocol` - requests and responses (JSON and Triton's binary tensor data);
- :mod:`itmrt.serve.searcher` - what the worker asks of a gallery (:class:`Searcher`) and the runtime's searcher;
- :mod:`itmrt.serve.batcher` - the bounded queue and the worker thread that batches requests;
- :mod:`itmrt.serve.http_app` - the ASGI app (Starlette): endpoints, limits, token, errors;
- :mod:`itmrt.serve.metrics` - Prometheus metrics;
- :mod:`itmrt.serve.quiet` - warnings a client can cause, at most one a minute of each kind;
- :mod:`itmrt.serve.server` - :class:`Service`: socket, uvicorn, graceful stop;
- :mod:`itmrt.serve.client` - a standard-library client (``itmrt query``).

Starlette, uvicorn and prometheus-client come with ``pip install 'itmrt[serve]'``;
the client needs none of them. Nothing here is imported by ``import itmrt``.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "ServeOptions": "itmrt.serve.server",
    "Service": "itmrt.serve.server",
    "ServiceClient": "itmrt.serve.client",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
