"""What the TensorRT builder is told, decided without TensorRT: flags, workspace, compatibility, DLA; the
engine compatibility check for engines built to travel; the timing cache's name and fallback."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from itmrt.bundle.manifest import EngineEntry
from itmrt.engine.compat import DeviceInfo, compatibility_problems
from itmrt.engine.settings import (
    EngineOptions,
    builder_settings,
    carries_host_code,
    check_options,
)
from itmrt.engine.timing_cache import attach_timing_cache, timing_cache_file
from itmrt.errors import ItmrtError

ORIN: dict[str, Any] = {"unified_memory": True, "compute_capability": "8.7"}
H200: dict[str, Any] = {"unified_memory": False, "compute_capability": "9.0"}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tf32_is_cleared_for_every_engine_unless_asked_for(precision: str) -> None:
    default = builder_settings(EngineOptions(), precision, **H200)
    assert default.clear_flags == ("TF32",) and "TF32" not in default.set_flags
    opted = builder_settings(EngineOptions(tf32=True), precision, **H200)
    assert "TF32" in opted.set_flags and opted.clear_flags == ()
    assert default.as_dict()["clear_flags"] == ["TF32"]  # what the manifest records


def test_workspace_defaults_to_one_gib_on_unified_memory_only() -> None:
    assert builder_settings(EngineOptions(), "fp16", **ORIN).workspace_mb == 1024
    assert builder_settings(EngineOptions(), "fp16", **H200).workspace_mb is None
    assert builder_settings(EngineOptions(workspace_mb=256), "fp16", **ORIN).workspace_mb == 256


def test_engines_that_travel_and_dla(tmp_path: Path) -> None:
    travelling = builder_settings(
        EngineOptions(version_compatible=True, hardware_compatibility="ampere-plus"), "fp16", **H200
    )
    assert "VERSION_COMPATIBLE" in travelling.set_flags and travelling.hardware_compatibility == "AMPERE_PLUS"
    assert carries_host_code(travelling.set_flags)
    lean = tmp_path / "libnvinfer_lean.so.10"
    lean.write_bytes(b"")
    lean_options = EngineOptions(version_compatible=True, exclude_lean_runtime=True, lean_runtime=lean)
    lean_excluded = builder_settings(lean_options, "fp16", **H200)
    assert {"VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"} <= set(lean_excluded.set_flags)
    assert not carries_host_code(lean_excluded.set_flags)
    dla = builder_settings(EngineOptions(dla_core=1), "int8", **ORIN)
    assert dla.dla_core == 1 and "GPU_FALLBACK" in dla.set_flags
    strict = builder_settings(EngineOptions(dla_core=0, gpu_fallback=False), "fp16", **ORIN)
    assert "GPU_FALLBACK" not in strict.set_flags
    assert builder_settings(EngineOptions(layer_info=False), "fp16", **H200).profiling_verbosity == "LAYER_NAMES_ONLY"
    assert builder_settings(EngineOptions(), "fp16", **H200).profiling_verbosity == "DETAILED"


@pytest.mark.parametrize(
    ("options", "precision", "message"),
    [
        (EngineOptions(hardware_compatibility="turing-plus"), "fp16", "unknown hardware compatibility"),
        (EngineOptions(exclude_lean_runtime=True), "fp16", "only applies to --version-compatible"),
        (EngineOptions(version_compatible=True, exclude_lean_runtime=True), "fp16", "pass --lean-runtime PATH"),
        (EngineOptions(version_compatible=True, lean_runtime=Path("lib.so")), "fp16", "only applies with --exclude"),
        (EngineOptions(version_compatible=True, exclude_lean_runtime=True, lean_runtime=Path("/no/such/lib.so")),
         "fp16", "no such file"),
        (EngineOptions(dla_core=0), "fp32", "DLA runs FP16 and INT8 only"),
        (EngineOptions(dla_core=0, axis_ranges={"batch_images": (1, 8, 32)}), "fp16", "needs static shapes"),
        (EngineOptions(board="raspberry-pi"), "fp16", "unknown board 'raspberry-pi'"),
    ],
)
def test_contradictory_options_are_one_line_errors_before_any_gpu_work(
    options: EngineOptions, precision: str, message: str
) -> None:
    with pytest.raises(ItmrtError, match=message) as error:
        check_options(options, precision)
    assert "\n" not in str(error.value)


def test_ampere_plus_needs_an_ampere_build_gpu() -> None:
    with pytest.raises(ItmrtError, match="compute capability 8.0\\+.*this one is 7.5"):
        builder_settings(
            EngineOptions(hardware_compatibility="ampere-plus"), "fp16", unified_memory=False, compute_capability="7.5"
        )


BUILT = EngineEntry(file="engines/fp16/scorer.plan", sha256="", graph_file="scorer.onnx", graph_sha256="",
                    tensorrt_version="10.3.0.30", gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")


def test_compatibility_check_accepts_what_each_engine_promises() -> None:
    same = DeviceInfo("10.3.0.30", "NVIDIA A100-SXM4-80GB", "8.0")
    later_trt = DeviceInfo("10.13.0.35", "NVIDIA A100-SXM4-80GB", "8.0")
    earlier_trt = DeviceInfo("10.2.0.19", "NVIDIA A100-SXM4-80GB", "8.0")
    h200 = DeviceInfo("10.3.0.30", "NVIDIA H200", "9.0")
    t4 = DeviceInfo("10.3.0.30", "Tesla T4", "7.5")
    a100_40 = DeviceInfo("10.3.0.30", "NVIDIA A100-PCIE-40GB", "8.0")
    assert compatibility_problems(BUILT, same) == []
    assert "built with TensorRT 10.3.0.30, this machine has 10.13.0.35" in compatibility_problems(BUILT, later_trt)[0]
    assert "this GPU is NVIDIA H200 (9.0)" in compatibility_problems(BUILT, h200)[0]

    version_compatible = replace(BUILT, version_compatible=True)
    assert compatibility_problems(version_compatible, later_trt) == []
    assert "version-compatible from TensorRT 10.3.0.30 on" in compatibility_problems(version_compatible, earlier_trt)[0]
    # without its lean runtime: a later TensorRT loads the build version's lean runtime library (loadRuntime)
    lean_left_out = replace(version_compatible, exclude_lean_runtime=True)
    assert compatibility_problems(lean_left_out, later_trt) == []
    assert compatibility_problems(lean_left_out, earlier_trt)

    ampere_plus = replace(BUILT, hardware_compatibility="AMPERE_PLUS")
    assert compatibility_problems(ampere_plus, h200) == []
    assert "Ampere or later" in compatibility_problems(ampere_plus, t4)[0]
    same_cc = replace(BUILT, hardware_compatibility="SAME_COMPUTE_CAPABILITY")
    assert compatibility_problems(same_cc, a100_40) == []
    assert compatibility_problems(same_cc, h200)
    both = replace(ampere_plus, version_compatible=True)
    assert compatibility_problems(both, DeviceInfo("11.1.0.5", "NVIDIA H200", "9.0")) == []


def test_timing_cache_is_named_for_tensorrt_and_gpu() -> None:
    name = timing_cache_file("10.3.0.30", "NVIDIA Jetson AGX Orin", "8.7")
    assert name == "engines/timing/trt-10.3.0.30-nvidia-jetson-agx-orin-sm87.cache"
    assert timing_cache_file("10.3.0.30", "NVIDIA H200", "9.0") != name
    assert timing_cache_file("11.1.0.5", "NVIDIA Jetson AGX Orin", "8.7") != name
    assert "/" not in timing_cache_file("10.3", "a/b\\c d", "8.7").split("/", 2)[-1]


class RecordingConfig:
    """Records what the cache logic asks of an ``IBuilderConfig``; refuses caches whose bytes are in
    ``refuse`` (what TensorRT does with a cache from another version or GPU), and returns ``None`` from
    ``create_timing_cache`` for bytes in ``unreadable`` (what the binding does when TensorRT cannot
    deserialize them: ``createTimingCache`` returns nullptr)."""

    def __init__(self, refuse: set[bytes], unreadable: frozenset[bytes] = frozenset()) -> None:
        self.refuse = refuse
        self.unreadable = unreadable
        self.calls: list[tuple[str, Any]] = []

    def create_timing_cache(self, blob: bytes) -> bytes | None:
        self.calls.append(("create", bytes(blob)))
        return None if bytes(blob) in self.unreadable else bytes(blob)

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        self.calls.append(("set", (cache, ignore_mismatch)))
        return cache not in self.refuse


def test_a_refused_timing_cache_is_reported_and_replaced_by_a_fresh_one(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cache of another GPU")
    messages: list[str] = []
    config = RecordingConfig(refuse={b"cache of another GPU"})
    attached = attach_timing_cache(config, cache, messages.append)
    assert attached.cache == b"" and "refused by TensorRT" in attached.status
    assert config.calls == [
        ("create", b"cache of another GPU"),
        ("set", (b"cache of another GPU", False)),
        ("create", b""),
        ("set", (b"", False)),
    ]
    assert messages and "a fresh cache" in messages[0]

    reused = attach_timing_cache(RecordingConfig(refuse=set()), cache, messages.append)
    assert reused.cache == b"cache of another GPU" and reused.status == "reused 20 bytes"
    assert attach_timing_cache(RecordingConfig(refuse=set()), tmp_path / "none.cache", messages.append).status == "new"
    with pytest.raises(ItmrtError, match="refused a new, empty timing cache"):
        attach_timing_cache(RecordingConfig(refuse={b"", b"cache of another GPU"}), cache, messages.append)


def test_a_cache_tensorrt_cannot_deserialize_is_recorded_as_fresh_not_reused(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"damaged")
    messages: list[str] = []
    config = RecordingConfig(refuse=set(), unreadable=frozenset({b"damaged"}))
    attached = attach_timing_cache(config, cache, messages.append)
    assert attached.cache == b"" and "reused" not in attached.status
    assert attached.status.startswith("not deserialized by TensorRT") and "a fresh cache" in attached.status
    assert config.calls == [("create", b"damaged"), ("create", b""), ("set", (b"", False))]
    assert messages == [f"timing cache {cache}: {attached.status}"]


def test_same_compute_capability_needs_a_turing_build_gpu() -> None:
    options = EngineOptions(hardware_compatibility="same-compute-capability")
    with pytest.raises(ItmrtError, match="needs a Turing or later GPU.*compute capability 7.5\\+.*this one is 7.0"):
        builder_settings(options, "fp16", unified_memory=False, compute_capability="7.0")
    assert builder_settings(options, "fp16", unified_memory=False, compute_capability="7.5").hardware_compatibility


def test_engines_do_not_cross_platforms() -> None:
    orin_built = replace(BUILT, hardware_compatibility="AMPERE_PLUS", os="Linux", arch="aarch64", unified_memory=True)
    x86 = DeviceInfo("10.3.0.30", "NVIDIA H200", "9.0", "Linux", "x86_64", False)
    orin = DeviceInfo("10.3.0.30", "Orin (nvgpu)", "8.7", "Linux", "aarch64", True)
    problems = compatibility_problems(orin_built, x86)
    assert len(problems) == 1 and "built on Linux aarch64 with unified memory" in problems[0]
    assert "Linux x86_64 with its own GPU memory" in problems[0] and "\n" not in problems[0]
    assert compatibility_problems(orin_built, orin) == []
    x86_built = replace(orin_built, arch="x86_64", unified_memory=False)
    assert "not cross platforms" in compatibility_problems(x86_built, orin)[0]
    assert compatibility_problems(replace(BUILT, hardware_compatibility="AMPERE_PLUS"), orin) == []  # none recorded


def test_the_lean_runtime_comes_from_the_user_not_the_bundle() -> None:
    from itmrt.runtime.backend_trt import lean_runtime_for

    assert lean_runtime_for("engines/fp16/scorer.plan", False, "10.3.0.30", {}) is None
    lib = "/opt/tensorrt/lib/libnvinfer_lean.so.10"
    assert lean_runtime_for("engines/fp16/scorer.plan", True, "10.3.0.30", {"ITMRT_TRT_LEAN_RUNTIME": lib}) == Path(lib)
    with pytest.raises(ItmrtError, match="set ITMRT_TRT_LEAN_RUNTIME to TensorRT 10.3.0.30's lean runtime"):
        lean_runtime_for("engines/fp16/scorer.plan", True, "10.3.0.30", {})
