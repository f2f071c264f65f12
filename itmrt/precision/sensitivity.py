"""Which nodes must stay float32 in an FP16 graph: measured, not guessed.

Four kinds of FP32 island, each recorded with its reason:

``recurrent``
    Every GRU, LSTM and RNN node. TensorRT's ONNX parser expands them into
    loops whose initial hidden state, ``1 - z`` constant and padded-step zeros
    it creates as FP32 constants (onnx-tensorrt ``onnxOpImporters.cpp``
    ``DEFINE_BUILTIN_OP_IMPORTER(GRU)``, ``RNNHelpers.cpp``
    ``clearMissingSequenceElements``); with FLOAT16 weights and inputs, a
    strongly typed network - which inserts no casts - would mix the two types.
    Kept in float32 (Casts at their borders), they parse the same as the fp32 graph.
``decision``
    NAAF's branch decisions: the node that subtracts the frozen threshold
    (float16 would move the threshold itself: 0.1234567 becomes 0.12347) and
    every float comparison (``Less``/``Greater``...) that picks a branch. They
    are cheap elementwise ops; keeping them exact keeps the decision boundary
    where the checkpoint put it.
``range``
    Nodes whose float32 outputs on the sample data come within
    ``range_headroom`` of float16's largest value (65504): sums of squares,
    unnormalised reductions and exponentials that overflow on real data.
``error``
    Per-op sensitivity. Errors are measured with float16 rounding kept on
    the CPU (:func:`itmrt.precision.fp16.emulation_graph`). Each candidate node is converted *alone* (every other
    candidate kept float32) and the graph's output error against float32 is
    measured; nodes whose own error exceeds ``node_tolerance`` stay float32.
    Then the whole graph is converted with the islands so far; while its error
    exceeds ``target_error`` the most sensitive remaining node joins them.

Candidates are the nodes that compute on floats; pure data movement
(Transpose, Unsqueeze, Where...) is exact in float16 and never measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from itmrt.bundle.manifest import NodeNote
from itmrt.precision.calib_data import Feeds, ort_session
from itmrt.precision.fp16 import ALWAYS_FLOAT32_OPS, convert_to_fp16, emulation_session, name_nodes
from itmrt.reports.comparator import worst_output_error

FLOAT16_MAX = 65504.0
EXACT_IN_FP16_OPS = frozenset(
    "Identity Unsqueeze Squeeze Reshape Transpose Flatten Shape Size Range Where Concat Slice Split Expand Tile "
    "Gather GatherElements Max Min Relu Neg Abs ConstantOfShape".split()
)
"""Ops whose float16 result is the float16 rounding of the exact result (no new error beyond their inputs')."""
COMPARISON_OPS = frozenset({"Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Equal"})
RECURRENT_OPS = frozenset({"GRU", "LSTM", "RNN"})


@dataclass(frozen=True)
class SensitivityOptions:
    target_error: float = 5e-3  # the whole graph's max abs output error against float32
    node_tolerance: float = 2.5e-3  # a single node's own error above this keeps it float32
    range_headroom: float = 0.125  # outputs above this share of 65504 keep their node float32


@dataclass
class SensitivityResult:
    islands: list[NodeNote]  # reason: recurrent | decision | range | error
    node_errors: dict[str, float] = field(default_factory=dict)  # candidate -> error when it alone is float16
    final_error: float = 0.0
    model: onnx.ModelProto | None = None  # the converted graph with these islands


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def candidate_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that compute on float tensors and whose float16 result can differ from the exact one."""
    types = _float_types(model)
    return [
        node
        for node in model.graph.node
        if node.op_type not in EXACT_IN_FP16_OPS
        and node.op_type not in ALWAYS_FLOAT32_OPS
        and any(types.get(name) == TensorProto.FLOAT for name in [*node.input, *node.output] if name)
    ]


def decision_nodes(model: onnx.ModelProto, threshold_initializer: str | None) -> list[onnx.NodeProto]:
    """The threshold subtraction and the float comparisons that choose NAAF's branches."""
    types = _float_types(model)
    chosen = []
    for node in model.graph.node:
        uses_threshold = threshold_initializer is not None and threshold_initializer in node.input
        float_comparison = node.op_type in COMPARISON_OPS and any(
            types.get(name) == TensorProto.FLOAT for name in node.input
        )
        if uses_threshold or float_comparison:
            chosen.append(node)
    return chosen


def run_model(model: onnx.ModelProto, feeds: Sequence[Feeds]) -> list[list[np.ndarray]]:
    """Outputs of ``model`` on each feed; float16 graphs run with their float16 rounding kept
    (:func:`itmrt.precision.fp16.emulation_session`), others as they are."""
    has_fp16 = any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer) or any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in node.attribute)
        for node in model.graph.node
    )
    session = emulation_session(model) if has_fp16 else ort_session(model.SerializeToString())
    return [session.run(None, dict(feed)) for feed in feeds]


def output_error(reference: list[list[np.ndarray]], model: onnx.ModelProto, feeds: Sequence[Feeds]) -> float:
    """Largest abs difference of any float output of ``model`` from ``reference`` over ``feeds`` (inf on NaN)."""
    return worst_output_error(reference, run_model(model, feeds))


def output_ranges(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], feeds: Sequence[Feeds]) -> dict[str, float]:
    """Largest abs value each node's float outputs take over ``feeds`` (one run with them exposed as outputs)."""
    types = _float_types(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {output.name for output in probe.graph.output}
    watched: dict[str, str] = {}
    for node in nodes:
        for name in node.output:
            if name and types.get(name) == TensorProto.FLOAT:
                watched[name] = node.name
                if name not in existing:
                    probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort_session(probe.SerializeToString())
    names = [output.name for output in session.get_outputs()]
    ranges: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(None, dict(feed))):
            if name in watched and value.size:
                node_name = watched[name]
                peak = float(np.nanmax(np.abs(value.astype(np.float64))))
                ranges[node_name] = max(ranges.get(node_name, 0.0), peak)
    return ranges


def choose_islands(
    model: onnx.ModelProto,
    feeds: Sequence[Feeds],
    threshold_initializer: str | None = None,
    options: SensitivityOptions | None = None,
) -> SensitivityResult:
    """Measure ``model`` on ``feeds`` and return the FP32 islands, the per-node errors and the final graph."""
    options = options or SensitivityOptions()
    named = name_nodes(model)
    reference = run_model(named, feeds)
    candidates = candidate_nodes(named)
    islands: dict[str, NodeNote] = {}
    for node in named.graph.node:
        if node.op_type in RECURRENT_OPS:
            islands[node.name] = NodeNote(node=node.name, op=node.op_type, reason="recurrent")
    for node in decision_nodes(named, threshold_initializer):
        islands[node.name] = NodeNote(node=node.name, op=node.op_type, reason="decision")
    limit = FLOAT16_MAX * options.range_headroom
    for node_name, peak in output_ranges(named, candidates, feeds).items():
        if peak > limit and node_name not in islands:
            op = next(node.op_type for node in candidates if node.name == node_name)
            islands[node_name] = NodeNote(node=node_name, op=op, reason="range", measured=peak)

    every_node = {node.name for node in named.graph.node}
    node_errors: dict[str, float] = {}
    for node in candidates:
        if node.name in islands:
            continue
        # Only this node in float16 (its inputs rounded, its output stored in float16): its own error.
        alone = convert_to_fp16(named, every_node - {node.name})
        node_errors[node.name] = output_error(reference, alone, feeds)
        if node_errors[node.name] > options.node_tolerance:
            islands[node.name] = NodeNote(
                node=node.name, op=node.op_type, reason="error", measured=node_errors[node.name]
            )

    ops = {node.name: node.op_type for node in candidates}
    converted = convert_to_fp16(named, islands)
    error = output_error(reference, converted, feeds)
    remaining = sorted((name for name in node_errors if name not in islands), key=lambda name: -node_errors[name])
    while error > options.target_error and remaining:
        name = remaining.pop(0)
        islands[name] = NodeNote(node=name, op=ops[name], reason="error", measured=node_errors[name])
        converted = convert_to_fp16(named, islands)
        error = output_error(reference, converted, feeds)
    ordered = [islands[node.name] for node in named.graph.node if node.name in islands]
    return SensitivityResult(ordered, node_errors, error, converted)
