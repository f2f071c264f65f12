"""``itmrt serve``: hold a gallery in memory and answer text-to-image queries over HTTP (Open Inference Protocol v2)."""

from __future__ import annotations

from pathlib import Path

import typer

from itmrt.cli.app import app


@app.command("serve")
def serve_command(
    source: Path = typer.Argument(
        ..., help="A gallery folder (from `itmrt index`), or a bundle folder with --gallery."
    ),
    gallery: Path | None = typer.Option(None, "--gallery", help="With a bundle as the source: the gallery to search."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; set --token-file then)."
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port, printed at start)."),
    backend: str = typer.Option("ort", "--backend", help="ort (ONNX Runtime) or trt (native TensorRT engines)."),
    precision: str = typer.Option(
        "fp32", "--precision", help="fp32, fp16 or int8 (the bundle must hold that variant)."
    ),
    providers: str | None = typer.Option(
        None, "--providers", help="ONNX Runtime providers, comma-separated (tensorrt,cuda,cpu)."
    ),
    threads: int = typer.Option(0, "--threads", min=0, help="ONNX Runtime intra-op threads (0: one per core)."),
    max_batch_captions: int = typer.Option(
        64, "--max-batch-captions", min=1, help="Captions the worker encodes and scores together (1: no batching)."
    ),
    max_delay_ms: float = typer.Option(
        5.0,
        "--max-delay-ms",
        min=0.0,
        help="How long the oldest waiting request may wait for others to join its batch.",
    ),
    max_queue: int = typer.Option(
        256, "--max-queue", min=1, help="Requests waiting at most; more are refused at once with 429."
    ),
    max_captions: int = typer.Option(256, "--max-captions", min=1, help="Captions per request at most (more: 400)."),
    max_caption_bytes: int = typer.Option(
        2048, "--max-caption-bytes", min=1, help="UTF-8 bytes per caption at most (more: 400)."
    ),
    max_body_mb: float = typer.Option(
        4.0, "--max-body-mb", min=0.001, help="Request body size limit in MB, after decompression (more: 413)."
    ),
    timeout_s: float = typer.Option(
        30.0, "--timeout-s", min=0.001, help="Deadline of a request, from its arrival (past it: 504)."
    ),
    on_long: str = typer.Option(
        "refuse", "--on-long", help="Captions over the bundle's token limit: refuse (400) or truncate (logged)."
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="A file holding a token: then requests need 'Authorization: Bearer TOKEN' (health probes excepted).",
    ),
    max_connections: int = typer.Option(
        1024, "--max-connections", min=1, help="Open connections at most (more are answered 503 by uvicorn)."
    ),
    scorer: str = typer.Option(
        "auto",
        "--scorer",
        help="auto, graph or fused (auto: the fused CPU scorer where it applies and numba is installed).",
    ),
    memory_mb: int = typer.Option(32, "--memory-mb", min=1, help="Memory budget of one scoring tile, in MB."),
    access_log: bool = typer.Option(False, "--access-log/--no-access-log", help="Log every HTTP request (stdout)."),
) -> None:
    """Serve a gallery: POST /v2/models/text_to_image/infer answers each caption's best images.

    Speaks the KServe / Triton Open Inference Protocol (v2) over HTTP, so
    tritonclient, KServe tooling and curl work; concurrent requests are merged
    into one batch (up to --max-batch-captions, waiting at most --max-delay-ms).
    /v2/health/ready turns 200 once the gallery is loaded and warmed up;
    /metrics is in Prometheus' text format. SIGINT or SIGTERM stop accepting,
    answer every request received, and exit 0.
    """
    from itmrt.serve.app import HttpLimits
    from itmrt.serve.batcher import BatchSettings
    from itmrt.serve.server import ServeOptions, Service

    options = ServeOptions(
        host=host,
        port=port,
        backend=backend,
        precision=precision,
        providers=[p.strip() for p in providers.split(",") if p.strip()] if providers else None,
        threads=threads,
        scorer=scorer,
        memory_mb=memory_mb,
        on_long=on_long,
        token_file=token_file,
        batch=BatchSettings(max_batch_captions, max_delay_ms / 1000.0, max_queue),
        limits=HttpLimits(int(max_body_mb * (1 << 20)), max_captions, max_caption_bytes, timeout_s),
        max_connections=max_connections,
        access_log=access_log,
    )
    Service(source, gallery, options).run()
