"""``itmrt doctor``'s probes: Jetson detection from /etc/nv_tegra_release text, the GPUs CUDA_VISIBLE_DEVICES
leaves visible and in what order, install problems (a CPU onnxruntime shadowing a GPU one, JetPack's TensorRT
out of a venv's sight), and a bundle's engines checked against this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from itmrt.documents import sha256_file
from itmrt.machine.gpus import GpuInfo, apply_visibility, parse_nvidia_smi, visibility_notes, visible_device_entries
from itmrt.machine.jetson import detect_jetson, jetson_notes, parse_tegra_release, system_tensorrt_paths
from itmrt.reports.doctor import diagnose, format_report

from cli_helpers import run_cli

JETPACK6 = (
    "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
    "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
)
JETPACK5 = (
    "# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: "
    "t186ref, EABI: aarch64, DATE: Tue Feb 20 04:46:31 UTC 2024\n"
)


def test_tegra_release_names_the_l4t_and_jetpack_versions(tmp_path: Path) -> None:
    six = parse_tegra_release(JETPACK6, "NVIDIA Jetson AGX Orin Developer Kit")
    assert six is not None and (six.l4t, six.jetpack, six.board) == ("36.4.3", "6", "generic")
    five = parse_tegra_release(JETPACK5)
    assert five is not None and (five.l4t, five.jetpack, five.board) == ("35.5.0", "5", "t186ref")
    assert parse_tegra_release("Ubuntu 22.04.4 LTS") is None
    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    release.write_text(JETPACK6)
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    found = detect_jetson(release, model)
    assert found is not None and found.model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert detect_jetson(tmp_path / "absent", model) is None


def test_system_tensorrt_is_found_where_jetpack_puts_it(tmp_path: Path) -> None:
    package = tmp_path / "python3.10" / "dist-packages" / "tensorrt"
    package.mkdir(parents=True)
    assert system_tensorrt_paths((str(tmp_path / "python3.*" / "dist-packages" / "tensorrt"),)) == []  # no __init__.py
    (package / "__init__.py").write_text("")
    assert system_tensorrt_paths((str(tmp_path / "python3.*" / "dist-packages" / "tensorrt"),)) == [str(package)]


def test_jetson_install_notes() -> None:
    jetson = parse_tegra_release(JETPACK6)
    shadowed = jetson_notes(
        jetson,
        None,
        ["CPUExecutionProvider"],
        {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.20.0"},
        ["/usr/lib/python3.10/dist-packages/tensorrt"],
    )
    text = " | ".join(shadowed)
    assert "both onnxruntime 1.32.0 (CPU) and onnxruntime-gpu 1.20.0" in text
    assert "--system-site-packages" in text and "Jetson onnxruntime-gpu wheel" in text and "1024 MB" in text
    healthy = jetson_notes(
        jetson, "10.3.0.30", ["CUDAExecutionProvider", "CPUExecutionProvider"], {"onnxruntime-gpu": "1.20.0"}, []
    )
    assert healthy == [next(n for n in healthy if "unified memory" in n)]
    assert jetson_notes(None, None, ["CPUExecutionProvider"], {"onnxruntime": "1.32.0"}, []) == []


SMI = (
    "NVIDIA A100-SXM4-80GB, 8.0, 81920, 550.54.15, GPU-1111aaaa-0000-0000-0000-000000000000\n"
    "NVIDIA H200, 9.0, 143771, 550.54.15, GPU-2222bbbb-0000-0000-0000-000000000000\n"
    "NVIDIA L4, 8.9, 23034, 550.54.15, GPU-3333cccc-0000-0000-0000-000000000000\n"
)


def test_cuda_visible_devices_filters_and_reorders_the_gpus() -> None:
    system = parse_nvidia_smi(SMI)
    assert [g.name for g in system] == ["NVIDIA A100-SXM4-80GB", "NVIDIA H200", "NVIDIA L4"]
    assert system[1].memory_mb == 143771 and system[1].uuid and system[1].uuid.startswith("GPU-2222")

    def visible(value: str | None) -> list[tuple[int, str]]:
        env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
        return [(g.index, g.name) for g in apply_visibility(system, visible_device_entries(env))]

    assert visible(None) == [(0, "NVIDIA A100-SXM4-80GB"), (1, "NVIDIA H200"), (2, "NVIDIA L4")]
    assert visible("2,1") == [(0, "NVIDIA L4"), (1, "NVIDIA H200")]
    assert visible("0,2,-1,1") == [(0, "NVIDIA A100-SXM4-80GB"), (1, "NVIDIA L4")]  # an invalid entry hides the rest
    assert visible("") == []
    assert visible("GPU-2222") == [(0, "NVIDIA H200")]  # a UUID prefix
    assert visible("GPU-") == []  # ambiguous prefix: CUDA stops there
    assert visible("1,7,0") == [(0, "NVIDIA H200")]  # no device 7: stops there


def test_jetson_nvidia_smi_rows_and_visibility_notes() -> None:
    jetson = parse_nvidia_smi("Orin (nvgpu), 8.7, [N/A], 540.4.0, [N/A]\n")
    assert jetson == [GpuInfo("Orin (nvgpu)", "8.7", None, "540.4.0", None, index=0, source="nvidia-smi")]
    gpus = apply_visibility(parse_nvidia_smi(SMI), ["1"])
    notes = visibility_notes(gpus, {"CUDA_VISIBLE_DEVICES": "1"})
    assert "1 GPU(s) visible" in notes[0] and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in notes[1]
    assert len(visibility_notes(gpus, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})) == 1
    assert visibility_notes(gpus, {}) == []


def test_an_old_driver_that_rejects_compute_cap_still_lists_its_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An nvidia-smi that does not know ``compute_cap`` (older drivers) fails the whole query; the GPUs are
    asked for again without it, with the compute capability unknown (was: "no GPU")."""
    from itmrt.machine.gpus import _gpus_from_nvidia_smi

    tool = tmp_path / "nvidia-smi"
    tool.write_text(
        "#!/bin/sh\n"
        'case "$1" in *compute_cap*) echo \'Field "compute_cap" is not a valid field to query.\' >&2; exit 2;; esac\n'
        "echo 'Tesla P100-PCIE-16GB, 16280, 470.82.01, GPU-5555eeee-0000-0000-0000-000000000000'\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = _gpus_from_nvidia_smi()
    assert [(g.name, g.compute_capability, g.memory_mb, g.driver) for g in found] == [
        ("Tesla P100-PCIE-16GB", "?", 16280, "470.82.01")
    ]


def _bundle_with_engine(folder: Path, **extra: object) -> Path:
    (folder / "engines" / "fp16").mkdir(parents=True)
    (folder / "engines" / "fp16" / "scorer.plan").write_bytes(b"serialized engine")
    (folder / "scorer.onnx").write_bytes(b"graph")
    entry = {
        "file": "engines/fp16/scorer.plan",
        "sha256": sha256_file(folder / "engines/fp16/scorer.plan"),
        "graph_file": "scorer.onnx",
        "graph_sha256": sha256_file(folder / "scorer.onnx"),
        "tensorrt_version": "10.3.0.30",
        "gpu_name": "Orin (nvgpu)",
        "compute_capability": "8.7",
        "device_memory_bytes": 37 << 20,
        "largest_intermediate_bytes": 9 << 20,
        "tf32": {"enabled": False},
        "version_compatible": True,
        "hardware_compatibility": "NONE",
        "dla_core": None,
        **extra,
    }
    graphs = {name: {"file": f"{name}.onnx", "sha256": "0" * 64, "inputs": []}
              for name in ("image_encoder", "text_encoder", "scorer")}
    vocab = {"file": "vocab.json", "sha256": "0" * 64, "size": 4, "content_sha256": "0" * 64, "pad_id": 0,
             "start_id": 1, "end_id": 2, "unk_id": 3}
    files = {**{entry["file"]: "0" * 64 for entry in [*graphs.values(), vocab]},  # every named file listed
             "scorer.onnx": entry["graph_sha256"], "engines/fp16/scorer.plan": entry["sha256"]}
    graphs["scorer"]["sha256"] = entry["graph_sha256"]
    manifest = {
        "kind": "itmrt-bundle",
        "schema_version": 1,
        "family": "naaf",
        "graphs": graphs,
        "vocab": vocab,
        "files": files,
        "dims": {},
        "engines": {"fp16": {"scorer": entry}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_doctor_reports_a_bundles_engines_and_what_it_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _bundle_with_engine(tmp_path)
    report = diagnose(bundle=bundle)
    assert report.engines is not None and len(report.engines) == 1
    engine = report.engines[0]
    assert engine["device_memory_bytes"] == 37 << 20 and engine["travels"] == "version-compatible"
    assert engine["tf32"] is False and not engine["usable"]  # no TensorRT on this machine
    text = format_report(report)
    assert "device memory 37.0 MB" in text and "largest intermediate 9.0 MB" in text and "TF32 off" in text
    result = run_cli(capsys, "doctor", str(bundle), "--json")
    assert result.code == 0
    parsed = json.loads(result.out)
    assert parsed["engines"][0]["file"] == "engines/fp16/scorer.plan" and parsed["device"] == 0
    assert "CPUExecutionProvider" in parsed["ort_providers"]


def test_doctor_shows_where_a_dla_engines_layers_run(tmp_path: Path) -> None:
    on_dla = _bundle_with_engine(
        tmp_path / "dla", dla_core=0, os="Linux", arch="aarch64", unified_memory=True,
        layer_devices={"dla": 3, "gpu": 9, "network_dla": 30, "network_gpu": 12, "gpu_layers": ["shifted_node"]},
    )
    text = format_report(diagnose(bundle=on_dla))
    assert "DLA core 0: 3 layer(s) on the DLA, 9 on the GPU" in text
    assert "built on Linux aarch64 (unified memory)" in text
    none_there = _bundle_with_engine(tmp_path / "gpu", dla_core=1, layer_devices={"dla": 0, "gpu": 40})
    engine = diagnose(bundle=none_there).engines[0]  # type: ignore[index]
    assert "built for DLA core 1 but no layer runs on the DLA" in engine["travels"]
    assert engine["layer_devices"] == {"dla": 0, "gpu": 40}
