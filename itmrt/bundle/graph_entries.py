"""Manifest entries read off an ONNX graph: its inputs' and outputs' signatures, its symbolic axes' ranges."""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import helper

from itmrt.bundle.manifest import AxisRange, GraphEntry, TensorSpec


def tensor_specs(values: Iterable[onnx.ValueInfoProto]) -> list[TensorSpec]:
    """Name, numpy dtype name and shape (ints, or symbolic axis names) of each graph input or output."""
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape: list[int | str] = [
            dim.dim_param if dim.HasField("dim_param") else int(dim.dim_value) for dim in tensor_type.shape.dim
        ]
        dtype = str(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(TensorSpec(name=value.name, dtype=dtype, shape=shape))
    return specs


def graph_entry(model: onnx.ModelProto, file: str, sha256: str, shape_ranges: dict[str, AxisRange]) -> GraphEntry:
    """The manifest entry of one graph: file, hash, input/output signatures, ranges of its symbolic axes."""
    inputs = tensor_specs(model.graph.input)
    axes = {dim for spec in inputs for dim in spec.shape if isinstance(dim, str)}
    return GraphEntry(
        file=file,
        sha256=sha256,
        inputs=inputs,
        outputs=tensor_specs(model.graph.output),
        shape_ranges={axis: shape_ranges[axis] for axis in sorted(axes) if axis in shape_ranges},
    )
