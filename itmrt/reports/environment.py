"""The machine a report was measured on: CPU and its features, GPU and driver, versions, threads, OS.

Everything is read without importing torch or TensorRT (versions come from
package metadata), and every probe tolerates absence: a field it cannot read is
``None``, never an exception.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from itmrt import __version__

LIBRARIES = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "matplotlib", "jsonschema")
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, set()
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def cpu_info() -> dict[str, Any]:
    model, flags = _cpuinfo()
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "model": model or platform.processor() or None,
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "features": {name: name in flags for name in CPU_FEATURES},
    }


def gpu_info(timeout: float = 10.0) -> list[dict[str, Any]]:
    """GPUs as ``nvidia-smi`` lists them (name, driver, memory); empty where there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = "name,driver_version,memory.total,compute_cap"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in done.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0]:
            gpus.append({
                "name": parts[0], "driver": parts[1],
                "memory_mib": int(parts[2]) if parts[2].isdigit() else None,
                "compute_capability": parts[3] if len(parts) > 3 else None,
            })
    return gpus


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "itmrt": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return []


def environment(threads: int = 0) -> dict[str, Any]:
    """Everything above, plus thread settings (``threads``: the ONNX Runtime intra-op setting, 0 = automatic)."""
    return {
        "os": f"{platform.system()} {platform.release()}",
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "cpu": cpu_info(),
        "gpus": gpu_info(),
        "versions": library_versions(),
        "onnxruntime_providers": onnxruntime_providers(),
        "threads": {
            "onnxruntime_intra_op": threads,
            **{name: os.environ.get(name) for name in THREAD_VARIABLES},
        },
    }
