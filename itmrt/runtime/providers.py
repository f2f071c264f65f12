"""ONNX Runtime execution providers: which ones, in what order, with which options.

Default order: CUDA, then CPU (those this onnxruntime build has). ONNX
Runtime's TensorRT provider is opt-in (``providers=["tensorrt", "cuda",
"cpu"]``, ``--providers tensorrt,cuda,cpu``): tried by default it would build
TensorRT engines inside every session, rebuild them whenever an input shape
leaves the range seen so far, and, where TensorRT's libraries are missing,
print its fallback error (on stdout, which corrupts ``--json`` output). When
asked for, it gets (ONNX Runtime's TensorRT provider documentation and
``tensorrt_execution_provider_info.cc``):

- ``trt_profile_min_shapes`` / ``trt_profile_opt_shapes`` /
  ``trt_profile_max_shapes`` from the manifest's shape ranges
  (``name:AxBxC,name:...``; every dynamic input must be given all three), so
  one engine covers every shape the bundle promises;
- an engine cache and a timing cache in the user's cache folder, one per
  bundle (by its manifest's sha256) and precision (:func:`default_trt_cache_dir`):
  TensorRT deserializes what it finds there, so it is never a folder a bundle
  brings along (``trt_timing_cache_path`` exists from ONNX Runtime 1.17, older
  versions keep the timing cache beside the engines);
- ``device_id``.

The fp16 and int8 graphs carry their precision in their types (float16
tensors, Q/DQ pairs) and must be compiled as *strongly typed* networks. ONNX
Runtime's TensorRT provider builds weakly typed networks before 1.22 when its
fp16 or int8 flags are on, and ignores what the graph declares then; from
1.22 it passes a graph's own types through with those flags off (its provider
code, ``tensorrt_execution_provider.cc``, as read for this check; never run
here: this machine has no TensorRT). So itmrt never turns those flags
on, and refuses the TensorRT provider for a precision graph on an older ONNX
Runtime (:func:`tensorrt_typing_problem`): the CUDA provider or the native
TensorRT backend run it as built.

The CUDA provider gets ``device_id`` and, when set, ``gpu_mem_limit`` (bytes)
- the arena's cap, for GPUs shared with other work or boards whose memory is
the system's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itmrt.bundle.manifest import GraphEntry
from itmrt.errors import ItmrtError
from itmrt.runtime.sessions import CPU_PROVIDER

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = CPU_PROVIDER
PROVIDER_ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}
DEFAULT_PROVIDER_ORDER = (CUDA, CPU)
TIMING_CACHE_PATH_SINCE = (1, 17)  # onnxruntime version that added trt_timing_cache_path
STRONGLY_TYPED_SINCE = (1, 22)  # onnxruntime version whose TensorRT provider keeps a graph's own types


@dataclass
class SessionSettings:
    """ONNX Runtime session knobs the runtime exposes."""

    providers: Sequence[str] | None = None  # None: CUDA then CPU, those available (TensorRT only when named)
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    optimization: str = "all"  # disable | basic | extended | all
    device: int = 0  # CUDA device for the CUDA and TensorRT providers (and the native TensorRT backend)
    gpu_mem_limit_mb: int | None = None  # the CUDA provider's memory arena cap
    trt_cache_dir: Path | None = None  # the TensorRT provider's caches (default: default_trt_cache_dir)


def resolve_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Execution providers to use: the user's (by full name or short alias) or the default order."""
    if not requested:
        return [p for p in DEFAULT_PROVIDER_ORDER if p in available] or [CPU]
    chosen = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if full not in available:
            raise ItmrtError(
                f"execution provider {name!r} is not available in this onnxruntime "
                f"(available: {', '.join(available)}); install the matching onnxruntime build or name another"
            )
        if full not in chosen:
            chosen.append(full)
    return chosen


def profile_option(shapes: dict[str, tuple[list[int], list[int], list[int]]], which: int) -> str:
    """``name:AxBxC,...`` for ``which`` = 0 (min), 1 (opt) or 2 (max)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in bounds[which])}" for name, bounds in shapes.items())


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def graph_precision(path: Path) -> str:
    """``fp16`` / ``int8`` for a bundle's precision graph (``precision/<p>/<graph>.onnx``), else ``fp32``."""
    from itmrt.bundle.names import PRECISION_DIR

    parent = path.parent
    return parent.name if parent.parent.name == PRECISION_DIR and parent.name in ("fp16", "int8") else "fp32"


def tensorrt_typing_problem(ort_version: str, precision: str) -> str | None:
    """Why ONNX Runtime's TensorRT provider cannot run a ``precision`` graph as built (None when it can)."""
    if precision == "fp32" or _version(ort_version) >= STRONGLY_TYPED_SINCE:
        return None
    since = ".".join(str(part) for part in STRONGLY_TYPED_SINCE)
    return (
        f"ONNX Runtime {ort_version}'s TensorRT provider builds weakly typed networks for {precision} graphs (its "
        f"graph's float16 / Q/DQ types are not kept before {since}); use the CUDA provider, --backend trt, or "
        f"onnxruntime-gpu {since}+"
    )


def tensorrt_options(
    graph_entry: GraphEntry | None, cache_dir: Path, device: int, ort_version: str
) -> dict[str, Any]:
    """Options of ONNX Runtime's TensorRT provider for one graph of the bundle (its fp16/int8 flags stay off:
    the graph's own types decide, see the module's note)."""
    from itmrt.engine.profiles import profile_shapes

    options: dict[str, Any] = {
        "device_id": device,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_fp16_enable": False,
        "trt_int8_enable": False,
    }
    if _version(ort_version) >= TIMING_CACHE_PATH_SINCE:
        options["trt_timing_cache_path"] = str(cache_dir)
    if graph_entry is not None and graph_entry.shape_ranges:
        shapes = profile_shapes(graph_entry, {})
        for index, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            options[key] = profile_option(shapes, index)
    return options


def cuda_options(device: int, gpu_mem_limit_mb: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {"device_id": device}
    if gpu_mem_limit_mb is not None:
        if gpu_mem_limit_mb < 1:
            raise ItmrtError(f"the CUDA memory limit must be at least 1 MB, not {gpu_mem_limit_mb}")
        options["gpu_mem_limit"] = int(gpu_mem_limit_mb) << 20
    return options


def provider_options(
    providers: Sequence[str],
    settings: SessionSettings,
    graph_entry: GraphEntry | None,
    cache_dir: Path | None,
    ort_version: str,
) -> list[dict[str, Any]]:
    """One options dict per provider of ``providers`` (empty for those that need none)."""
    result: list[dict[str, Any]] = []
    for provider in providers:
        if provider == TENSORRT:
            folder = settings.trt_cache_dir or cache_dir
            if folder is None:
                raise ItmrtError("ONNX Runtime's TensorRT provider needs a cache folder; pass trt_cache_dir")
            result.append(tensorrt_options(graph_entry, folder, settings.device, ort_version))
        elif provider == CUDA:
            result.append(cuda_options(settings.device, settings.gpu_mem_limit_mb))
        else:
            result.append({})
    return result


def default_trt_cache_dir(manifest_sha256: str, precision: str) -> Path:
    """The TensorRT provider's cache folder for one bundle and precision, in the user's cache."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "itmrt" / "ort-tensorrt" / manifest_sha256[:16] / precision


def prepare_cache_dir(folder: Path) -> Path:
    """Create the TensorRT provider's cache folder, or say why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ItmrtError(
            f"cannot create the TensorRT provider's cache folder {folder} ({exc.strerror}); "
            "make it writable or pass another cache folder"
        ) from None
    return folder
