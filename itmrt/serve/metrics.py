"""The service's Prometheus metrics (``GET /metrics``), in a registry of its own.

- ``itmrt_requests_total{outcome}``: inference requests by outcome (ok,
  bad_request, unauthorized, not_found, too_large, queue_full, unavailable,
  timeout, error);
- ``itmrt_queue_depth``: requests waiting for the worker;
- ``itmrt_batch_captions`` / ``itmrt_batch_requests``: the size of each batch
  the worker formed, in captions and in requests;
- ``itmrt_stage_seconds{stage}``: time per stage - ``queue_wait`` per request,
  ``encode`` (tokenize and text encoder) and ``score`` (top-k over the gallery)
  per batch; a sharded gallery searched through its region index adds
  ``index_candidates`` and ``index_rerank`` per batch (summed over its shards);
- ``itmrt_request_seconds``: an inference request from its arrival to its answer;
- ``itmrt_ready`` (0/1) and ``itmrt_gallery_images``;
- ``itmrt_client_errors_total{status}``: every 4xx the service gave, on any route (a client's fault, never
  logged as an error), and 499 for a client that closed its connection before its answer;
- ``itmrt_server_errors_total``: 500s (each one log line);
- ``itmrt_connections_dropped_total{reason}``: connections the transport closed (header_timeout,
  write_timeout, evicted, over_limit);
- ``itmrt_swaps_total{outcome}``: gallery or bundle versions swapped in (ok) or refused (refused).
"""

from __future__ import annotations

from typing import Any

from itmrt.optional import require

OUTCOMES = {
    200: "ok",
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    408: "body_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    429: "queue_full",
    503: "unavailable",
    504: "timeout",
    499: "client_closed",
}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def outcome_of(status: int) -> str:
    return OUTCOMES.get(status, "error")


class ServiceMetrics:
    """Counters, gauges and histograms of one service (thread-safe: the worker thread updates them too)."""

    def __init__(self) -> None:
        prometheus = require("prometheus_client", "the service's /metrics")
        self._prometheus = prometheus
        self.registry = prometheus.CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = prometheus.Counter(
            "itmrt_requests", "Inference requests by outcome.", ["outcome"], registry=registry
        )
        for outcome in (*OUTCOMES.values(), "error"):
            self.requests.labels(outcome)  # every outcome is exported from the start, at 0
        self.queue_depth = prometheus.Gauge("itmrt_queue_depth", "Requests waiting for the worker.", registry=registry)
        self.batch_captions = prometheus.Histogram(
            "itmrt_batch_captions", "Captions per batch the worker formed.", buckets=SIZE_BUCKETS, registry=registry
        )
        self.batch_requests = prometheus.Histogram(
            "itmrt_batch_requests", "Requests (or parts of split requests) per batch the worker formed.",
            buckets=SIZE_BUCKETS, registry=registry
        )
        self.stage_seconds = prometheus.Histogram(
            "itmrt_stage_seconds",
            "Seconds per stage: queue_wait (per request), encode and score (per batch).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_seconds = prometheus.Histogram(
            "itmrt_request_seconds",
            "Inference requests from arrival to answer.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ready = prometheus.Gauge("itmrt_ready", "1 once the gallery is loaded and warmed up.", registry=registry)
        self.gallery_images = prometheus.Gauge("itmrt_gallery_images", "Images in the gallery.", registry=registry)
        self.client_errors = prometheus.Counter(
            "itmrt_client_errors", "4xx answers on any route (499: the client left first).", ["status"],
            registry=registry,
        )
        for status in (400, 401, 403, 404, 405, 408, 409, 413, 415, 429, 499):
            self.client_errors.labels(str(status))
        self.server_errors = prometheus.Counter("itmrt_server_errors", "500 answers.", registry=registry)
        self.dropped = prometheus.Counter(
            "itmrt_connections_dropped", "Connections the transport closed, by reason.", ["reason"],
            registry=registry,
        )
        for reason in ("header_timeout", "write_timeout", "evicted", "over_limit"):
            self.dropped.labels(reason)
        self.swaps = prometheus.Counter(
            "itmrt_swaps", "Gallery or bundle versions swapped in (ok) or refused.", ["outcome"], registry=registry
        )
        for outcome in ("ok", "refused"):
            self.swaps.labels(outcome)
        self.refused_wait = prometheus.Counter(
            "itmrt_refused_wait", "Requests refused (429) because their expected wait passed --max-wait-ms or their "
            "timeout.", registry=registry,
        )
        self.refusals_held = prometheus.Counter(
            "itmrt_refusals_held", "Refusals sent after Retry-After rather than at once: 429 to a caller that had "
            "work queued already, 400 to a body no request can be.", registry=registry,
        )

    def client_error(self, status: int) -> None:
        self.client_errors.labels(str(status)).inc()

    def count(self, status: int, seconds: float | None = None) -> None:
        """One inference request answered with HTTP ``status`` after ``seconds``."""
        self.requests.labels(outcome_of(status)).inc()  # 4xx (499 too) are counted by the guard as they go out
        if status == 500:
            self.server_errors.inc()
        if seconds is not None:
            self.request_seconds.observe(seconds)

    def batch(self, requests: int, captions: int, encode_s: float, score_s: float,
              index_stages: dict[str, float] | None = None) -> None:
        self.batch_requests.observe(requests)
        self.batch_captions.observe(captions)
        self.stage_seconds.labels("encode").observe(encode_s)
        self.stage_seconds.labels("score").observe(score_s)
        for stage, seconds in (index_stages or {}).items():
            self.stage_seconds.labels(f"index_{stage}").observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        prometheus: Any = self._prometheus
        return prometheus.generate_latest(self.registry), prometheus.CONTENT_TYPE_LATEST
