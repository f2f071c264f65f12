"""ONNX Runtime's execution providers: CUDA then CPU by default, TensorRT only when named and then with the
bundle's shape ranges and caches, the CUDA provider's memory limit; sessions report what they really use."""

from __future__ import annotations

from pathlib import Path

import pytest

from itmrt.bundle.folder import read_bundle
from itmrt.bundle.manifest import GraphEntry
from itmrt.errors import ItmrtError
from itmrt.runtime.backends import OrtBackend, open_backend
from itmrt.runtime.providers import (
    SessionSettings,
    profile_option,
    provider_options,
    resolve_providers,
)

from runtime_helpers import make_bundle
from test_engine_build import SCORER_ENTRY

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


SCORER = GraphEntry.from_json({"file": "scorer.onnx", "sha256": "0" * 64, **SCORER_ENTRY})

def test_default_order_is_cuda_then_cpu_and_tensorrt_is_opt_in() -> None:
    assert resolve_providers(None, GPU_BUILD) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["tensorrt", "cuda", "cpu"], GPU_BUILD) == GPU_BUILD
    assert resolve_providers(["TRT", "CUDAExecutionProvider", "cuda"], GPU_BUILD) == GPU_BUILD[:2]
    with pytest.raises(ItmrtError, match="'tensorrt' is not available in this onnxruntime"):
        resolve_providers(["tensorrt"], ["CPUExecutionProvider"])


def test_tensorrt_provider_gets_the_manifest_profile_and_caches(tmp_path: Path) -> None:
    options = provider_options(GPU_BUILD, SessionSettings(device=1), SCORER, tmp_path / "cache", "1.20.1")
    trt, cuda, cpu = options
    assert trt["trt_profile_min_shapes"] == "image_embeddings:1x36x16,caption_embeddings:1x1x16,lengths:1"
    assert trt["trt_profile_opt_shapes"] == "image_embeddings:32x36x16,caption_embeddings:32x20x16,lengths:32"
    assert trt["trt_profile_max_shapes"] == "image_embeddings:128x36x16,caption_embeddings:128x64x16,lengths:128"
    assert trt["trt_engine_cache_enable"] is True and trt["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert trt["trt_timing_cache_enable"] is True and trt["trt_timing_cache_path"] == str(tmp_path / "cache")
    assert trt["device_id"] == 1 and cuda == {"device_id": 1} and cpu == {}
    older = provider_options(GPU_BUILD[:1], SessionSettings(), SCORER, tmp_path, "1.16.3")[0]
    assert "trt_timing_cache_path" not in older  # an unknown option is an error in ONNX Runtime before 1.17
    elsewhere = provider_options(
        GPU_BUILD[:1], SessionSettings(trt_cache_dir=tmp_path / "mine"), SCORER, tmp_path, "1.20.0"
    )
    assert elsewhere[0]["trt_engine_cache_path"] == str(tmp_path / "mine")


def test_cuda_memory_limit_in_bytes() -> None:
    limited = provider_options(["CUDAExecutionProvider"], SessionSettings(gpu_mem_limit_mb=512), None, None, "1.20.0")
    assert limited == [{"device_id": 0, "gpu_mem_limit": 512 << 20}]
    with pytest.raises(ItmrtError, match="at least 1 MB"):
        provider_options(["CUDAExecutionProvider"], SessionSettings(gpu_mem_limit_mb=0), None, None, "1.20.0")
    assert profile_option({"x": ([1, 2], [3, 4], [5, 6])}, 2) == "x:5x6"


def test_sessions_report_the_providers_they_use(tmp_path: Path) -> None:
    bundle = read_bundle(make_bundle(tmp_path)[0])
    backend = open_backend(bundle, "scorer")
    assert isinstance(backend, OrtBackend)
    assert backend.requested_providers == ["CPUExecutionProvider"] == backend.providers  # a CPU-only onnxruntime here
    assert not (bundle.path / "cache").exists()  # no TensorRT provider, no cache folder


def test_tensorrt_provider_keeps_precision_graphs_strongly_typed_or_refuses() -> None:
    from itmrt.runtime.providers import graph_precision, tensorrt_typing_problem

    assert graph_precision(Path("bundle/precision/int8/scorer.onnx")) == "int8"
    assert graph_precision(Path("bundle/precision/fp16/text_encoder.onnx")) == "fp16"
    assert graph_precision(Path("bundle/scorer.onnx")) == "fp32"
    assert graph_precision(Path("bundle/other/int8/scorer.onnx")) == "fp32"
    assert tensorrt_typing_problem("1.21.1", "fp32") is None
    assert tensorrt_typing_problem("1.22.0", "int8") is None and tensorrt_typing_problem("1.32.0", "fp16") is None
    problem = tensorrt_typing_problem("1.21.1", "int8")
    assert problem is not None and "weakly typed" in problem and "1.22" in problem and "\n" not in problem
    options = provider_options(GPU_BUILD[:1], SessionSettings(), SCORER, Path("cache"), "1.22.0")[0]
    assert options["trt_fp16_enable"] is False and options["trt_int8_enable"] is False


def test_sessions_created_on_several_threads_at_once_leave_stdout_where_it_was() -> None:
    # create_session points sys.stdout at stderr while ONNX Runtime loads (its fallback notices); unguarded, two
    # threads restored each other's swap and left stdout on stderr: a command's table printed after went missing
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from onnx import TensorProto, helper

    from itmrt.runtime.sessions import create_session

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    before = sys.stdout
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: create_session(model.SerializeToString(), threads=1), range(64)))
    assert sys.stdout is before
