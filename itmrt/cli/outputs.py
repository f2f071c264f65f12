"""Output paths checked before any work starts: nothing the user has is replaced without ``--overwrite``."""

from __future__ import annotations

from pathlib import Path

import typer

from itmrt.errors import ItmrtError


def warn_on_stderr(message: str) -> None:
    """How commands show the runtime's warnings (a truncated caption, a skipped image): one line on stderr."""
    typer.echo(f"warning: {message}", err=True)


def check_new_files(paths: list[Path | None], overwrite: bool) -> None:
    """Refuse a path that is a folder, or an existing file without ``overwrite`` (``None`` entries are skipped)."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise ItmrtError(f"{path} is a folder; give a file path")
        if path.exists() and not overwrite:
            raise ItmrtError(f"{path} already exists; pass --overwrite to replace it or choose another path")


def check_outputs_apart(outputs: dict[str, Path | None], inputs: dict[str, Path | None]) -> None:
    """Refuse an output that would land on an input of the same command, whatever ``--overwrite`` says: a path
    that resolves (symlinks followed) to an input file, to a folder that holds an input, or into an input
    bundle or gallery (any path inside: the folder is a closed world) or onto a file of another input folder
    (an image folder). ``outputs``/``inputs``: flag or role -> path (None: absent)."""
    for flag, out in outputs.items():
        if out is None:
            continue
        target = out.resolve()
        for role, given in inputs.items():
            if given is None or not given.exists():
                continue
            source = given.resolve()
            inside = source in target.parents and (_closed_world(role) or target.exists())
            if target == source or target in source.parents or inside:
                where = "inside" if inside and not target.exists() else "over"
                raise ItmrtError(f"{flag} {out} would write {where} the {role} {given} this command reads, "
                                 "--overwrite or not; choose a path outside it")


def check_outputs(outputs: dict[str, Path | None], overwrite: bool, inputs: dict[str, Path | None]) -> None:
    """The checks every command runs on its output files before any work: apart from the command's inputs
    whatever ``overwrite`` says (first: "pass --overwrite" would be wrong advice there), distinct, and new (or
    ``overwrite``)."""
    check_outputs_apart(outputs, inputs)
    check_outputs_distinct(outputs)
    check_new_files(list(outputs.values()), overwrite)


def check_outputs_distinct(outputs: dict[str, Path | None]) -> None:
    """Refuse two output flags that name one file (symlinks followed): the second would replace the first."""
    seen: dict[Path, str] = {}
    for flag, out in outputs.items():
        if out is None:
            continue
        target = out.resolve()
        if target in seen:
            raise ItmrtError(f"{seen[target]} and {flag} name the same file {out}; give each its own path")
        seen[target] = flag


def _closed_world(role: str) -> bool:
    """An input bundle or gallery: nothing may be written anywhere inside its folder."""
    return "bundle" in role or "gallery" in role


def check_report_folder(folder: Path, overwrite: bool, inputs: dict[str, Path | None] | None = None) -> None:
    """A report folder must be new, or hold no report yet, unless ``overwrite``; and it may not be an input of
    the command, nor lie inside an input bundle or gallery (their folders are closed worlds)."""
    for role, given in (inputs or {}).items():
        if given is None or not given.exists():
            continue
        target, source = folder.resolve(), given.resolve()
        if target == source or (_closed_world(role) and source in target.parents):
            raise ItmrtError(f"--report {folder} would write into the {role} {given} this command reads; "
                             "choose a folder outside it")
    if folder.exists() and not folder.is_dir():
        raise ItmrtError(f"--report {folder} is a file; give a folder for the report")
    if (folder / "report.json").exists() and not overwrite:
        raise ItmrtError(
            f"{folder} already holds a report; pass --overwrite to replace it or choose another --report folder"
        )
