"""TensorRT's timing cache: one per TensorRT version and GPU, kept in the bundle, never silently ignored.

``IBuilderConfig::setTimingCache(cache, ignoreMismatch)`` "returns true if set
successfully, false otherwise": a cache serialised by another TensorRT version
or on a GPU with other CUDA device properties is refused when
``ignoreMismatch`` is false (TensorRT ``include/NvInfer.h``, 10.3 and 11.1), and
``createTimingCache`` "returns nullptr" for bytes it cannot deserialize - the
Python binding hands back ``None`` rather than raising
(``python/src/infer/pyCore.cpp``, ``create_timing_cache``). A refused or
unreadable cache is reported, recorded as such and replaced by a fresh one, so
the build goes on;
the file is named for the TensorRT version and the GPU, so caches of several
machines can live side by side in one bundle.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itmrt.bundle.names import TIMING_CACHE_DIR
from itmrt.errors import ItmrtError, first_line
from itmrt.publish import atomic_write_bytes

if TYPE_CHECKING:
    import tensorrt


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def timing_cache_file(tensorrt_version: str, gpu_name: str, compute_capability: str) -> str:
    """Bundle-relative cache file for one TensorRT version and GPU, e.g.
    ``engines/timing/trt-10.3.0.30-nvidia-jetson-agx-orin-sm87.cache``."""
    version = re.sub(r"[^0-9A-Za-z.]+", "-", tensorrt_version.strip()) or "unknown"
    return f"{TIMING_CACHE_DIR}/trt-{version}-{_slug(gpu_name)}-sm{compute_capability.replace('.', '')}.cache"


@dataclass
class AttachedCache:
    """The cache the builder uses and what became of the file's contents."""

    cache: Any
    status: str  # "new", "reused N bytes", or why the file was not used (then the cache is a fresh one)


def cache_status(previous: int, created: bool, attached: bool, error: str | None = None) -> tuple[bool, str]:
    """Whether the cache made from the file's ``previous`` bytes is used, and what the manifest records.

    ``created``: ``create_timing_cache`` returned a cache (the binding returns ``None``, not an exception,
    when TensorRT cannot deserialize the bytes: ``IBuilderConfig::createTimingCache`` returns nullptr);
    ``attached``: ``set_timing_cache`` returned true; ``error``: the call raised instead.
    """
    if error is not None:
        return False, f"unreadable ({error})"
    if not created:
        return False, "not deserialized by TensorRT (damaged or from another version); a fresh cache"
    if not attached:
        return False, "refused by TensorRT (made by another TensorRT version or GPU); a fresh cache"
    return True, f"reused {previous} bytes" if previous else "new"


def attach_timing_cache(
    config: tensorrt.IBuilderConfig, path: Path | None, say: Callable[[str], None]
) -> AttachedCache:
    """Give ``config`` the cache in ``path`` (if any); a cache TensorRT cannot read or refuses is replaced by a
    fresh one, and the status says so (never "reused" for a fresh cache)."""
    previous = b""
    if path is not None and path.is_file():
        previous = path.read_bytes()
    cache, error = None, None
    try:
        cache = config.create_timing_cache(previous)
    except Exception as exc:  # noqa: BLE001 - some bindings raise on a damaged file
        error = first_line(exc)
    attached = cache is not None and bool(config.set_timing_cache(cache, False))
    used, status = cache_status(len(previous), cache is not None, attached, error)
    if used:
        return AttachedCache(cache, status)
    say(f"timing cache {path}: {status}")
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, False):
        raise ItmrtError("TensorRT refused a new, empty timing cache; see TensorRT's messages above")
    return AttachedCache(fresh, status)


def save_timing_cache(config: tensorrt.IBuilderConfig, path: Path) -> int:
    """Write the builder's cache (what it had plus this build's timings) to ``path``; returns its size."""
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    atomic_write_bytes(path, data)
    return len(data)
