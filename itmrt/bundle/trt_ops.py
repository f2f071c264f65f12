"""Will TensorRT 10's ONNX parser take this graph? A static check against its op table.

The table (``tensorrt10_onnx_ops.tsv``, shipped with the package; its first line
names its source, onnx-tensorrt's operator support document for TensorRT 10.0)
lists, per ONNX op, whether the parser supports it and for which element types.
The check runs shape inference, then for every node verifies that the op is supported and
that the element type of each of its data inputs and outputs is in the op's
list. Index, shape and mask tensors (Gather's indices, an RNN's
``sequence_lens``, a Reshape's shape, a comparison's boolean output, ...) are
not what the table's type column describes; they are checked against the small
per-position sets in :data:`_SIDE_TENSOR_TYPES` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from itmrt.errors import ItmrtError, first_line

OPS_TABLE = Path(__file__).with_name("tensorrt10_onnx_ops.tsv")
# TensorRT 10.0's parser reads opsets 9 to 20 (onnx-tensorrt docs/operators.md).
TRT_MIN_OPSET = 9
TRT_MAX_OPSET = 20

# ONNX element types as the table spells them.
ONNX_TYPE_NAMES: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "FP64",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.INT16: "INT16",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.STRING: "STRING",
    TensorProto.COMPLEX64: "COMPLEX64",
    TensorProto.COMPLEX128: "COMPLEX128",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4",
    TensorProto.UINT4: "UINT4",
}
# Typos in the source table, read as what they evidently mean.
_TYPE_TYPOS = {"INF64": "INT64"}

_INDEX = frozenset({"INT32", "INT64"})
_BOOL = frozenset({"BOOL"})
_FLOATS = frozenset({"FP32", "FP16", "BF16"})
_QUANTIZED = frozenset({"INT8", "UINT8", "FP8", "INT4"})
_REDUCE_OPS = (
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare"
).split()

# (op, "in"/"out", position) -> allowed types, for tensors outside the op's data type.
_SIDE_TENSOR_TYPES: dict[tuple[str, str, int], frozenset[str]] = {
    **{(op, "in", 1): _INDEX for op in ("Gather", "GatherElements", "GatherND", "Reshape", "Expand", "Tile")},
    **{(op, "in", 1): _INDEX for op in ("Squeeze", "Unsqueeze", "Split", "CumSum", "Trilu", "TopK", *_REDUCE_OPS)},
    **{(op, "in", 1): _INDEX for op in ("Scatter", "ScatterElements", "ScatterND")},
    **{(op, "in", 4): _INDEX for op in ("GRU", "LSTM", "RNN")},  # sequence_lens
    **{("Slice", "in", k): _INDEX for k in (1, 2, 3, 4)},
    **{("Pad", "in", k): _INDEX for k in (1, 3)},
    **{("Resize", "in", k): _FLOATS | _INDEX for k in (1, 2, 3)},
    ("Upsample", "in", 1): _FLOATS,
    ("ConstantOfShape", "in", 0): _INDEX,
    ("OneHot", "in", 0): _INDEX,
    ("OneHot", "in", 1): _INDEX | _FLOATS,
    ("Where", "in", 0): _BOOL,
    ("If", "in", 0): _BOOL,
    ("Loop", "in", 0): _INDEX,
    ("Loop", "in", 1): _BOOL,
    ("Dropout", "in", 1): _FLOATS,
    ("Dropout", "in", 2): _BOOL,
    ("Dropout", "out", 1): _BOOL,
    ("TopK", "out", 1): _INDEX,
    **{(op, "out", 0): _INDEX for op in ("Shape", "Size", "ArgMax", "ArgMin", "NonZero")},
    **{(op, "out", 0): _BOOL for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "IsNaN", "IsInf")},
    ("QuantizeLinear", "in", 2): _QUANTIZED,
    ("QuantizeLinear", "out", 0): _QUANTIZED,
    ("DequantizeLinear", "in", 1): _FLOATS,
    ("DequantizeLinear", "in", 2): _QUANTIZED,
    ("DequantizeLinear", "out", 0): _FLOATS,
}


@dataclass(frozen=True)
class OpSupport:
    """One row of the table: is the op supported, and for which element types."""

    op: str
    supported: bool
    types: frozenset[str]


def load_op_table(path: str | Path | None = None) -> dict[str, OpSupport]:
    """Read the op table (tab-separated: op, Y/N, comma-separated types; ``#`` lines are comments)."""
    table_path = Path(path) if path is not None else OPS_TABLE
    if not table_path.is_file():
        raise ItmrtError(f"TensorRT op table {table_path} is missing: reinstall itmrt")
    table: dict[str, OpSupport] = {}
    for line in table_path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        op, flag = fields[0].strip(), fields[1].strip().upper() if len(fields) > 1 else "N"
        raw_types = fields[2] if len(fields) > 2 else ""
        types = {_TYPE_TYPOS.get(t.strip(), t.strip()) for t in raw_types.split(",") if t.strip()}
        table[op] = OpSupport(op, flag == "Y", frozenset(types))
    return table


@dataclass
class TrtCheckResult:
    """Outcome of :func:`check_trt_compat`: ``ok`` when no problem was found."""

    graph: str
    problems: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)  # op type -> node count

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self) -> str:
        """The problems, one per line (empty when the graph passes)."""
        return "\n".join(self.problems)

    def raise_for_problems(self) -> None:
        if self.problems:
            first = self.problems[0]
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            raise ItmrtError(f"{self.graph} will not compile with TensorRT 10: {first}{more}")


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def check_trt_compat(
    model: onnx.ModelProto, name: str = "graph", table: dict[str, OpSupport] | None = None
) -> TrtCheckResult:
    """Check every node of ``model`` against TensorRT 10's ONNX op table.

    Problems are lines of the form ``op 'X' (node 'name'): <why>``; graph-level
    problems (opset, failed shape inference) name the graph instead.
    """
    ops = table if table is not None else load_op_table()
    result = TrtCheckResult(graph=name)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not TRT_MIN_OPSET <= opset <= TRT_MAX_OPSET:
        result.problems.append(
            f"graph '{name}': opset {opset} is outside TensorRT 10's {TRT_MIN_OPSET}-{TRT_MAX_OPSET}"
        )
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        result.problems.append(f"graph '{name}': shape inference failed: {first_line(exc)}")
        inferred = model
    types = _element_types(inferred)
    for index, node in enumerate(inferred.graph.node):
        label = f"op '{node.op_type}' (node '{node.name or f'#{index}'}')"
        result.ops[node.op_type] = result.ops.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            result.problems.append(f"{label}: custom domain '{node.domain}' needs a TensorRT plugin")
            continue
        support = ops.get(node.op_type)
        if support is None:
            result.problems.append(f"{label}: not in TensorRT 10's ONNX op table")
            continue
        if not support.supported:
            result.problems.append(f"{label}: not supported by TensorRT 10's ONNX parser")
            continue
        for kind, names in (("in", node.input), ("out", node.output)):
            for position, tensor in enumerate(names):
                if not tensor:
                    continue  # an omitted optional input/output
                elem_type = types.get(tensor)
                if elem_type is None:
                    result.problems.append(f"{label}: the type of {kind}put '{tensor}' could not be inferred")
                    continue
                type_name = ONNX_TYPE_NAMES.get(elem_type, f"type {elem_type}")
                allowed = _SIDE_TENSOR_TYPES.get((node.op_type, kind, position), support.types)
                if type_name not in allowed:
                    result.problems.append(
                        f"{label}: {kind}put {position} '{tensor}' is {type_name}; "
                        f"supported: {', '.join(sorted(allowed)) or 'none'}"
                    )
    return result
