"""``itmrt build``: precision graphs for ONNX Runtime, then TensorRT engines where TensorRT is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itmrt import limits
from itmrt.cli import flags
from itmrt.cli.app import app
from itmrt.cli.flags import CalibrationMethod, Precision
from itmrt.engine.profiles import BOARDS
from itmrt.engine.settings import HARDWARE_LEVELS
from itmrt.errors import ItmrtError


def parse_axis_ranges(values: list[str]) -> dict[str, tuple[int, int, int]]:
    """``AXIS=MIN:OPT:MAX`` (or ``AXIS=N``, a static N:N:N) strings -> ``{axis: (min, opt, max)}``."""
    ranges = {}
    for value in values:
        axis, _, spec = value.partition("=")
        parts = spec.split(":")
        if len(parts) == 1:
            parts = parts * 3
        if not axis or len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
            raise ItmrtError(f"--shape '{value}' is not AXIS=MIN:OPT:MAX or AXIS=N (e.g. batch_captions=1:32:128)")
        low, mid, high = (int(part) for part in parts)
        ranges[axis.strip()] = (low, mid, high)
    return ranges


@app.command("build")
@flags.output_group("progress")
def build_command(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `itmrt export`."),
    precision: Precision = flags.precision(Precision.FP16, "The precision of the graphs and engines to build."),
    calib_data: Path | None = typer.Option(None, "--calib-data", help="Calibration data (int8 without saved calibration); for fp16 the islands are measured on it."),
    split: str = typer.Option("train", "--split", help="Split of --calib-data."),
    method: CalibrationMethod = flags.calibration_method(),
    samples: int = typer.Option(256, "--samples", min=1, max=limits.MAX_COUNT, help="Calibration images."),
    workspace: int | None = typer.Option(None, "--workspace", min=1, max=1 << 20, help="TensorRT workspace limit in MB (default: 1024 on unified-memory boards such as Jetson, else TensorRT's)."),
    shape: list[str] = typer.Option([], "--shape", help="Override a profile axis: AXIS=MIN:OPT:MAX (repeatable; axes: batch_images, batch_captions, max_length). Applied after --board."),
    board: str | None = typer.Option(None, "--board", help=f"Size the profile and workspace for a device: {', '.join(BOARDS)} (the batch axes' maxima are halved until the largest intermediate tensor fits the board's budget)."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="TensorRT timing cache file, read and updated (default: one in the bundle per TensorRT version and GPU)."),
    tf32: bool = typer.Option(False, "--tf32/--no-tf32", help="Allow TF32 in float32 products (off by default: it rounds their inputs to 10-bit mantissas); its error is measured and recorded."),
    version_compatible: bool = typer.Option(False, "--version-compatible", help="Build engines later TensorRT versions can run (the lean runtime goes into the plan; may be slower)."),
    exclude_lean_runtime: bool = typer.Option(False, "--exclude-lean-runtime", help="With --version-compatible: leave the lean runtime out of the plan (needs --lean-runtime; at run time set ITMRT_TRT_LEAN_RUNTIME)."),
    lean_runtime: Path | None = typer.Option(None, "--lean-runtime", help="With --exclude-lean-runtime: the lean runtime library (libnvinfer_lean of this TensorRT) the plans load through."),
    hardware_compatibility: str = typer.Option("none", "--hardware-compatibility", help=f"GPUs the engine may run on besides this one: {', '.join(HARDWARE_LEVELS)} (ampere-plus: any Ampere or later GPU; same-compute-capability: TensorRT 10.9+)."),
    dla_core: int | None = typer.Option(None, "--dla-core", min=0, max=15, help="Run on this DLA core of a Jetson (fp16/int8, static shapes: --shape AXIS=N; default the batch axes' opt and the longest caption); layers the DLA cannot run go to the GPU."),
    gpu_fallback: bool = typer.Option(True, "--gpu-fallback/--no-gpu-fallback", help="With --dla-core: let the GPU run the layers the DLA cannot (else the build fails on them)."),
    layer_info: bool = typer.Option(True, "--layer-info/--no-layer-info", help="Build with detailed profiling verbosity and keep the engine inspector's layer JSON in the bundle."),
    device: int = typer.Option(0, "--device", min=0, max=255, help="CUDA device to build on (numbered after CUDA_VISIBLE_DEVICES)."),
    outputs: Any = None,  # the output options (flags.output_group): one OutputOptions
) -> None:
    """Make and verify the precision graphs (ONNX Runtime runs them anywhere), then build one TensorRT
    engine per graph. Without TensorRT it stops after the graphs and says that no engine was built.
    On a CPU, ONNX Runtime runs the FP16 and INT8 graphs slower than FP32 (`itmrt bench` shows by how much):
    they are made for TensorRT on a GPU.

    TF32 is off unless --tf32. The manifest records each engine's flags, profile and device memory."""
    from itmrt.build.orchestration import build_bundle
    from itmrt.engine.build import EngineOptions
    from itmrt.precision.precision_graphs import PrecisionOptions

    engine_options = EngineOptions(
        workspace_mb=workspace, axis_ranges=parse_axis_ranges(shape), timing_cache=timing_cache, tf32=tf32,
        version_compatible=version_compatible, exclude_lean_runtime=exclude_lean_runtime, lean_runtime=lean_runtime,
        hardware_compatibility=hardware_compatibility, dla_core=dla_core, gpu_fallback=gpu_fallback, board=board,
        layer_info=layer_info, device=device,
    )
    graph_options = PrecisionOptions(calib_data=calib_data, split=split, method=method, samples=samples,
                                     progress=outputs.progress)
    outcome = build_bundle(bundle, precision, graph_options, engine_options, log=typer.echo)
    if not outcome.engines_built:
        typer.echo(f"no TensorRT engine was built: {outcome.no_engine_reason}.")
        typer.echo(f"The verified {precision} graphs run in ONNX Runtime (`--backend ort`); run `itmrt build` again on the target GPU for engines.")
        return
    typer.echo(f"{bundle}: {precision} engines built")
