"""``itmrt doctor``: what this machine can run - ONNX Runtime providers, TensorRT, pycuda, GPU, CPU features.

Every probe is optional and never raises: a missing library or tool is
reported as absent. Nothing here imports torch.
"""

from __future__ import annotations

import importlib
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from itmrt.optional import available, require

CPU_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512F",
    "avx512_vnni": "AVX-512 VNNI (fast INT8 in ONNX Runtime)",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_int8": "AMX INT8",
    "amx_bf16": "AMX BF16",
    "f16c": "F16C (FP16 conversion)",
}


def tensorrt_module() -> ModuleType | None:
    """The ``tensorrt`` module, or ``None`` when it is absent (type stubs alone are not TensorRT)."""
    return require("tensorrt") if available("tensorrt") else None


def _version_of(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install is reported as absent
        return None
    return str(getattr(module, "__version__", getattr(module, "VERSION_TEXT", "unknown")))


@dataclass
class GpuInfo:
    name: str
    compute_capability: str
    memory_mb: int | None = None
    driver: str | None = None


def _gpus_from_pycuda() -> list[GpuInfo]:
    try:
        driver = importlib.import_module("pycuda.driver")
        driver.init()
        result = []
        for index in range(driver.Device.count()):
            device = driver.Device(index)
            major, minor = device.compute_capability()
            result.append(GpuInfo(str(device.name()), f"{major}.{minor}", int(device.total_memory()) >> 20))
        return result
    except Exception:  # noqa: BLE001
        return []


def _gpus_from_nvidia_smi() -> list[GpuInfo]:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        output = subprocess.run(
            [tool, "--query-gpu=name,compute_cap,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in output.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) >= 2:
            memory = int(float(parts[2])) if len(parts) > 2 and parts[2].replace(".", "").isdigit() else None
            gpus.append(GpuInfo(parts[0], parts[1], memory, parts[3] if len(parts) > 3 else None))
    return gpus


def gpus() -> list[GpuInfo]:
    """GPUs seen by pycuda, else by ``nvidia-smi`` (empty when neither finds one)."""
    return _gpus_from_pycuda() or _gpus_from_nvidia_smi()


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class DoctorReport:
    onnxruntime: str | None
    ort_providers: list[str]
    tensorrt: str | None
    pycuda: str | None
    gpus: list[GpuInfo]
    cpu: str
    cpu_features: dict[str, bool]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "onnxruntime": self.onnxruntime,
            "ort_providers": self.ort_providers,
            "tensorrt": self.tensorrt,
            "pycuda": self.pycuda,
            "gpus": [gpu.__dict__ for gpu in self.gpus],
            "cpu": self.cpu,
            "cpu_features": self.cpu_features,
            "notes": self.notes,
        }


def diagnose() -> DoctorReport:
    ort_version = _version_of("onnxruntime")
    providers: list[str] = []
    if ort_version is not None:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    trt = tensorrt_module()
    flags = cpu_flags()
    features = {label: flag in flags for flag, label in CPU_FLAGS.items()}
    found_gpus = gpus()
    notes = []
    if trt is None:
        notes.append("TensorRT is not installed: `itmrt build` makes and verifies the ONNX precision graphs but no engine")
    if not found_gpus:
        notes.append("no NVIDIA GPU found: ONNX Runtime on the CPU is the backend here")
    if flags and "avx512_vnni" not in flags and "avx_vnni" not in flags:
        notes.append("no VNNI: INT8 graphs will not be much faster than FP32 in ONNX Runtime on this CPU")
    return DoctorReport(
        ort_version, providers, None if trt is None else str(trt.__version__), _version_of("pycuda"),
        found_gpus, cpu_model(), features, notes,
    )


def format_report(report: DoctorReport) -> str:
    lines = [
        f"onnxruntime: {report.onnxruntime or 'not installed'}",
        f"  providers: {', '.join(report.ort_providers) or 'none'}",
        f"tensorrt:    {report.tensorrt or 'not installed'}",
        f"pycuda:      {report.pycuda or 'not installed'}",
    ]
    if report.gpus:
        for gpu in report.gpus:
            memory = f", {gpu.memory_mb} MiB" if gpu.memory_mb else ""
            lines.append(f"gpu:         {gpu.name} (compute capability {gpu.compute_capability}{memory})")
    else:
        lines.append("gpu:         none found")
    lines.append(f"cpu:         {report.cpu}")
    for label, present in report.cpu_features.items():
        lines.append(f"  {'yes' if present else 'no '} {label}")
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)
