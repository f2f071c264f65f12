"""The NVIDIA GPUs this process can use, in CUDA's order, with ``CUDA_VISIBLE_DEVICES`` honoured.

CUDA numbers the devices a process sees from 0 in the order of
``CUDA_VISIBLE_DEVICES`` (integer indices or ``GPU-`` UUID prefixes; an
invalid entry hides itself and everything after it; an empty value hides every
GPU). pycuda goes through the CUDA driver, so its device ``N`` is exactly the
device TensorRT and ONNX Runtime use as ``N``. ``nvidia-smi`` ignores the
variable and lists every GPU by its own index, so its rows are filtered and
reordered here by the same rules. Integer entries name nvidia-smi's order,
which is CUDA's only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA's default,
``FASTEST_FIRST``, may order unlike GPUs differently): :func:`visibility_notes`
says so where it matters.

Every probe is optional and never raises: a missing library or tool means "none found".
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as this process sees it; ``index`` is its CUDA device number here."""

    name: str
    compute_capability: str
    memory_mb: int | None = None
    driver: str | None = None
    uuid: str | None = None
    integrated: bool | None = None  # True: shares the system memory (Jetson)
    index: int = 0
    source: str = ""  # "pycuda" or "nvidia-smi"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def visible_device_entries(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` up to the first invalid one; ``None`` when it is unset.

    An integer entry must be non-negative; any other entry must start with ``GPU-`` or ``MIG-``.
    """
    value = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.isdigit() or entry.startswith(("GPU-", "MIG-")):
            entries.append(entry)
            continue
        break  # "-1", "", garbage: this entry and all after it are hidden
    return entries


def apply_visibility(system_gpus: list[GpuInfo], entries: list[str] | None) -> list[GpuInfo]:
    """``system_gpus`` (nvidia-smi's order) as CUDA numbers them under ``entries`` (see
    :func:`visible_device_entries`); each GPU is returned with its CUDA index."""
    if entries is None:
        chosen = list(system_gpus)
    else:
        chosen = []
        for entry in entries:
            found = _match_entry(system_gpus, entry)
            if found is None:
                break  # CUDA stops at an entry that names no device
            if found not in chosen:
                chosen.append(found)
    return [_with_index(gpu, index) for index, gpu in enumerate(chosen)]


def _match_entry(system_gpus: list[GpuInfo], entry: str) -> GpuInfo | None:
    if entry.isdigit():
        position = int(entry)
        return system_gpus[position] if position < len(system_gpus) else None
    if entry.startswith("MIG-"):
        return None  # MIG instances are not listed by nvidia-smi's GPU query
    matches = [gpu for gpu in system_gpus if gpu.uuid and gpu.uuid.startswith(entry)]
    return matches[0] if len(matches) == 1 else None


def _with_index(gpu: GpuInfo, index: int) -> GpuInfo:
    values = gpu.as_dict()
    values["index"] = index
    return GpuInfo(**values)


def _gpus_from_pycuda() -> list[GpuInfo]:
    try:
        driver = importlib.import_module("pycuda.driver")
        driver.init()
        found: list[GpuInfo] = []
        for index in range(driver.Device.count()):
            device = driver.Device(index)
            major, minor = device.compute_capability()
            integrated = bool(device.get_attribute(driver.device_attribute.INTEGRATED))
            found.append(
                GpuInfo(
                    str(device.name()),
                    f"{major}.{minor}",
                    int(device.total_memory()) >> 20,
                    integrated=integrated,
                    index=index,
                    source="pycuda",
                )
            )
        return found
    except Exception:  # noqa: BLE001 - no driver, no device, a broken build: none found through pycuda
        return []


NVIDIA_SMI_QUERY = "name,compute_cap,memory.total,driver_version,uuid"


def parse_nvidia_smi(output: str) -> list[GpuInfo]:
    """Rows of ``nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,uuid
    --format=csv,noheader,nounits`` (fields it cannot give, such as a Jetson's memory, read "[N/A]")."""
    found: list[GpuInfo] = []
    for line in output.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 2 or not parts[0]:
            continue
        memory = parts[2] if len(parts) > 2 else ""
        memory_mb = int(float(memory)) if memory.replace(".", "", 1).isdigit() else None
        driver = parts[3] if len(parts) > 3 and not parts[3].startswith("[") else None
        uuid = parts[4] if len(parts) > 4 and parts[4].startswith("GPU-") else None
        found.append(GpuInfo(parts[0], parts[1], memory_mb, driver, uuid, index=len(found), source="nvidia-smi"))
    return found


NVIDIA_SMI_QUERY_OLD_DRIVERS = "name,memory.total,driver_version,uuid"
"""The same query without ``compute_cap``, a field older drivers' nvidia-smi does not know: it rejects the whole
query ("Field "compute_cap" is not a valid field to query"), which read as "no GPU" before."""


def _run_nvidia_smi(tool: str, query: str) -> str | None:
    try:
        return subprocess.run(
            [tool, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def without_compute_capability(output: str) -> str:
    """Rows of :data:`NVIDIA_SMI_QUERY_OLD_DRIVERS` as rows of :data:`NVIDIA_SMI_QUERY`, the compute capability
    unknown ("?": engines are then not called usable here, and the build says it cannot tell)."""
    rows = []
    for line in output.strip().splitlines():
        name, _, rest = line.partition(",")
        rows.append(f"{name}, ?,{rest}" if rest else f"{name}, ?")
    return "\n".join(rows)


def _gpus_from_nvidia_smi() -> list[GpuInfo]:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    output = _run_nvidia_smi(tool, NVIDIA_SMI_QUERY)
    if output is None:  # an older driver rejects compute_cap: ask again without it
        older = _run_nvidia_smi(tool, NVIDIA_SMI_QUERY_OLD_DRIVERS)
        output = None if older is None else without_compute_capability(older)
    if output is None:
        return []
    return apply_visibility(parse_nvidia_smi(output), visible_device_entries())


def gpus() -> list[GpuInfo]:
    """GPUs this process can use, CUDA's device 0 first: pycuda's view, else nvidia-smi's filtered by
    ``CUDA_VISIBLE_DEVICES`` (empty when neither finds one)."""
    return _gpus_from_pycuda() or _gpus_from_nvidia_smi()


def gpu(index: int = 0) -> GpuInfo | None:
    """CUDA device ``index`` of this process, or ``None`` when there is no such GPU."""
    found = gpus()
    return found[index] if 0 <= index < len(found) else None


def visibility_notes(found: list[GpuInfo], environ: Mapping[str, str] | None = None) -> list[str]:
    """What a user should know about which GPU is device 0 here."""
    env = os.environ if environ is None else environ
    entries = visible_device_entries(env)
    notes = []
    if entries is not None:
        notes.append(
            f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r}: {len(found)} GPU(s) visible, "
            "numbered from 0 in that order"
        )
        numeric = any(entry.isdigit() for entry in entries)
        from_smi = any(gpu.source == "nvidia-smi" for gpu in found)
        if numeric and from_smi and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
            notes.append(
                "integer CUDA_VISIBLE_DEVICES entries follow nvidia-smi's order only with "
                "CUDA_DEVICE_ORDER=PCI_BUS_ID; set it, or name GPUs by UUID (nvidia-smi -L)"
            )
    return notes
