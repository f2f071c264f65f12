"""Variant names (``backend:precision``, e.g. ``ort:fp16``) and opening them, or saying why not.

A variant the bundle or the machine cannot run is never an error: it comes
back as a reason ("TensorRT is not installed", "the bundle has no int8
graphs...") that the report prints, and the other variants go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itmrt.bundle.names import BACKENDS, PRECISIONS, BackendName
from itmrt.errors import ItmrtError, first_line
from itmrt.optional import available

DEFAULT_PARITY_VARIANTS = "ort:fp32,ort:fp16,ort:int8,trt:fp16"
DEFAULT_BENCH_VARIANTS = "ort:fp32,ort:fp16,ort:int8"


@dataclass(frozen=True)
class Variant:
    backend: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.precision}"

    @property
    def file_stem(self) -> str:
        """``ort-fp16``: safe in file names."""
        return f"{self.backend}-{self.precision}"


def parse_variant(text: str) -> Variant:
    backend, sep, precision = text.strip().lower().partition(":")
    if not sep or backend not in BACKENDS or precision not in PRECISIONS:
        raise ItmrtError(
            f"unknown variant {text.strip()!r}; write backend:precision with backend in {'/'.join(BACKENDS)} "
            f"and precision in {'/'.join(PRECISIONS)} (e.g. ort:fp16)"
        )
    return Variant(backend, precision)


def parse_variants(text: str) -> list[Variant]:
    """``"ort:fp32,ort:fp16"`` -> variants, in order, each once."""
    variants: list[Variant] = []
    for part in text.split(","):
        if part.strip():
            variant = parse_variant(part)
            if variant not in variants:
                variants.append(variant)
    if not variants:
        raise ItmrtError("no variants given; pass e.g. --variants ort:fp32,ort:fp16")
    return variants


def tensorrt_missing() -> str | None:
    """Why native TensorRT cannot run here, or None when its Python module is importable."""
    if not available("tensorrt"):
        return "TensorRT is not installed on this machine (no `tensorrt` Python module)"
    return None


def open_variant(
    bundle: str | Path, variant: Variant, threads: int = 0, scorer: str | None = None,
    providers: list[str] | None = None
) -> tuple[Any, str | None]:
    """``(runtime, None)``, or ``(None, reason)`` when this machine or bundle cannot run ``variant``.

    ``scorer``: the runtime's scorer choice ("auto", "graph", "fused"); None keeps the runtime's default.
    ``providers``: ONNX Runtime execution providers (None: the runtime's default, CUDA then CPU).
    """
    if variant.backend == BackendName.TRT:
        missing = tensorrt_missing()
        if missing:
            return None, missing
    from itmrt.runtime import load

    try:
        extra: dict[str, Any] = {"scorer": scorer} if scorer is not None else {}
        if providers is not None:
            extra["providers"] = providers
        return load(bundle, backend=variant.backend, precision=variant.precision, threads=threads, **extra), None
    except (ItmrtError, ImportError) as exc:
        return None, first_line(exc)


def graph_files(runtime: Any) -> dict[str, str]:
    """Which file each component of an opened runtime runs (a precision falls back to fp32 per component)."""
    bundle, precision = runtime.bundle, runtime.precision
    files = {}
    for name in runtime.backends:
        trt = runtime.backend_name == BackendName.TRT
        path = bundle.engine_file(name, precision) if trt else bundle.graph_file(name, precision)
        files[name] = path.relative_to(bundle.path).as_posix()
    files["rank"] = str(getattr(runtime, "scorer_kind", "graph"))  # which scorer Runtime.rank uses
    return files
