"""Engine manifest checks, optimisation profiles, doctor probes; real TensorRT builds only where TensorRT is
installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from itmrt.bundle.folder import read_bundle
from itmrt.bundle.manifest import GraphEntry, Manifest
from itmrt.cli.build_cmd import parse_axis_ranges
from itmrt.documents import sha256_file
from itmrt.engine.build import EngineOptions, TensorRTUnavailable, build_engines, profile_shapes, require_tensorrt
from itmrt.engine.compat import DeviceInfo, check_engine, compatibility_problems
from itmrt.errors import ItmrtError
from itmrt.reports.doctor import cpu_flags, diagnose, format_report, tensorrt_module

SCORER_ENTRY = {
    "inputs": [
        {"name": "image_embeddings", "dtype": "float32", "shape": ["batch_images", "num_regions", 16]},
        {"name": "caption_embeddings", "dtype": "float32", "shape": ["batch_captions", "max_length", 16]},
        {"name": "lengths", "dtype": "int32", "shape": ["batch_captions"]},
    ],
    "shape_ranges": {
        "batch_images": {"min": 1, "opt": 32, "max": 128},
        "batch_captions": {"min": 1, "opt": 32, "max": 128},
        "max_length": {"min": 1, "opt": 20, "max": 64},
        "num_regions": {"min": 36, "opt": 36, "max": 36},
    },
}
HERE = DeviceInfo("10.13.0.35", "NVIDIA Jetson Orin", "8.7")


def test_profile_shapes_come_from_the_manifest_and_overrides() -> None:
    entry = GraphEntry.from_json({"file": "scorer.onnx", "sha256": "0" * 64, **SCORER_ENTRY})
    shapes = profile_shapes(entry, parse_axis_ranges(["max_length=2:16:32"]))
    assert shapes["image_embeddings"] == ([1, 36, 16], [32, 36, 16], [128, 36, 16])
    assert shapes["caption_embeddings"] == ([1, 2, 16], [32, 16, 16], [128, 32, 16])
    assert shapes["lengths"] == ([1], [32], [128])
    with pytest.raises(ItmrtError, match="min <= opt <= max"):
        profile_shapes(entry, {"batch_images": (8, 4, 16)})
    with pytest.raises(ItmrtError, match="AXIS=MIN:OPT:MAX"):
        parse_axis_ranges(["batch_images=1:2"])


def _bundle_with_engine(folder: Path) -> tuple[Path, Manifest]:
    (folder / "engines" / "fp16").mkdir(parents=True)
    (folder / "engines" / "fp16" / "scorer.plan").write_bytes(b"serialized engine bytes")
    (folder / "scorer.onnx").write_bytes(b"graph bytes")
    entry = {
        "file": "engines/fp16/scorer.plan", "sha256": sha256_file(folder / "engines/fp16/scorer.plan"),
        "graph_file": "scorer.onnx", "graph_sha256": sha256_file(folder / "scorer.onnx"),
        "tensorrt_version": HERE.tensorrt_version, "gpu_name": HERE.gpu_name,
        "compute_capability": HERE.compute_capability,
    }
    vocab = {"file": "vocab.json", "sha256": "0" * 64, "size": 4, "content_sha256": "0" * 64, "pad_id": 0,
             "start_id": 1, "end_id": 2, "unk_id": 3}
    graphs = {"scorer": {"file": "scorer.onnx", "sha256": entry["graph_sha256"]}}
    files = {"scorer.onnx": entry["graph_sha256"], "engines/fp16/scorer.plan": entry["sha256"]}  # nothing unlisted
    manifest = Manifest.from_json({"kind": "itmrt-bundle", "schema_version": 1, "family": "naaf", "dims": {},
                                   "graphs": graphs, "vocab": vocab, "files": files,
                                   "engines": {"fp16": {"scorer": entry}}})
    return folder, manifest


def test_engine_from_another_tensorrt_or_gpu_is_refused_with_a_rebuild_message(tmp_path: Path) -> None:
    bundle, manifest = _bundle_with_engine(tmp_path)
    assert check_engine(bundle, manifest, "fp16", "scorer", HERE) == bundle / "engines/fp16/scorer.plan"
    other_trt = DeviceInfo("11.0.0.1", HERE.gpu_name, HERE.compute_capability)
    with pytest.raises(
        ItmrtError,
        match=r"built with TensorRT 10\.13\.0\.35, this machine has 11\.0\.0\.1.*itmrt build .* --precision fp16"
    ) as error:
        check_engine(bundle, manifest, "fp16", "scorer", other_trt)
    assert "\n" not in str(error.value)
    other_gpu = DeviceInfo(HERE.tensorrt_version, "NVIDIA H100 80GB HBM3", "9.0")
    assert "this GPU is NVIDIA H100 80GB HBM3 (9.0)" in compatibility_problems(
        manifest.engines["fp16"]["scorer"], other_gpu
    )[0]
    with pytest.raises(ItmrtError, match="no int8 scorer engine"):
        check_engine(bundle, manifest, "int8", "scorer", HERE)
    (bundle / "scorer.onnx").write_bytes(b"re-exported graph")
    with pytest.raises(ItmrtError, match="graph that has changed"):
        check_engine(bundle, manifest, "fp16", "scorer", HERE)


def test_cpu_flags_and_doctor_report(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n")
    assert {"avx512_vnni", "avx512_bf16"} <= cpu_flags(cpuinfo)
    assert cpu_flags(tmp_path / "missing") == set()
    report = diagnose()
    assert "CPUExecutionProvider" in report.ort_providers
    text = format_report(report)
    assert "onnxruntime:" in text and "AVX-512 VNNI" in text and "tensorrt:" in text


def test_a_stub_only_tensorrt_folder_is_not_tensorrt(tmp_path: Path) -> None:
    """tensorrt-stubs installed into a path imports as an empty namespace package: not TensorRT."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("class Builder: ...\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import tensorrt;"
        "from itmrt.reports.doctor import tensorrt_module; print(tensorrt_module() is None)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


@pytest.mark.skipif(tensorrt_module() is not None, reason="TensorRT is installed here")
def test_without_tensorrt_engine_building_says_why(tmp_path: Path) -> None:
    with pytest.raises(TensorRTUnavailable, match="tensorrt Python package is not installed"):
        require_tensorrt()
    with pytest.raises(TensorRTUnavailable):
        build_engines(tmp_path, "fp16", EngineOptions())


@pytest.mark.skipif(tensorrt_module() is None, reason="TensorRT is not installed (engines are built on the target GPU)")
def test_tensorrt_builds_and_reloads_an_engine(tmp_path: Path) -> None:
    from itmrt.precision.precision_graphs import make_fp16
    from itmrt.runtime.backend_trt import TrtBackend

    from tests.calibration_helpers import make_data, make_naaf_bundle

    bundle = make_naaf_bundle(tmp_path, make_data(tmp_path / "data"))
    make_fp16(bundle)
    manifest = build_engines(bundle, "fp16", EngineOptions(workspace_mb=256, timing_cache=tmp_path / "timing.cache"))
    entry = manifest["engines"]["fp16"]["scorer"]
    assert entry["tensorrt_version"] and entry["compute_capability"]
    assert TrtBackend.from_bundle(read_bundle(bundle), "scorer", "fp16").engine is not None
    assert (tmp_path / "timing.cache").stat().st_size > 0
