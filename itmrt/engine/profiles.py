"""Optimisation profiles: min/opt/max shapes from the manifest, sized for the device that runs them.

TensorRT sizes an execution context's device memory for the profile's
*maximum* shapes (``create_execution_context`` allocates it once), so the
profile decides the memory an engine holds however small the batches it is
given. At the export's default ranges (128 images x 128 captions x 64 tokens)
the NAAF scorer's similarity tensor ``[128, 128, 64, 36]`` alone is 151 MB in
float32, and the scorer keeps several of that size. On a data-centre GPU that
is nothing; on an 8 GB Jetson that shares its memory with the CPU it matters.

A *board* names a budget for the largest single intermediate tensor of any
graph at the profile's maximum shapes; :func:`fit_ranges` halves the batch
axes' maxima until ONNX shape inference says every graph fits it. ``--shape``
overrides still win over a board (they are applied after). The engine's real
requirement (``ICudaEngine.device_memory_size_v2``) is measured after the
build and recorded next to the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itmrt.bundle.manifest import GraphEntry
from itmrt.bundle.names import BATCH_CAPTIONS, BATCH_IMAGES
from itmrt.errors import ItmrtError

Range = tuple[int, int, int]
Shapes = dict[str, tuple[list[int], list[int], list[int]]]
BATCH_AXES = (BATCH_IMAGES, BATCH_CAPTIONS)


@dataclass(frozen=True)
class Board:
    """A device class: memory, whether the GPU shares it with the CPU, the budgets used on it."""

    description: str
    memory_gb: float
    unified_memory: bool
    intermediate_mb: int | None  # budget for the largest intermediate tensor; None: the manifest's ranges
    workspace_mb: int | None  # TensorRT's builder workspace cap; None: TensorRT's default (the device's memory)


BOARDS: dict[str, Board] = {
    "orin-nano": Board("Jetson Orin Nano (8 GB, unified memory)", 8, True, 32, 1024),
    "orin-nx": Board("Jetson Orin NX (16 GB, unified memory)", 16, True, 64, 1024),
    "agx-orin": Board("Jetson AGX Orin (32 or 64 GB, unified memory)", 32, True, 160, 1024),
    "data-centre": Board("a data-centre GPU (40 GB or more of its own memory)", 40, False, None, None),
}


def board(name: str) -> Board:
    if name not in BOARDS:
        raise ItmrtError(f"unknown board {name!r}; choose one of {', '.join(BOARDS)}")
    return BOARDS[name]


def manifest_ranges(graph_entry: GraphEntry) -> dict[str, Range]:
    return {axis: (r.min, r.opt, r.max) for axis, r in graph_entry.shape_ranges.items()}


def check_range(axis: str, value: Range) -> Range:
    minimum, opt, maximum = value
    if not 1 <= minimum <= opt <= maximum:
        raise ItmrtError(f"axis '{axis}': need 1 <= min <= opt <= max, got {minimum}:{opt}:{maximum}")
    return value


def profile_shapes(graph_entry: GraphEntry, overrides: dict[str, Range]) -> Shapes:
    """min/opt/max shape of every input: fixed dims as they are, symbolic ones from the ranges (or overrides)."""
    ranges = {**manifest_ranges(graph_entry), **overrides}
    shapes: Shapes = {}
    for value in graph_entry.inputs:
        low: list[int] = []
        mid: list[int] = []
        high: list[int] = []
        for dim in value.shape:
            if isinstance(dim, int):
                low.append(dim)
                mid.append(dim)
                high.append(dim)
                continue
            if dim not in ranges:
                raise ItmrtError(
                    f"input '{value.name}' has axis '{dim}' with no range; pass it with --shape {dim}=MIN:OPT:MAX"
                )
            minimum, opt, maximum = check_range(dim, ranges[dim])
            low.append(minimum)
            mid.append(opt)
            high.append(maximum)
        shapes[value.name] = (low, mid, high)
    return shapes


def largest_intermediate(onnx_path: Path, input_shapes: dict[str, list[int]]) -> tuple[int, str]:
    """Bytes and name of the largest tensor ``onnx_path`` computes for these input shapes (ONNX shape
    inference with data propagation; tensors whose shape it cannot resolve are not counted)."""
    import numpy as np
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for value in model.graph.input:
        if value.name not in input_shapes:
            continue
        for dim, size in zip(value.type.tensor_type.shape.dim, input_shapes[value.name]):
            dim.ClearField("dim_param")
            dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    best = (0, "")
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
        if not dims or min(dims) <= 0 or tensor.elem_type == onnx.TensorProto.UNDEFINED:
            continue
        size = int(np.prod(dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
        best = max(best, (size, value.name))
    return best


def max_input_shapes(graph_entry: GraphEntry, ranges: dict[str, Range]) -> dict[str, list[int]]:
    return {name: high for name, (_low, _mid, high) in profile_shapes(graph_entry, ranges).items()}


def estimate_peaks(folder: Path, graphs: dict[str, tuple[str, GraphEntry]], ranges: dict[str, Range]) -> dict[str, int]:
    """Largest intermediate (bytes) of each graph at the profile's maximum shapes.

    ``graphs``: graph name -> (bundle-relative ONNX file, its manifest graph entry).
    """
    return {
        name: largest_intermediate(folder / file, max_input_shapes(entry, ranges))[0]
        for name, (file, entry) in graphs.items()
    }


def fit_ranges(
    folder: Path, graphs: dict[str, tuple[str, GraphEntry]], ranges: dict[str, Range], budget_bytes: int
) -> tuple[dict[str, Range], int]:
    """``ranges`` with the batch axes' maxima halved (the larger first) until every graph's largest
    intermediate is within ``budget_bytes``; returns them and the largest intermediate left."""
    fitted = dict(ranges)
    while True:
        peak = max(estimate_peaks(folder, graphs, fitted).values(), default=0)
        shrinkable = [axis for axis in BATCH_AXES if axis in fitted and fitted[axis][2] > fitted[axis][0]]
        if peak <= budget_bytes or not shrinkable:
            return fitted, peak
        axis = max(shrinkable, key=lambda name: fitted[name][2])
        minimum, opt, maximum = fitted[axis]
        smaller = max(minimum, maximum // 2)
        fitted[axis] = (minimum, min(opt, smaller), smaller)
