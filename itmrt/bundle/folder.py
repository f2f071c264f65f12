"""A bundle folder opened for use: its manifest, which file serves a component at a precision, integrity.

Precision variants are found through the manifest entries the precision stage
writes (:class:`itmrt.bundle.manifest.PrecisionGraphs`): the ``fp32`` graph of
a component is the file its ``graphs`` entry names; an ``fp16`` / ``int8``
variant the file its precision entry names, and a TensorRT engine the file its
``engines`` entry names. A component without a variant of the requested
precision runs its fp32 graph (e.g. a text encoder left in fp32 by the INT8
pass); a precision no component has is an error.

The folder is a closed world (:mod:`itmrt.bundle.closed`): when it is opened,
every file an entry names must be listed in ``files`` with the entry's sha256
and lead nowhere outside the folder; every file is checked against that
sha256 before it is used (once per process), a graph's external data with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from itmrt.bundle.closed import check_graph_file, member, verified_member
from itmrt.bundle.manifest import AxisRange, EngineEntry, Manifest, TensorSpec, load_manifest_file
from itmrt.bundle.names import BUNDLE_KIND, COMPONENTS, MANIFEST_NAME, PRECISIONS, Precision
from itmrt.documents import as_path, sha256_bytes, sha256_file
from itmrt.errors import ItmrtError

REMEDY = "export the bundle again"


@dataclass
class BundleInfo:
    """A bundle folder and its parsed manifest."""

    path: Path
    manifest: Manifest
    manifest_sha256: str
    _verified: set[str] = field(default_factory=set)

    @property
    def family(self) -> str:
        return self.manifest.family

    def graph_inputs(self, component: str) -> list[TensorSpec]:
        return list(self.manifest.graph(component).inputs)

    def shape_range(self, axis: str) -> AxisRange | None:
        """The min/opt/max the bundle declares for a symbolic axis, if any."""
        return self.manifest.shape_range(axis)

    def precisions(self) -> list[str]:
        """Precisions for which at least one component has a graph in this bundle."""
        return self.manifest.precisions_made()

    def graph_file(self, component: str, precision: str = Precision.FP32) -> Path:
        """The ONNX file that runs ``component`` at ``precision`` (fp32 where no variant exists)."""
        self._check_precision(precision)
        variant = self.manifest.variant(precision, component) if precision != Precision.FP32 else None
        return self.file(variant.file if variant is not None else self.manifest.graph(component).file)

    def engine_file(self, component: str, precision: str = Precision.FP32) -> Path:
        """The TensorRT engine of ``component`` at ``precision``; an error when it was not built."""
        entry = self.manifest.engine(precision, component)
        if entry is None:
            raise ItmrtError(
                f"bundle {self.path} has no TensorRT {precision} engine for {component}; "
                f"run `itmrt build {self.path} --precision {precision}` on this machine first"
            )
        return self.file(entry.file)

    def engine_record(self, component: str, precision: str) -> EngineEntry | None:
        """What the engine stage recorded about an engine (TensorRT version, GPU, profile)."""
        return self.manifest.engine(precision, component)

    def _check_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise ItmrtError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision != Precision.FP32 and precision not in self.precisions():
            raise ItmrtError(
                f"precision {precision} is not in bundle {self.path} (it has {', '.join(self.precisions())}); "
                f"make it first (itmrt build BUNDLE --precision {precision}), or use --precision fp32"
            )

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists, verified: inside the folder, listed, its sha256 (once per
        process); for an ONNX graph, its external data too. A one-line :class:`ItmrtError` otherwise."""
        if name in self._verified:
            return self.path / name
        path = bundle_file(self.path, self.manifest, name)
        self._verified.add(name)
        return path

    def vocab_file(self) -> Path:
        return self.file(self.manifest.vocab.file)

    def export_graph(self, component: str) -> Path:
        """The verified fp32 graph export wrote for ``component``."""
        return self.file(self.manifest.graph(component).file)


def read_bundle(folder: str | Path) -> BundleInfo:
    """Open a bundle folder's manifest; every failure is a one-line :class:`ItmrtError`."""
    bundle = as_path(folder, "the bundle")
    if not bundle.is_dir():
        if bundle.exists():
            raise ItmrtError(f"{bundle} is not a folder; give the bundle folder that `itmrt export` wrote")
        raise ItmrtError(f"no bundle folder at {bundle}; run `itmrt export` first")
    path = member(bundle, MANIFEST_NAME, "bundle", REMEDY)
    if not path.is_file():
        _refuse_folder_without_manifest(bundle)
    manifest, raw = load_manifest_file(path)
    missing = [c for c in COMPONENTS if c not in manifest.graphs]
    if missing:
        raise ItmrtError(f"{path} lists no graph for {', '.join(missing)}; export the bundle again")
    check_file_list(bundle, manifest)
    return BundleInfo(bundle, manifest, sha256_bytes(raw))


def _refuse_folder_without_manifest(bundle: Path) -> NoReturn:
    """A folder with no manifest: a gallery given where a bundle goes is named so (not "export it again")."""
    import os

    from itmrt.bundle.gallery_manifest import GALLERY_MANIFEST

    if os.path.lexists(bundle / GALLERY_MANIFEST):
        raise ItmrtError(f"{bundle} is a gallery (written by `itmrt index`), not a bundle; give the bundle folder "
                         "that `itmrt export` wrote")
    raise ItmrtError(f"{bundle} has no {MANIFEST_NAME}: it is not a complete itmrt bundle; export it again")


def bundle_file(folder: str | Path, manifest: Manifest, name: str) -> Path:
    """A file of the bundle at ``folder`` (whose manifest is ``manifest``), verified like :meth:`BundleInfo.file`."""
    bundle = Path(folder)
    path = verified_member(bundle, name, manifest.files, "bundle", REMEDY)
    if name.endswith(".onnx"):
        check_graph_file(bundle, name, manifest.files, "bundle", REMEDY)
    return path


def check_file_list(bundle: Path, manifest: Manifest) -> None:
    """Every file an entry names is listed in ``files`` with the entry's sha256 (nothing is optional), and
    every listed name stays inside the folder; one line naming the key otherwise."""
    for key, name, sha256 in manifest.file_references():
        listed = manifest.files.get(name)
        if listed is None or (sha256 is not None and listed != sha256):
            how = "does not list it" if listed is None else "lists another sha256 for it"
            raise ItmrtError(f"{bundle / MANIFEST_NAME}: '{key}' names {name}, but 'files' {how}; {REMEDY}")
    for name in manifest.files:
        member(bundle, name, "bundle", REMEDY)


def is_bundle(folder: str | Path) -> bool:
    """Whether ``folder`` holds an itmrt bundle manifest (not whether it verifies)."""
    try:
        data = json.loads(member(Path(folder), MANIFEST_NAME, "bundle", REMEDY).read_text(encoding="utf-8"))
    except (ItmrtError, OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("kind") == BUNDLE_KIND


def verify_files(folder: str | Path, manifest: Manifest) -> list[str]:
    """Problems (one line each) with the files the manifest lists: missing, or sha256 not matching."""
    bundle = Path(folder)
    problems = []
    for name, expected in manifest.files.items():
        try:
            path = member(bundle, name, "bundle", REMEDY)
        except ItmrtError as exc:
            problems.append(f"file '{name}': {exc}")
            continue
        if not path.is_file():
            problems.append(f"file '{name}': missing")
        elif sha256_file(path) != expected:
            problems.append(f"file '{name}': sha256 differs from the manifest (the file was changed after export)")
        elif name.endswith(".onnx"):
            try:
                check_graph_file(bundle, name, manifest.files, "bundle", REMEDY, verify=False)
            except ItmrtError as exc:
                problems.append(f"file '{name}': {exc}")
    for graph_name, entry in manifest.graphs.items():
        if manifest.files.get(entry.file) != entry.sha256:
            problems.append(f"graph '{graph_name}': its sha256 disagrees with the manifest's file list")
    return problems


def verify_exported_files(folder: str | Path, manifest: Manifest) -> None:
    """Raise when an export file (a graph or the vocabulary) is missing or changed; variants are remade."""
    exported = {entry.file for entry in manifest.graphs.values()} | {manifest.vocab.file}
    problems = [p for p in verify_files(folder, manifest) if any(f"file '{name}'" in p for name in exported)]
    if problems:
        raise ItmrtError(f"bundle {folder}: {problems[0]}; export it again")
