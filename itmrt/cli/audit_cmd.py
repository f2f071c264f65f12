"""``itmrt audit``: how much of exhaustive scoring's answer a sharded gallery's index finds, on the user's captions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli.app import app

Opt = typer.Option


@app.command("audit")
@flags.region_group()
def audit_command(
    gallery: Path = typer.Argument(..., help="A sharded gallery (itmrt index ... --shard-images N)."),
    captions_path: Path = Opt(..., "--captions", help="Captions file: UTF-8, one caption per line."),
    sample: int = Opt(50, "--sample", min=1, max=limits.MAX_COUNT, help="Captions drawn from the file to audit."),
    top_k: int = Opt(10, "--top-k", min=1, max=limits.MAX_COUNT, help="Recall is measured on the top k."),
    shortlist: int | None = Opt(None, "--shortlist", min=1, max=limits.MAX_COUNT, help=(
        "K per shard reranked exactly, at least --top-k (default: what the gallery's region index records, else "
        "100; raised to --top-k).")),
    regions: Any = None,  # the region-index flags (flags.region_group): a dict for SearchRequest
    seed: int = Opt(0, "--seed", min=0, max=limits.MAX_SEED, help="Seed of the caption sample."),
    threads: int = flags.threads(),
    out: Path | None = Opt(None, "--out", help="Write the report as JSON here."),
    markdown: Path | None = Opt(None, "--markdown", help="Write the Markdown table here too."),
    overwrite: bool = flags.overwrite("existing --out / --markdown files"),
) -> None:
    """Score a sample of your captions exhaustively and through the gallery's index; print recall@k, top-1
    agreement and each stage's time per caption as a Markdown table (JSON with --out).

    Exhaustive scoring costs one scorer evaluation per image and caption: a sample of 50 captions on 100K
    images is minutes on a CPU.
    """
    from itmrt.cli.outputs import check_outputs, warn_on_stderr
    from itmrt.data.precomp import read_captions
    from itmrt.errors import ItmrtError
    from itmrt.publish import atomic_write_text
    from itmrt.runtime.gallery import is_gallery
    from itmrt.runtime.shortlist import check_shortlist
    from itmrt.scale.audit import audit, audit_markdown
    from itmrt.scale.layout import is_sharded_gallery
    from itmrt.scale.open_gallery import open_shards

    if shortlist is not None:
        check_shortlist(shortlist, top_k)
    check_outputs({"--out": out, "--markdown": markdown}, overwrite, {"gallery": gallery, "captions file": captions_path})
    if is_gallery(gallery) and not is_sharded_gallery(gallery):
        raise ItmrtError(f"{gallery} is a one-folder gallery, which is always scored exhaustively: audit compares a "
                         "sharded gallery's index with exhaustive scoring (make one with `itmrt index ... "
                         "--shard-images N --shortlist-index regions`)")
    captions = read_captions(captions_path, "one caption per line")
    shards = open_shards(gallery, threads=threads, warn=warn_on_stderr)
    try:
        report = audit(shards, captions, sample, top_k, shortlist, regions.get("nprobe"), seed,
                       regions.get("exact_pass"), regions.get("union"), refine=regions.get("refine"),
                       prefilter=regions.get("prefilter"), budget=regions.get("budget"),
                       rescore=regions.get("rescore"))
    finally:
        shards.close()
        shards.runtime.close()
    table = audit_markdown(report)
    typer.echo(table, nl=False)
    if markdown is not None:
        atomic_write_text(markdown, table, overwrite)
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=2) + "\n", overwrite)
