"""A small helper for writing ONNX graphs op by op with ``onnx.helper``.

The converters in ``graphs_*.py`` build every graph explicitly from the torch
modules' weights instead of tracing them: each op, each dtype (int32 lengths)
and each masked reduction is then chosen on purpose, and nothing depends on how
``torch.onnx`` happens to trace packed sequences. :class:`GraphBuilder` hides
only the bookkeeping (unique names, initializers, the opset-dependent form of
reduction axes) so a converter reads like the model's ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from itmrt.errors import ItmrtError

MIN_OPSET = 17
FLOAT = TensorProto.FLOAT
INT32 = TensorProto.INT32
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL
# Most negative finite float32: a masked entry of a softmax or max (finite, so a
# fully masked row gives no NaN; an FP16 conversion clips it to -65504).
FLOAT32_LOWEST = float(np.finfo(np.float32).min)

# Reductions whose ``axes`` became an input (instead of an attribute) in opset 18.
_AXES_INPUT_SINCE_18 = {
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}

Dim = int | str


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self, name: str, opset: int) -> None:
        if opset < MIN_OPSET:
            raise ItmrtError(f"opset {opset} is too old: TensorRT-ready graphs need opset {MIN_OPSET} or later")
        if opset > onnx.defs.onnx_opset_version():
            raise ItmrtError(
                f"opset {opset} is newer than this onnx package supports ({onnx.defs.onnx_opset_version()})"
            )
        self.name = name
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._used: set[str] = set()
        self._constants: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    # -- names -------------------------------------------------------------
    def _unique(self, hint: str) -> str:
        name = hint
        counter = 1
        while name in self._used:
            name = f"{hint}_{counter}"
            counter += 1
        self._used.add(name)
        return name

    # -- graph interface ---------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        """Expose ``value`` as graph output ``name`` (an Identity when the names differ)."""
        if value != name:
            self._used.add(name)
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self._unique(f"{name}_identity")))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def initializer(self, array: np.ndarray, name: str) -> str:
        """A named weight; ``name`` is kept exactly (it must be unique)."""
        if name in self._used:
            raise ValueError(f"initializer name {name!r} is already used")
        self._used.add(name)
        self.initializers.append(numpy_helper.from_array(_c_order(array), name))
        return name

    def const(self, value: float | int | Sequence[int] | Sequence[float] | np.ndarray, dtype: type = np.float32) -> str:
        """An anonymous constant initializer (deduplicated by value)."""
        array: np.ndarray = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._constants:
            name = self._unique("const")
            self.initializers.append(numpy_helper.from_array(_c_order(array), name))
            self._constants[key] = name
        return self._constants[key]

    def op(
        self, op_type: str, inputs: Sequence[str], hint: str | None = None, out: str | None = None, **attrs: Any
    ) -> str:
        """Add one single-output node and return its output name."""
        output = out if out is not None else self._unique(hint or op_type.lower())
        if out is not None:
            self._used.add(out)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [output], name=self._unique(f"{hint or op_type}_node"), **attrs)
        )
        return output

    def op_multi(self, op_type: str, inputs: Sequence[str], num_outputs: int, hint: str, **attrs: Any) -> list[str]:
        """Add a node with several outputs (an empty string skips an optional one)."""
        outputs = [self._unique(f"{hint}_out{k}") for k in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=self._unique(f"{hint}_node"), **attrs))
        return outputs

    # -- common patterns ---------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool, hint: str | None = None) -> str:
        """A Reduce* op in the form this opset wants (axes as input from opset 13/18 on)."""
        axes_list = [int(a) for a in axes]
        if op_type == "ReduceSum" or (op_type in _AXES_INPUT_SINCE_18 and self.opset >= 18):
            return self.op(op_type, [x, self.const(axes_list, np.int64)], hint, keepdims=int(keepdims))
        return self.op(op_type, [x], hint, axes=axes_list, keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int], hint: str | None = None) -> str:
        return self.op("Unsqueeze", [x, self.const(list(axes), np.int64)], hint)

    def squeeze(self, x: str, axes: Sequence[int], hint: str | None = None) -> str:
        return self.op("Squeeze", [x, self.const(list(axes), np.int64)], hint)

    def transpose(self, x: str, perm: Sequence[int], hint: str | None = None) -> str:
        return self.op("Transpose", [x], hint, perm=list(perm))

    def where(self, condition: str, x: str, y: str, hint: str | None = None) -> str:
        return self.op("Where", [condition, x, y], hint)

    def l2norm(self, x: str, axis: int = -1, eps: float = 1e-8, hint: str = "l2norm") -> str:
        """``x / (sqrt(sum x^2) + eps)`` along ``axis`` (docs/models.md: epsilon after the root)."""
        squares = self.op("Mul", [x, x], f"{hint}_sq")
        norm = self.op("Sqrt", [self.reduce("ReduceSum", squares, [axis], True, f"{hint}_sum")], f"{hint}_root")
        return self.op("Div", [x, self.op("Add", [norm, self.const(eps)], f"{hint}_den")], hint)

    def dim_as_int32(self, x: str, axis: int, hint: str) -> str:
        """The size of ``x`` along ``axis`` as an int32 scalar (shape arithmetic kept in int32)."""
        shape = self.op("Shape", [x], f"{hint}_shape")
        size = self.op("Gather", [shape, self.const(axis, np.int64)], f"{hint}_int64", axis=0)
        return self.op("Cast", [size], hint, to=INT32)

    def length_mask(self, lengths: str, like: str, axis: int, hint: str = "token_mask") -> str:
        """Boolean ``[B, L]``: position < lengths[b], with L the size of ``like`` along ``axis``.

        Range and Less run on int32, which TensorRT keeps on the device cheaply.
        """
        max_len = self.dim_as_int32(like, axis, f"{hint}_len")
        positions = self.op("Range", [self.const(0, np.int32), max_len, self.const(1, np.int32)], f"{hint}_positions")
        return self.op(
            "Less", [self.unsqueeze(positions, [0]), self.unsqueeze(lengths, [1])], hint
        )

    # -- result --------------------------------------------------------------
    def build(self, metadata: dict[str, str] | None = None, doc: str = "") -> onnx.ModelProto:
        """The checked model: ``onnx.checker`` (full) and strict shape inference must pass."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers, doc_string=doc)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="itmrt"
        )
        # The oldest IR version that carries this opset: readable by older ONNX Runtime / TensorRT parsers.
        model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key = key
            entry.value = value
        validate_model(model)
        return model


def _c_order(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy when needed; unlike ``np.ascontiguousarray`` keeps 0-d arrays 0-d."""
    return np.array(array, order="C", copy=not array.flags.c_contiguous)


def validate_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run ``onnx.checker`` (full check) and strict shape inference; return the inferred model."""
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
