"""DLA builds decided without a DLA: static profiles, the TensorRT versions without DLA, the refusal naming
layers the DLA cannot run, and the count of engine layers on the DLA and the GPU read from inspector JSON."""

from __future__ import annotations

import pytest

from itmrt.engine.dla import (
    DlaPlacement,
    count_devices,
    dla_note,
    dla_refusal,
    dla_summary,
    dla_version_problem,
    layer_on_dla,
    static_ranges,
)
from itmrt.errors import ItmrtError

MANIFEST_RANGES = {"batch_images": (1, 32, 128), "batch_captions": (1, 32, 128), "max_length": (1, 20, 64)}


def test_dla_profiles_are_static() -> None:
    fixed = static_ranges(MANIFEST_RANGES, {})
    assert fixed == {"batch_images": (32, 32, 32), "batch_captions": (32, 32, 32), "max_length": (64, 64, 64)}
    assert all(low == mid == high for low, mid, high in fixed.values())
    chosen = static_ranges(MANIFEST_RANGES, {"batch_captions": (8, 8, 8)})
    assert chosen["batch_captions"] == (8, 8, 8) and chosen["batch_images"] == (32, 32, 32)
    with pytest.raises(ItmrtError, match="static shapes.*not --shape batch_images=1:32:128") as error:
        static_ranges(MANIFEST_RANGES, {"batch_images": (1, 32, 128)})
    assert "\n" not in str(error.value)


def test_tensorrt_versions_without_dla_are_refused() -> None:
    assert dla_version_problem("10.3.0.30") is None
    assert dla_version_problem("11.4.0.1") is None
    for version in ("11.0.0.114", "11.1.0.5", "11.3.2"):
        problem = dla_version_problem(version)
        assert problem is not None and "no DLA support" in problem and "11.0 to 11.3" in problem
    problem = dla_version_problem("10.8.0.43")
    assert problem is not None and "10.7 was the last 10.x release" in problem
    assert dla_version_problem("10.7.0.23", "Linux", "aarch64") is None


def test_dla_by_platform_as_the_documentation_lists_it() -> None:
    orin, windows_arm, x86 = ("Linux", "aarch64"), ("Windows", "ARM64"), ("Linux", "x86_64")
    assert dla_version_problem("10.3.0.30", *orin) is None
    assert dla_version_problem("11.4.1.2", *orin) is None and dla_version_problem("11.4.1.2", *windows_arm) is None
    assert dla_version_problem("11.4.0.5", *windows_arm) is None
    assert dla_version_problem("11.5.0.1", *windows_arm) is None
    assert "Windows on ARM only" in (dla_version_problem("11.4.0.5", *orin) or "")
    assert "does not support JetPack" in (dla_version_problem("11.5.0.1", *orin) or "")
    assert "has no DLA" in (dla_version_problem("10.3.0.30", *x86) or "")
    for problem in (dla_version_problem("11.4.0.5", *orin), dla_version_problem("10.3.0.30", *x86)):
        assert problem is not None and "\n" not in problem


def test_a_dla_build_that_cannot_work_is_refused_naming_the_layers() -> None:
    placement = DlaPlacement(dla=["sims_flat_node", "exps_all_node"],
                             gpu=["gru_l0_node", "shifted_node", "a", "b", "c", "d", "e"])
    assert dla_refusal(placement, gpu_fallback=True) is None
    refusal = dla_refusal(placement, gpu_fallback=False)
    assert refusal is not None and "7 layer(s) cannot run on the DLA: gru_l0_node, shifted_node, a, b, c and 2 more" \
        in refusal
    gru_only = DlaPlacement(dla=[], gpu=["gru_l0_node"])
    assert dla_refusal(gru_only, gpu_fallback=True) is None  # built for the GPU, and said so
    note = dla_note(gru_only)
    assert note is not None and "none of its layers" in note and dla_note(placement) is None
    refused = dla_refusal(gru_only, gpu_fallback=False)
    assert refused is not None and "1 layer(s) cannot run on the DLA: gru_l0_node;" in refused


INSPECTOR_LAYERS = [
    {"Name": "{ForeignNode[sims_flat_node...exps_all_node]}", "LayerType": "ForeignNode"},  # a DLA region
    {"Name": "{ForeignNode[shifted_node...positive_node]}", "LayerType": "ForeignNode"},  # a GPU (Myelin) region
    {"Name": "Reformatting CopyNode for Input Tensor 0 to x", "LayerType": "Reformat"},
    {"Name": "dla_subgraph", "LayerType": "DLA"},
    "{ForeignNode[word_gram_node]}",  # names-only JSON (LAYER_NAMES_ONLY verbosity)
]


def test_engine_layers_are_counted_by_device() -> None:
    on_dla = {"sims_flat_node", "exps_all_node", "word_gram_node"}
    assert layer_on_dla(INSPECTOR_LAYERS[0], on_dla) and not layer_on_dla(INSPECTOR_LAYERS[1], on_dla)  # type: ignore[arg-type]
    counts = count_devices(INSPECTOR_LAYERS, on_dla)
    assert counts["dla"] == 3 and counts["gpu"] == 2
    assert counts["gpu_layers"] == ["{ForeignNode[shifted_node...positive_node]}",
                                    "Reformatting CopyNode for Input Tensor 0 to x"]
    assert count_devices(INSPECTOR_LAYERS[1:3], on_dla)["dla"] == 0


def test_an_engine_with_nothing_on_the_dla_is_not_called_a_dla_engine() -> None:
    assert dla_summary(None, None) == ""
    assert dla_summary(0, {"dla": 3, "gpu": 2}) == "DLA core 0: 3 layer(s) on the DLA, 2 on the GPU"
    none_there = dla_summary(1, {"dla": 0, "gpu": 40})
    assert "no layer runs on the DLA" in none_there and not none_there.startswith("DLA core")


def test_shape_n_is_a_static_axis() -> None:
    from itmrt.cli.build_cmd import parse_axis_ranges

    assert parse_axis_ranges(["batch_captions=8", "max_length=1:20:64"]) == {
        "batch_captions": (8, 8, 8), "max_length": (1, 20, 64)
    }
    with pytest.raises(ItmrtError, match="AXIS=MIN:OPT:MAX or AXIS=N"):
        parse_axis_ranges(["batch_captions=1:8"])
