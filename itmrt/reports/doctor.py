"""``itmrt doctor``: what this machine can run - ONNX Runtime providers, TensorRT, pycuda, the GPU the
runtime uses, Jetson/JetPack, CPU features - and, given a bundle, whether its engines can run here.

Every probe is optional and never raises: a missing library or tool is
reported as absent. Nothing here imports torch.
"""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itmrt.engine.tensorrt_api import tensorrt_module
from itmrt.machine.gpus import GpuInfo, gpus, visibility_notes
from itmrt.machine.jetson import (
    JetsonInfo,
    detect_jetson,
    jetson_notes,
    onnxruntime_distributions,
    system_tensorrt_paths,
)

__all__ = ["DoctorReport", "cpu_flags", "cpu_model", "diagnose", "format_report", "gpus", "tensorrt_module"]

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


def _version_of(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install is reported as absent
        return None
    return str(getattr(module, "__version__", getattr(module, "VERSION_TEXT", "unknown")))


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:  # x86 "flags", Arm (Jetson) "Features"
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
    device: int = 0  # the CUDA device the runtime and the builder use
    ort_distributions: dict[str, str] = field(default_factory=dict)
    jetson: JetsonInfo | None = None
    system_tensorrt: list[str] = field(default_factory=list)
    engines: list[dict[str, Any]] | None = None  # a bundle's engines, when one was given

    @property
    def runtime_gpu(self) -> GpuInfo | None:
        return self.gpus[self.device] if 0 <= self.device < len(self.gpus) else None

    def as_dict(self) -> dict[str, Any]:
        gpu = self.runtime_gpu
        return {
            "onnxruntime": self.onnxruntime,
            "onnxruntime_distributions": self.ort_distributions,
            "ort_providers": self.ort_providers,
            "tensorrt": self.tensorrt,
            "system_tensorrt": self.system_tensorrt,
            "pycuda": self.pycuda,
            "gpus": [g.as_dict() for g in self.gpus],
            "device": self.device,
            "runtime_gpu": None if gpu is None else gpu.as_dict(),
            "jetson": None if self.jetson is None else self.jetson.as_dict(),
            "cpu": self.cpu,
            "cpu_features": self.cpu_features,
            "engines": self.engines,
            "notes": self.notes,
        }


def _onnxruntime() -> tuple[str | None, list[str]]:
    version = _version_of("onnxruntime")
    if version is None:
        return None, []
    import onnxruntime

    return version, list(onnxruntime.get_available_providers())


def _machine_notes(report: DoctorReport, flags: set[str]) -> list[str]:
    notes = []
    if report.tensorrt is None:
        notes.append(
            "TensorRT is not installed: `itmrt build` makes and verifies the ONNX precision graphs but no engine"
        )
    if not report.gpus:
        notes.append("no NVIDIA GPU found: ONNX Runtime on the CPU is the backend here")
    elif report.runtime_gpu is None:
        notes.append(f"CUDA device {report.device} does not exist here ({len(report.gpus)} visible)")
    if report.gpus and "CUDAExecutionProvider" not in report.ort_providers and report.jetson is None:
        notes.append(
            "onnxruntime has no CUDA provider: pip install onnxruntime-gpu (and uninstall onnxruntime) "
            "for --backend ort on the GPU"
        )
    if (
        flags
        and {"avx2", "asimd"} & flags
        and "avx512_vnni" not in flags
        and "avx_vnni" not in flags
        and "asimddp" not in flags
    ):
        notes.append(
            "no VNNI / dot-product instructions: INT8 graphs will not be much faster than FP32 "
            "in ONNX Runtime on this CPU"
        )
    return notes


def diagnose(device: int = 0, bundle: str | Path | None = None) -> DoctorReport:
    """Probe this machine (and ``bundle``'s engines, when given); never raises for a missing piece."""
    ort_version, providers = _onnxruntime()
    trt = tensorrt_module()
    flags = cpu_flags()
    features = {label: flag in flags for flag, label in CPU_FLAGS.items()}
    report = DoctorReport(
        ort_version,
        providers,
        None if trt is None else str(trt.__version__),
        _version_of("pycuda"),
        gpus(),
        cpu_model(),
        features,
        device=device,
        ort_distributions=onnxruntime_distributions(),
        jetson=detect_jetson(),
        system_tensorrt=system_tensorrt_paths(),
    )
    report.notes = _machine_notes(report, flags) + visibility_notes(report.gpus)
    report.notes += jetson_notes(
        report.jetson, report.tensorrt, providers, report.ort_distributions, report.system_tensorrt
    )
    if bundle is not None:
        report.engines = bundle_engines(bundle, report)
    return report


def bundle_engines(bundle: str | Path, report: DoctorReport) -> list[dict[str, Any]]:
    """The bundle's engines, each checked against the running TensorRT and the runtime's GPU."""
    from itmrt.engine.compat import DeviceInfo, this_platform
    from itmrt.engine.inspect import inspect_bundle_engines

    gpu = report.runtime_gpu
    here = None
    if report.tensorrt is not None and gpu is not None:
        unified = True if gpu.integrated or report.jetson is not None else gpu.integrated
        here = DeviceInfo(report.tensorrt, gpu.name, gpu.compute_capability, *this_platform(), unified)
    return [status.as_dict() for status in inspect_bundle_engines(bundle, here)]


def _mb(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.1f} MB"


def _engine_lines(engines: list[dict[str, Any]]) -> list[str]:
    if not engines:
        return ["engines:     none in this bundle (itmrt build BUNDLE --precision P on the target GPU)"]
    lines = ["engines:"]
    for e in engines:
        extra = f", {e['travels']}" if e["travels"] else ""
        tf32 = "" if e["tf32"] is None else (", TF32 allowed" if e["tf32"] else ", TF32 off")
        lines.append(
            f"  {e['precision']} {e['graph']}: TensorRT {e['tensorrt_version']}, "
            f"{e['gpu_name']} ({e['compute_capability']}), device memory {_mb(e['device_memory_bytes'])}, "
            f"largest intermediate {_mb(e['largest_intermediate_bytes'])}"
            f"{tf32}{extra}"
        )
        lines.append(f"    {'usable here' if e['usable'] else 'not usable here: ' + e['problem']}")
    return lines


def format_report(report: DoctorReport) -> str:
    lines = [
        f"onnxruntime: {report.onnxruntime or 'not installed'}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in report.ort_distributions.items())})"
            if report.ort_distributions
            else ""
        ),
        f"  providers: {', '.join(report.ort_providers) or 'none'}",
        f"tensorrt:    {report.tensorrt or 'not installed'}",
        f"pycuda:      {report.pycuda or 'not installed'}",
    ]
    for gpu in report.gpus:
        memory = f", {gpu.memory_mb} MiB" if gpu.memory_mb else ""
        used = "  <- the runtime's device" if gpu.index == report.device else ""
        lines.append(
            f"gpu {gpu.index}:       {gpu.name} "
            f"(compute capability {gpu.compute_capability}{memory}; {gpu.source}){used}"
        )
    if not report.gpus:
        lines.append("gpu:         none found")
    if report.jetson is not None:
        j = report.jetson
        lines.append(f"jetson:      L4T {j.l4t} (JetPack {j.jetpack or '?'}), {j.model or j.board or 'unknown board'}")
    lines.append(f"cpu:         {report.cpu}")
    for label, present in report.cpu_features.items():
        lines.append(f"  {'yes' if present else 'no '} {label}")
    if report.engines is not None:
        lines.extend(_engine_lines(report.engines))
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)
