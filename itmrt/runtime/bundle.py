"""Reading a bundle for inference: manifest, vocabulary, and which graph file serves a precision.

Deliberately independent of :mod:`itmrt.export` (which imports onnx and torch):
the runtime reads ``manifest.json`` as plain JSON and imports numpy only.

Precision variants are found through the manifest entries the precision stage
writes (see :mod:`itmrt.calibration.records`): the ``fp32`` graph of a component
is the file its ``graphs`` entry names; an ``fp16`` / ``int8`` variant is
``manifest["precisions"][p]["graphs"][component]["file"]``, and a TensorRT engine
``manifest["engines"][p][component]["file"]``. A component without a variant of
the requested precision runs its fp32 graph (e.g. a text encoder left in fp32 by
the INT8 pass); a precision no component has is an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itmrt.errors import ItmrtError
from itmrt.io import read_json_document, sha256_file

MANIFEST_NAME = "manifest.json"
BUNDLE_KIND = "itmrt-bundle"
SCHEMA_VERSION = 1
COMPONENTS = ("image_encoder", "text_encoder", "scorer")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class BundleInfo:
    """A bundle folder and its parsed manifest."""

    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    _verified: set[str] = field(default_factory=set)

    @property
    def family(self) -> str:
        return str(self.manifest["family"])

    @property
    def cross_attention(self) -> bool:
        """NAAF / SCAN (token and region embeddings, a cross-attention scorer) vs CMPM (global embeddings)."""
        return self.family != "cmpm"

    def graph_inputs(self, component: str) -> list[dict[str, Any]]:
        return list(self.manifest["graphs"][component].get("inputs", []))

    def shape_range(self, axis: str) -> dict[str, int] | None:
        """The ``{"min", "opt", "max"}`` the bundle declares for a symbolic axis, if any."""
        for entry in self.manifest["graphs"].values():
            ranges = entry.get("shape_ranges", {})
            if axis in ranges:
                return dict(ranges[axis])
        return None

    def precisions(self) -> list[str]:
        """Precisions for which at least one component has a graph in this bundle."""
        made = self.manifest.get("precisions") or {}
        return [p for p in PRECISIONS if p == "fp32" or (made.get(p) or {}).get("graphs")]

    def _variant_entry(self, section: str, component: str, precision: str) -> dict[str, Any] | None:
        entry = ((self.manifest.get(section) or {}).get(precision) or {})
        if section == "precisions":
            entry = entry.get("graphs") or {}
        found = entry.get(component)
        return found if isinstance(found, dict) and "file" in found else None

    def graph_file(self, component: str, precision: str = "fp32") -> Path:
        """The ONNX file that runs ``component`` at ``precision`` (fp32 where no variant exists)."""
        self._check_precision(precision, ".onnx", "itmrt build BUNDLE --precision " + precision)
        if precision != "fp32":
            entry = self._variant_entry("precisions", component, precision)
            if entry is not None:
                return self._checked(str(entry["file"]))
        return self._checked(self.manifest["graphs"][component]["file"])

    def engine_file(self, component: str, precision: str = "fp32") -> Path:
        """The TensorRT engine of ``component`` at ``precision``; an error when it was not built."""
        entry = self._variant_entry("engines", component, precision)
        if entry is None:
            raise ItmrtError(
                f"bundle {self.path} has no TensorRT {precision} engine for {component}; "
                f"run `itmrt build {self.path} --precision {precision}` on this machine first"
            )
        return self._checked(str(entry["file"]))

    def engine_record(self, component: str, precision: str) -> dict[str, Any]:
        """What the engine stage recorded about an engine (TensorRT version, GPU, profile)."""
        return self._variant_entry("engines", component, precision) or {}

    def _check_precision(self, precision: str, suffix: str, how: str) -> None:
        if precision not in PRECISIONS:
            raise ItmrtError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and precision not in self.precisions():
            raise ItmrtError(
                f"precision {precision} is not in bundle {self.path} (it has {', '.join(self.precisions())}); "
                f"make it first ({how}), or use --precision fp32"
            )

    def _checked(self, name: str) -> Path:
        """The path of a manifest-listed file, verified against its sha256 once per process."""
        path = self.path / name
        if name in self._verified:
            return path
        expected = self.manifest["files"].get(name)
        if not path.is_file():
            raise ItmrtError(f"bundle {self.path} lacks {name}, which its manifest lists; export the bundle again")
        if expected is not None and sha256_file(path) != expected:
            raise ItmrtError(
                f"{path} does not match the sha256 in the bundle manifest (truncated or changed after export); "
                "export the bundle again"
            )
        self._verified.add(name)
        return path

    def vocab_file(self) -> Path:
        entry = self.manifest.get("vocab") or {}
        return self._checked(str(entry.get("file", "vocab.json")))


def read_bundle(folder: str | Path) -> BundleInfo:
    """Open a bundle folder's manifest; every failure is a one-line :class:`ItmrtError`."""
    bundle = Path(folder)
    if not bundle.is_dir():
        raise ItmrtError(f"no bundle folder at {bundle}; run `itmrt export` first")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise ItmrtError(f"{bundle} has no {MANIFEST_NAME}: it is not a complete itmrt bundle; export it again")
    data, raw = read_json_document(path, (BUNDLE_KIND,), SCHEMA_VERSION, "bundle manifest", "export the bundle again")
    for key in ("family", "graphs", "files", "dims"):
        if key not in data:
            raise ItmrtError(f"{path} lacks '{key}'; export the bundle again")
    missing = [c for c in COMPONENTS if c not in data["graphs"]]
    if missing:
        raise ItmrtError(f"{path} lists no graph for {', '.join(missing)}; export the bundle again")
    return BundleInfo(bundle, data, hashlib.sha256(raw).hexdigest())


def is_bundle(folder: str | Path) -> bool:
    """Whether ``folder`` holds an itmrt bundle manifest (not whether it verifies)."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("kind") == BUNDLE_KIND
