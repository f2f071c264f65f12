"""The report format: ``report.json``'s versioned JSON schema, validation, the common header, writing.

The schema file (``report.schema.json``, shipped next to this module) is the
documentation of the format; ``schema_version`` changes only when a field
changes meaning or disappears (new optional fields keep the version).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from itmrt import __version__
from itmrt.documents import read_json_document
from itmrt.errors import ItmrtError
from itmrt.optional import available, require
from itmrt.publish import atomic_write_text

SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")
REPORT_KINDS = ("parity", "bench")


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    return dict(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))


def schema_problems(report: dict[str, Any]) -> list[str]:
    """Every way ``report`` departs from the schema (one line each); empty when it validates (needs jsonschema)."""
    jsonschema = require("jsonschema")

    validator = jsonschema.Draft202012Validator(load_schema())
    problems = []
    for error in sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        problems.append(f"{where}: {error.message}")
    return problems


def validate_report(report: dict[str, Any], source: str = "report") -> None:
    """Raise :class:`ItmrtError` naming the first problem when ``report`` does not fit the schema."""
    problems = schema_problems(report)
    if problems:
        raise ItmrtError(f"{source} does not fit the itmrt report schema v{SCHEMA_VERSION}: {problems[0]}")


def header(kind: str, bundle: Any, command: list[str] | None = None) -> dict[str, Any]:
    """Fields every report starts with; ``bundle`` is a :class:`itmrt.bundle.folder.BundleInfo`."""
    source = bundle.manifest.source_checkpoint
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "itmrt_version": __version__,
        "command": " ".join(command if command is not None else sys.argv),
        "bundle": {
            "path": str(bundle.path),
            "family": bundle.family,
            "manifest_sha256": bundle.manifest_sha256,
            "source_checkpoint": source.to_json() if source is not None else None,
            "precisions": bundle.precisions(),
        },
    }


def read_report(path: str | Path) -> dict[str, Any]:
    """A ``report.json`` (or a folder holding one), checked against the schema."""
    file = Path(path)
    if file.is_dir():
        file = file / "report.json"
    if not file.is_file():
        raise ItmrtError(f"no report at {file}; pass a report.json written by `itmrt parity` or `itmrt bench`")
    data, _raw = read_json_document(file, REPORT_KINDS, SCHEMA_VERSION, "report (kind 'parity' or 'bench')",
                                    "write the report again")
    validate_report(data, str(file))
    return data


def write_json(path: Path, report: dict[str, Any]) -> Path:
    """Validate (where jsonschema is installed: itmrt[reports]; the base install writes the report unchecked),
    then write atomically (strict JSON: no NaN or infinity)."""
    if available("jsonschema"):
        validate_report(report)
    return atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
