"""Jetson's DLA: static profiles, the TensorRT versions that have it, which layers really run on it.

What TensorRT says (``include/NvInferRuntime.h`` and ``include/NvInfer.h``, 10.3 and 11.1; the Developer
Guide's "Working with DLA"):

- ``IOptimizationProfile::setDimensions``: "If run on DLA, minimum, optimum, and maximum dimensions must
  be the same." A DLA build therefore gets a *static* profile (:func:`static_ranges`); a layer with a
  dynamic dimension cannot run on the DLA, and with ``kGPU_FALLBACK`` it silently runs on the GPU.
- The DLA runs FP16 and INT8 layers only; FP32 layers (the FP32 islands) fall back to the GPU.
- ``IBuilderConfig::canRunOnDLA(layer)`` says, per network layer, whether the DLA can run it; with
  fallback off a network holding any layer it cannot run fails to build, so :func:`dla_refusal` names
  those layers first, in one line; with fallback on, a graph the DLA can run none of is built for the GPU
  and said so (:func:`dla_note`).
- Which TensorRT has a DLA, and where (the Developer Guide's "Working with DLA", 11.3.0, 11.4.0, 11.4.1 and
  11.5.0 editions): 10.7 was the last 10.x release with DLA; none in 11.0-11.3; 11.4.0 only on Windows on
  ARM; 11.4.1 on Jetson AGX Orin (JetPack 7.2.2 or later) and Windows on ARM; 11.5.0 only on Windows on ARM
  (JetPack stays on 11.4.1). An x86 machine has none. :func:`dla_version_problem` refuses the rest in one
  line; a later release, which these pages do not cover, is left to TensorRT's own check.
- What ran where is read back from the built engine: layers the DLA runs appear in the engine as
  ``{ForeignNode[first...last]}`` regions (TensorRT's build log lists them under "Layers Running on DLA"
  as ``[DlaLayer] {ForeignNode[...]}``); :func:`count_devices` counts an engine layer as a DLA layer when
  the inspector gives it a DLA layer type, or when it is such a region whose first and last layers the
  builder placed on the DLA. An engine with none is not called a DLA engine.

None of this has run on a DLA: the TensorRT-facing part (:func:`network_placement`) is type-checked
against the TensorRT stubs; the decisions are plain functions tested on the CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from itmrt.bundle.names import MAX_LENGTH
from itmrt.engine.profiles import Range
from itmrt.engine.tensorrt_api import version_tuple
from itmrt.errors import ItmrtError

if TYPE_CHECKING:
    import tensorrt

DLA_ABSENT = ((11, 0), (11, 4))  # TensorRT versions [from, to) without DLA on any platform
LAST_10X_WITH_DLA = (10, 7)
NAMED_LAYERS = 5  # layers named in a one-line refusal
_FOREIGN = re.compile(r"^\{ForeignNode\[(?P<first>.*?)\.\.\.(?P<last>.*)\]\}$|^\{ForeignNode\[(?P<only>.*)\]\}$")


def dla_version_problem(tensorrt_version: str, system: str | None = None, machine: str | None = None) -> str | None:
    """Why this TensorRT on this platform (``platform.system()``, ``platform.machine()``; None: not known)
    cannot build for the DLA; None when it can, or when the documentation does not say."""
    version = version_tuple(tensorrt_version)
    release = version[:2]
    low, high = DLA_ABSENT
    jetpack = "build on JetPack's TensorRT 10.x (10.7 or older) or 11.4.1 on JetPack 7.2.2+, or drop --dla-core"
    if release[:1] == (10,) and release > LAST_10X_WITH_DLA:
        return (f"TensorRT {tensorrt_version} has no DLA support (TensorRT 10.7 was the last 10.x release with "
                f"it); {jetpack}")
    if low <= release < high:
        return (f"TensorRT {tensorrt_version} has no DLA support (its documentation lists the DLA as absent from "
                f"TensorRT {low[0]}.{low[1]} to {high[0]}.{high[1] - 1}); {jetpack}")
    if system is None:
        return None
    arm = (machine or "").lower() in ("aarch64", "arm64")
    windows_arm, linux_arm = system == "Windows" and arm, system == "Linux" and arm
    if not arm:
        return f"this machine ({system} {machine}) has no DLA: build DLA engines on a Jetson, or drop --dla-core"
    if release == (11, 4) and version < (11, 4, 1) and not windows_arm:
        return (f"TensorRT {tensorrt_version} has DLA on Windows on ARM only (11.4.1 restored it on Jetson AGX "
                f"Orin with JetPack 7.2.2+); {jetpack}")
    if release == (11, 5) and linux_arm:
        return (f"TensorRT {tensorrt_version} does not support JetPack (Jetson stays on TensorRT 11.4.1, which "
                f"has Orin's DLA with JetPack 7.2.2+); {jetpack}")
    return None


def static_ranges(ranges: dict[str, Range], overrides: dict[str, Range]) -> dict[str, Range]:
    """Every axis fixed (min = opt = max) for a DLA build: ``--shape AXIS=N`` where given, else the batch
    axes at their profile's opt and the caption length at its max (any caption fits once padded).

    A ``--shape`` with min < max is refused in one line: the DLA takes no dynamic dimension.
    """
    dynamic = [f"{axis}={low}:{mid}:{high}" for axis, (low, mid, high) in overrides.items() if not low == mid == high]
    if dynamic:
        raise ItmrtError(
            f"--dla-core needs static shapes (the DLA takes no dynamic dimension), not --shape {dynamic[0]}; "
            "give one size per axis, e.g. --shape batch_captions=32"
        )
    fixed: dict[str, Range] = {}
    for axis, (_low, opt, high) in ranges.items():
        size = high if axis == MAX_LENGTH else opt
        fixed[axis] = (size, size, size)
    fixed.update(overrides)
    return fixed


@dataclass
class DlaPlacement:
    """Where the builder puts each network layer of a DLA build (``IBuilderConfig`` per layer)."""

    dla: list[str] = field(default_factory=list)  # default device DLA and the DLA can run it
    gpu: list[str] = field(default_factory=list)  # the DLA cannot run it: GPU (with fallback) or a failed build


def dla_note(placement: DlaPlacement) -> str | None:
    """What the build log says of a graph the DLA can run none of (GPU fallback on: it becomes a GPU engine,
    recorded with no layer on the DLA, and ``doctor`` does not call it a DLA engine)."""
    if placement.dla:
        return None
    return ("the DLA can run none of its layers (the DLA runs FP16/INT8 layers with static shapes): every layer "
            "runs on the GPU")


def dla_refusal(placement: DlaPlacement, gpu_fallback: bool) -> str | None:
    """The one-line refusal of a DLA build that cannot work without GPU fallback (None when it can be built)."""
    if not gpu_fallback and placement.gpu:
        named = ", ".join(placement.gpu[:NAMED_LAYERS])
        more = f" and {len(placement.gpu) - NAMED_LAYERS} more" if len(placement.gpu) > NAMED_LAYERS else ""
        return (f"--no-gpu-fallback: {len(placement.gpu)} layer(s) cannot run on the DLA: {named}{more}; "
                "allow GPU fallback or build without --dla-core")
    return None


def network_placement(config: tensorrt.IBuilderConfig, network: tensorrt.INetworkDefinition) -> DlaPlacement:
    """Each network layer on the DLA or the GPU, as the builder will place it (``canRunOnDLA`` per layer,
    with the config's default device type DLA already set)."""
    placement = DlaPlacement()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        (placement.dla if config.can_run_on_DLA(layer) else placement.gpu).append(str(layer.name))
    return placement


def _region_ends(name: str) -> tuple[str, str] | None:
    found = _FOREIGN.match(name.strip())
    if found is None:
        return None
    if found.group("only") is not None:
        return found.group("only"), found.group("only")
    return found.group("first"), found.group("last")


def layer_on_dla(layer: dict[str, Any], dla_network_layers: set[str]) -> bool:
    """Whether an engine-inspector layer runs on the DLA (see the module's note on the evidence)."""
    if "dla" in str(layer.get("LayerType", "")).lower():
        return True
    ends = _region_ends(str(layer.get("Name", "")))
    return ends is not None and ends[0] in dla_network_layers and ends[1] in dla_network_layers


def count_devices(layers: list[Any], dla_network_layers: set[str]) -> dict[str, Any]:
    """``{"dla": n, "gpu": m, "gpu_layers": [first names]}`` over the engine inspector's layers."""
    names = [layer if isinstance(layer, str) else str(layer.get("Name", "")) for layer in layers]
    on_dla = [
        layer_on_dla(layer if isinstance(layer, dict) else {"Name": layer}, dla_network_layers) for layer in layers
    ]
    gpu_layers = [name for name, dla in zip(names, on_dla) if not dla]
    return {"dla": sum(on_dla), "gpu": len(gpu_layers), "gpu_layers": gpu_layers[:20]}


def dla_summary(core: int | None, counts: dict[str, Any] | None) -> str:
    """How ``doctor`` names an engine's device: a DLA engine only when some layer runs on the DLA."""
    if core is None:
        return ""
    if counts is None:
        return f"DLA core {core} requested (layer devices not recorded)"
    if not counts.get("dla"):
        return f"built for DLA core {core} but no layer runs on the DLA ({counts.get('gpu', 0)} on the GPU)"
    return f"DLA core {core}: {counts['dla']} layer(s) on the DLA, {counts.get('gpu', 0)} on the GPU"
