"""Jetson (L4T / JetPack) detection and the install problems particular to it.

JetPack ships TensorRT as system packages (``python3-libnvinfer``: TensorRT
10.3 on JetPack 6) for the system Python, and ONNX Runtime's CUDA and TensorRT
providers as Jetson-only ``onnxruntime-gpu`` wheels. So on a board itmrt runs
in a venv made with ``--system-site-packages`` (to see the system TensorRT),
without the ``[trt]`` extra's pip ``tensorrt``; and the base dependency
``onnxruntime`` (a CPU build from PyPI) must not be installed next to the
``onnxruntime-gpu`` wheel: both install the same ``onnxruntime`` package
folder, and whichever was installed last wins.

``/etc/nv_tegra_release`` names the L4T release, e.g.
``# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...``;
L4T R36 is JetPack 6, R35 JetPack 5, R32 JetPack 4.
"""

from __future__ import annotations

import glob
import importlib.metadata
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
JETPACK_OF_L4T = {"36": "6", "35": "5", "34": "5 (developer preview)", "32": "4"}
# Where JetPack's python3-libnvinfer puts the tensorrt package for the system Python.
SYSTEM_TENSORRT_GLOBS = ("/usr/lib/python3/dist-packages/tensorrt", "/usr/lib/python3.*/dist-packages/tensorrt")
UNIFIED_MEMORY_WORKSPACE_MB = 1024  # builder workspace default where GPU and CPU share the memory

_RELEASE = re.compile(r"#\s*R(?P<major>\d+)\s*\(release\),\s*REVISION:\s*(?P<revision>[\d.]+)")
_BOARD = re.compile(r"BOARD:\s*(?P<board>[^,]+)")


@dataclass(frozen=True)
class JetsonInfo:
    """What the board says about itself."""

    l4t: str  # "36.4.3"
    jetpack: str | None  # "6"
    board: str | None  # nv_tegra_release's BOARD field
    model: str | None  # the device tree's model, e.g. "NVIDIA Jetson AGX Orin Developer Kit"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_tegra_release(text: str, model: str | None = None) -> JetsonInfo | None:
    """``/etc/nv_tegra_release`` text -> the L4T release (None when the text is not one)."""
    found = _RELEASE.search(text)
    if found is None:
        return None
    major = found.group("major")
    board = _BOARD.search(text)
    return JetsonInfo(
        f"{major}.{found.group('revision')}",
        JETPACK_OF_L4T.get(major),
        board.group("board").strip() if board else None,
        model,
    )


def detect_jetson(release: Path = TEGRA_RELEASE, model_file: Path = DEVICE_TREE_MODEL) -> JetsonInfo | None:
    """This machine's L4T release, or None when it is not a Jetson."""
    try:
        text = release.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    try:
        model: str | None = model_file.read_bytes().rstrip(b"\0").decode("utf-8", "replace").strip() or None
    except OSError:
        model = None
    return parse_tegra_release(text, model)


def system_tensorrt_paths(patterns: tuple[str, ...] = SYSTEM_TENSORRT_GLOBS) -> list[str]:
    """Folders of a system-wide ``tensorrt`` Python package (JetPack's python3-libnvinfer)."""
    return sorted({path for pattern in patterns for path in glob.glob(pattern) if Path(path, "__init__.py").is_file()})


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def onnxruntime_distributions() -> dict[str, str]:
    """Installed distributions that provide the ``onnxruntime`` module, with their versions."""
    names = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")
    return {name: version for name in names if (version := distribution_version(name)) is not None}


def jetson_notes(
    jetson: JetsonInfo | None,
    tensorrt_version: str | None,
    ort_providers: list[str],
    ort_distributions: dict[str, str],
    system_tensorrt: list[str],
) -> list[str]:
    """Install problems on a Jetson (or anywhere a CPU onnxruntime shadows a GPU one)."""
    notes = []
    if "onnxruntime" in ort_distributions and len(ort_distributions) > 1:
        others = ", ".join(f"{name} {version}" for name, version in ort_distributions.items() if name != "onnxruntime")
        notes.append(
            f"both onnxruntime {ort_distributions['onnxruntime']} (CPU) and {others} are installed; they share one "
            "package folder, so the one installed last wins: pip uninstall onnxruntime, then reinstall the GPU wheel"
        )
    if jetson is None:
        return notes
    if tensorrt_version is None and system_tensorrt:
        notes.append(
            f"JetPack's TensorRT is installed for the system Python ({system_tensorrt[0]}) but this Python "
            f"({sys.prefix}) cannot import it: make the venv with `python3 -m venv --system-site-packages`"
        )
    elif tensorrt_version is None:
        notes.append("no TensorRT found: install JetPack's python3-libnvinfer (apt), not the pip tensorrt package")
    if "CUDAExecutionProvider" not in ort_providers:
        notes.append(
            "onnxruntime has no CUDA provider here: install the Jetson onnxruntime-gpu wheel for this JetPack "
            "(the PyPI onnxruntime is CPU-only)"
        )
    notes.append(
        f"unified memory: `itmrt build` caps TensorRT's workspace at {UNIFIED_MEMORY_WORKSPACE_MB} MB "
        "unless --workspace says otherwise"
    )
    return notes
