"""``itmrt build`` as a function: the precision graphs, then TensorRT engines where TensorRT and a GPU exist.

The graphs are made and verified here (ONNX Runtime runs them on any machine);
the engines are :mod:`itmrt.engine`'s. A machine without TensorRT stops after
the graphs and says why no engine was built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itmrt.bundle.manifest import Log, Manifest
from itmrt.calibration.precision_graphs import PrecisionOptions, make_precision_graphs
from itmrt.engine.build import EngineOptions, TensorRTUnavailable, build_engines, device_info, require_tensorrt


@dataclass
class BuildOutcome:
    """What :func:`build_bundle` did: the manifest after it, and why no engine was built (if so)."""

    manifest: Manifest
    engines_built: bool
    no_engine_reason: str | None = None


def build_bundle(
    bundle: str | Path,
    precision: str,
    precision_options: PrecisionOptions | None = None,
    engine_options: EngineOptions | None = None,
    log: Log | None = None,
) -> BuildOutcome:
    """Make and verify the ``precision`` graphs, then build their TensorRT engines where TensorRT and a GPU exist."""
    manifest = make_precision_graphs(bundle, precision, precision_options, log)
    try:
        device_info(require_tensorrt())
    except TensorRTUnavailable as exc:
        return BuildOutcome(manifest, False, str(exc))
    return BuildOutcome(build_engines(bundle, precision, engine_options, log), True)
