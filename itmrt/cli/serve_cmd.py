"""``itmrt serve``: hold a gallery in memory and answer text-to-image queries over HTTP (Open Inference Protocol v2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli import ray_options as ray_flags
from itmrt.cli.app import app
from itmrt.cli.flags import OnLong

Opt = typer.Option


@app.command("serve")
@flags.runtime_group("backend", "precision", "providers", "threads", "scorer", "memory_mb", "on_long", "device",
                       "gpu_mem_limit_mb",
                       on_long=flags.on_long(OnLong.REFUSE, "refuse (400) or truncate (logged)"))
@flags.region_group()
@ray_flags.ray_group
def serve_command(
    source: Path = typer.Argument(..., help="A gallery folder (from `itmrt index`), or a bundle with --gallery."),
    gallery: Path | None = Opt(None, "--gallery", help="With a bundle as the source: the gallery to search."),
    host: str = Opt("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; use a token)."),
    port: int = Opt(8000, "--port", min=0, max=65535, help="TCP port (0: any free port, printed at start)."),
    runtime: Any = None,  # the runtime options (flags.runtime_group): one RuntimeOptions
    max_batch_captions: int = Opt(64, "--max-batch-captions", min=1, max=limits.MAX_BATCH, help="Captions scored together (1: no batching)."),
    max_delay_ms: float = Opt(5.0, "--max-delay-ms", callback=flags.finite("--max-delay-ms", 0.0, 10000.0), help="How long a batch waits for more requests under load (a request reaching an idle worker goes at once)."),
    wait_when_idle: bool = Opt(False, "--wait-when-idle", help="Let a request reaching an idle worker wait --max-delay-ms for company too."),
    unit_captions: int = Opt(4, "--unit-captions", min=1, max=limits.MAX_BATCH, help="NAAF/SCAN: captions scored in one go; larger requests are scored in parts of this size, taking turns with other callers' (a one-caption request waits for about one unit)."),
    max_wait_ms: float = Opt(500.0, "--max-wait-ms", callback=flags.finite("--max-wait-ms", 0.0, 1e7), help="A request whose expected wait in the queue is longer is refused at once (429; 0: no bound)."),
    max_caller_captions: int = Opt(512, "--max-caller-captions", min=1, max=limits.MAX_COUNT, help="Captions one caller may have queued (more: 429)."),
    caller_header: str | None = Opt(None, "--caller-header", metavar="NAME", help="A header naming the caller for the fair queue (set by a proxy you trust; else: remote address, or connection for loopback)."),
    max_queue: int = Opt(256, "--max-queue", min=1, max=limits.MAX_COUNT, help="Requests waiting at most; more are refused at once (429)."),
    max_captions: int = Opt(256, "--max-captions", min=1, max=limits.MAX_BATCH, help="Captions per request at most (more: 400)."),
    max_caption_bytes: int = Opt(2048, "--max-caption-bytes", min=1, max=1 << 20, help="UTF-8 bytes per caption at most (400)."),
    max_body_mb: float = Opt(1.0, "--max-body-mb", callback=flags.finite("--max-body-mb", 0.001, 1024.0), help="Body size limit, after decompression (413)."),
    timeout_s: float = Opt(30.0, "--timeout-s", callback=flags.finite("--timeout-s", 0.001, limits.MAX_SECONDS), help="Deadline of a request from its arrival (504)."),
    max_answer: int = Opt(10_000, "--max-answer", min=1, max=limits.MAX_COUNT, help="Results per answer at most: captions x top_k (more: 400)."),
    header_timeout_s: float = Opt(5.0, "--header-timeout-s", callback=flags.finite("--header-timeout-s", 0.1, 3600.0), help="Seconds for a request's headers to arrive (then the connection is closed)."),
    body_timeout_s: float = Opt(10.0, "--body-timeout-s", callback=flags.finite("--body-timeout-s", 0.1, 3600.0), help="Seconds for a request's whole body to arrive (408)."),
    write_timeout_s: float = Opt(10.0, "--write-timeout-s", callback=flags.finite("--write-timeout-s", 0.1, 3600.0), help="Seconds a client may leave its answer unread (then the connection is cut)."),
    max_buffered_mb: float = Opt(64.0, "--max-buffered-mb", callback=flags.finite("--max-buffered-mb", 0.01, 1 << 20), help="Request bodies held at once across all connections, MB (more: 503)."),
    grace_s: float = Opt(20.0, "--grace-s", callback=flags.finite("--grace-s", 1.0, 3600.0), help="SIGTERM: answer what is in flight, and exit within this many seconds."),
    allowed_hosts: list[str] = Opt([], "--allowed-hosts", metavar="HOST", help="A Host name clients use besides loopback ones (repeat; '.example.com' a domain, '*' any)."),
    cors_origin: list[str] = Opt([], "--cors-origin", metavar="ORIGIN", help="A web origin (https://app.example.com) allowed to call the service (repeat)."),
    watch_s: float = Opt(1.0, "--watch-s", callback=flags.finite("--watch-s", 0.0, 3600.0), help="--model-control poll: how often the gallery folder is checked for a new version (0: not at all)."),
    model_control: str = Opt("poll", "--model-control", metavar="none|poll|explicit", help=(
        "What may swap in a new version of the gallery, as Triton's --model-control-mode: poll (a changed folder), "
        "explicit (POST /v2/repository/models/text_to_image/load and /unload; refused with 403 otherwise), "
        "none (nothing). SIGHUP reloads in every mode.")),
    token_file: Path | None = Opt(None, "--token-file", help="Require 'Authorization: Bearer TOKEN' (the file's)."),
    max_connections: int = Opt(1024, "--max-connections", min=1, max=limits.MAX_BATCH, help="Open connections at most (more: 503)."),
    access_log: bool = Opt(False, "--access-log/--no-access-log", help="Log every HTTP request (stdout)."),
    shortlist: int | None = Opt(None, "--shortlist", min=1, help=(
        "Sharded gallery: rerank each shard's K best candidates (FAISS) instead of scoring every image.")),
    copy_shards_mb: float = Opt(1024.0, "--copy-shards-mb", callback=flags.finite("--copy-shards-mb", 0.0, limits.MAX_COPY_MB), help=(
        "Sharded gallery: copy its shards into memory when their files take at most this many MB (0: never); "
        "larger ones are read from their files by position as searches need them, the files checked at each "
        "search (a changed or truncated file: 503 and not ready until a good version is swapped in).")),
    regions: Any = None,  # the region-index flags (flags.region_group): a dict for SearchRequest
    ray: Any = None,  # the --ray options (ray_options.ray_group): RayOptions, or None without --ray
) -> None:
    """Serve a gallery: POST /v2/models/text_to_image/infer answers each caption's best images.

    Speaks the KServe / Triton Open Inference Protocol (v2) over HTTP, so
    tritonclient, KServe tooling and curl work; concurrent requests are merged
    into one batch (up to --max-batch-captions, waiting at most --max-delay-ms while
    requests arrive together; a request reaching an idle worker is answered at once). NAAF/SCAN requests are
    scored in units of --unit-captions, callers taking turns (fair queueing), and a request expected to wait in
    the queue over --max-wait-ms is refused at once (429).
    /v2/health/ready turns 200 once the gallery is loaded and warmed up (the
    health probes need no token); /metrics is in Prometheus' text format.
    SIGINT or SIGTERM stop accepting, answer every request received, and exit 0 (within --grace-s).
    A new version of the gallery (a changed folder, SIGHUP, or POST /v2/repository/models/text_to_image/load as
    --model-control allows) is swapped in whole between batches; one that fails its checks is refused and the
    current one kept.
    Only loopback Host names are answered unless --allowed-hosts names more; POST bodies must say
    Content-Type application/json (or application/octet-stream); no CORS unless --cors-origin.
    A sharded gallery (itmrt index --shard-images) is searched shard by shard and merged, in this process or,
    with --ray, on Ray actors (one per shard unless --ray-workers), with the same answers.
    """
    from itmrt.serve.batcher import BatchSettings
    from itmrt.serve.http_app import HttpLimits
    from itmrt.serve.server import ServeOptions, Service

    serve_options = ServeOptions(
        host=host, port=port, runtime=runtime, token_file=token_file,
        batch=BatchSettings(max_batch_captions, max_delay_ms / 1000.0, max_queue, wait_when_idle, unit_captions,
                            max_wait_ms / 1000.0, max_caller_captions),
        limits=HttpLimits(int(max_body_mb * (1 << 20)), max_captions, max_caption_bytes, timeout_s, max_answer,
                          header_timeout_s, body_timeout_s, write_timeout_s, int(max_buffered_mb * (1 << 20))),
        max_connections=max_connections, access_log=access_log, shortlist=shortlist, regions=regions,
        allowed_hosts=tuple(allowed_hosts), cors_origins=tuple(cors_origin), grace_s=grace_s, watch_s=watch_s,
        ray=ray, copy_shards_mb=copy_shards_mb, model_control=model_control,
        caller_header=caller_header,
    )
    Service(source, gallery, serve_options).run()
