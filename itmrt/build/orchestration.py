"""``itmrt build`` as a function: the precision graphs, then TensorRT engines where TensorRT and a GPU exist.

The graphs are made and verified here (ONNX Runtime runs them on any machine);
the engines are :mod:`itmrt.engine`'s, each recorded with what TF32 costs its
graph when ``--tf32`` allows it (measured here, :mod:`itmrt.precision.tf32`).
A machine without TensorRT stops after the graphs and says why no engine was built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itmrt.bundle.manifest import Log, Manifest
from itmrt.engine.build import EngineOptions, TensorRTUnavailable, build_engines, build_target, require_tensorrt
from itmrt.engine.compat import this_platform
from itmrt.engine.dla import dla_version_problem
from itmrt.engine.settings import check_options
from itmrt.engine.tensorrt_api import tensorrt_module
from itmrt.errors import ItmrtError
from itmrt.precision.precision_graphs import PrecisionOptions, make_precision_graphs
from itmrt.precision.tf32 import tf32_record


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
    engine_options = engine_options or EngineOptions()
    check_options(engine_options, precision)
    _check_dla_here(engine_options)
    manifest = make_precision_graphs(bundle, precision, precision_options, log)
    try:
        build_target(require_tensorrt(), engine_options.device)
    except TensorRTUnavailable as exc:
        return BuildOutcome(manifest, False, str(exc))
    tf32 = tf32_record(Path(bundle), manifest, engine_options, log or (lambda _message: None))
    return BuildOutcome(build_engines(bundle, precision, engine_options, log, tf32=tf32), True)


def _check_dla_here(options: EngineOptions) -> None:
    """A DLA build on a TensorRT without DLA is refused before any graph is made (where TensorRT is here)."""
    if options.dla_core is None:
        return
    trt = tensorrt_module()
    problem = dla_version_problem(str(trt.__version__), *this_platform()) if trt is not None else None
    if problem is not None:
        raise ItmrtError(problem)
