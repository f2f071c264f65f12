"""``itmrt query``: send captions to an ``itmrt serve`` and print each caption's best images as JSONL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli.app import app


@app.command("query")
@flags.output_group("overwrite", overwrite=flags.overwrite("an existing --out file"))
def query_command(
    url: str = typer.Argument(..., help="The service's address, e.g. http://127.0.0.1:8000."),
    captions_path: Path = typer.Option(..., "--captions", help="Captions file: UTF-8, one caption per line."),
    top_k: int = typer.Option(10, "--top-k", min=1, max=limits.MAX_COUNT, help="Results per caption."),
    token_file: Path | None = typer.Option(None, "--token-file", help="A file holding the service's token."),
    batch: int = typer.Option(64, "--batch", min=1, max=limits.MAX_BATCH, help="Captions per request."),
    out: Path | None = typer.Option(None, "--out", help="Write the JSONL here instead of printing it."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
    timeout_s: float = typer.Option(60.0, "--timeout-s", callback=flags.finite("--timeout-s", 0.001, limits.MAX_SECONDS), help="Seconds to wait for each answer."),
    wait_s: float = typer.Option(0.0, "--wait-s", callback=flags.finite("--wait-s", 0.0, limits.MAX_SECONDS), help="Wait up to this long for the service to be up and ready (a serve just started in the background)."),
) -> None:
    """One JSON line per caption - {"query": "caption", "index", "caption", "images", "scores"} - as `itmrt infer`
    writes them (plus "image_ids" where the gallery names its images)."""
    from itmrt.cli.outputs import check_outputs
    from itmrt.data.precomp import read_captions
    from itmrt.publish import atomic_write_text
    from itmrt.runtime.results import caption_result_lines
    from itmrt.serve.auth import read_token_file
    from itmrt.serve.client import ServiceClient, search_in_batches

    check_outputs({"--out": out}, outputs.overwrite, {"captions file": captions_path, "token file": token_file})
    captions = read_captions(captions_path, "one caption per line")
    token = read_token_file(token_file) if token_file is not None else None
    lines: list[str] = []
    with ServiceClient(url, token, timeout_s) as client:
        if wait_s > 0:
            _wait_until_ready(client, wait_s)
        for start, hits in search_in_batches(client, captions, top_k, batch):
            chunk = caption_result_lines(captions[start : start + batch], hits, start, hits.ids)
            if out is None:
                typer.echo("\n".join(chunk))
            lines.extend(chunk)
    if out is not None:
        atomic_write_text(out, "\n".join(lines) + "\n", outputs.overwrite)
        typer.echo(f"{len(captions)} captions answered by {url}; wrote {out}", err=True)


def _wait_until_ready(client: Any, seconds: float) -> None:
    """Poll the service's readiness until it is ready; past ``seconds``, a one-line error saying why."""
    import time

    from itmrt.errors import ItmrtError

    deadline = time.monotonic() + seconds
    while True:
        try:
            if client.ready():
                return
            why = "it is up but not ready (still loading its gallery?)"
        except ItmrtError as exc:  # nothing listens there yet
            why = str(exc)
        if time.monotonic() >= deadline:
            raise ItmrtError(f"{client.url} was not ready within --wait-s {seconds:g}: {why}")
        time.sleep(0.2)
