"""Where Q/DQ pairs go in an int8 graph, and the checks that they went there.

TensorRT's explicit quantization (Developer Guide, "Working with Quantized
Types": Q/DQ placement recommendations and Q/DQ fusion) runs a product in INT8
when a DequantizeLinear feeds each of its inputs; it moves a DequantizeLinear
forward past data-movement layers (Reshape, Transpose, Squeeze, Unsqueeze) to
fuse it into the product. It keeps a DequantizeLinear unfused - a separate
pass that rounds once more - when its output also feeds an elementwise layer,
or when the same data is quantized a second time, with another scale, after a
reshape or transpose. So here:

- each product input (MatMul/Gemm/Conv inputs 0 and 1) is traced back through
  data-movement ops (:data:`PASS_THROUGH_OPS`) to its *origin*, the tensor
  that last changed values;
- each origin is quantized once (one QuantizeLinear, one DequantizeLinear,
  symmetric, zero point 0, scale ``amax / 127`` from its calibrated range, or
  per output channel for a constant weight), before any reshape or transpose;
- the DequantizeLinear output feeds only the path to the products: the
  reshapes and transposes on that path are cloned where their float originals
  also feed other ops, which keep reading the float tensor;
- nothing is quantized on a product's output for its own sake (a product's
  output is quantized only where it is the input of another product).

:func:`placement_problems` checks these rules on any Q/DQ graph (the old
placement, ONNX Runtime's ``quantize_static`` around every product input and
output, fails them; ``tests/test_precision_qdq.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
PASS_THROUGH_OPS = frozenset({"Identity", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Flatten"})
INT8_MAX = 127.0


@dataclass(frozen=True)
class ProductInput:
    """One float input of a quantized product: where its values come from, and the data-movement path."""

    node: str  # the product
    position: int  # its input index
    origin: str  # the tensor the path starts from
    path: tuple[str, ...]  # pass-through node names from the origin to the product, in order


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output if name}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                found.setdefault(name, []).append(node)
    return found


def trace_origin(model: onnx.ModelProto, tensor: str) -> tuple[str, tuple[str, ...]]:
    """``tensor``'s origin through data-movement ops (their data input, input 0) and the path's nodes."""
    producers = _producers(model)
    path: list[str] = []
    while tensor in producers and producers[tensor].op_type in PASS_THROUGH_OPS:
        node = producers[tensor]
        path.append(node.name)
        tensor = node.input[0]
    return tensor, tuple(reversed(path))


def product_inputs(model: onnx.ModelProto, nodes: Iterable[str]) -> list[ProductInput]:
    """The float inputs (0 and 1) of the named products, each traced to its origin."""
    by_name = {node.name: node for node in model.graph.node}
    found = []
    for name in nodes:
        node = by_name[name]
        for position in (0, 1):
            if position < len(node.input) and node.input[position]:
                origin, path = trace_origin(model, node.input[position])
                found.append(ProductInput(name, position, origin, path))
    return found


def symmetric_scale(lowest: float, highest: float) -> float:
    """TensorRT's symmetric int8 scale for a calibrated range: ``amax / 127`` (never 0)."""
    amax = max(abs(float(lowest)), abs(float(highest)))
    return amax / INT8_MAX if amax > 0 and np.isfinite(amax) else 1.0 / INT8_MAX


def _weight_axis(node: onnx.NodeProto, position: int, rank: int) -> int | None:
    """The output-channel axis of a constant weight input (per-channel scales), or None for per-tensor."""
    if position != 1 or rank < 2:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1 if rank == 2 else None  # MatMul [K, N]: one scale per output column


def _quantized_weight(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and their scales (per channel along ``axis``, else one), symmetric round-to-nearest."""
    if axis is None:
        scale = np.array(symmetric_scale(values.min(), values.max()), dtype=np.float32)
        return np.clip(np.rint(values / scale), -INT8_MAX, INT8_MAX).astype(np.int8), scale
    moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    scale = np.array([symmetric_scale(row.min(), row.max()) for row in moved], dtype=np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    quantized = np.clip(np.rint(values / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return quantized, scale


@dataclass
class _Builder:
    """Accumulates the new nodes and initializers of one Q/DQ insertion."""

    model: onnx.ModelProto
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    used: set[str]

    def fresh(self, base: str) -> str:
        name = base
        while name in self.used:
            name += "_"
        self.used.add(name)
        return name

    def constant(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name


def insert_qdq(
    model: onnx.ModelProto, quantize: Iterable[str], ranges: dict[str, tuple[float, float]]
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with the named products' inputs quantized once at their origins; the names of the
    nodes added (Q, DQ and the cloned data-movement paths: what must stay in float32 around the products).

    ``ranges``: calibrated ``(lowest, highest)`` by tensor name; an origin's range is its own, or that of any
    tensor on its path (data movement keeps the values).
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {init.name: init for init in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    used = {n for node in graph.node for n in [*node.input, *node.output, node.name]} | set(initializers)
    build = _Builder(result, [], [], used)
    dequantized: dict[str, str] = {}  # origin -> its DequantizeLinear output
    cloned: dict[tuple[str, str], str] = {}  # (path node, its dequantized input) -> the clone's output
    for item in product_inputs(result, quantize):
        if item.origin not in dequantized:
            dequantized[item.origin] = _quantize_origin(build, item, by_name, initializers, ranges)
        tensor = dequantized[item.origin]
        for step in item.path:
            key = (step, tensor)
            if key not in cloned:
                cloned[key] = _clone_step(build, by_name[step], tensor)
            tensor = cloned[key]
        by_name[item.node].input[item.position] = tensor
    graph.initializer.extend(build.initializers)
    _insert_before_consumers(graph, build.nodes)
    _drop_dead_nodes(graph)
    return result, [node.name for node in build.nodes]


def _quantize_origin(build: _Builder, item: ProductInput, by_name: dict[str, onnx.NodeProto],
                     initializers: dict[str, onnx.TensorProto], ranges: dict[str, tuple[float, float]]) -> str:
    """Q and DQ nodes for ``item.origin`` (only a DQ of int8 values for a constant); the DQ output's name."""
    origin = item.origin
    dq_output = build.fresh(f"{origin}__dequantized")
    if origin in initializers and not item.path:
        values = numpy_helper.to_array(initializers[origin]).astype(np.float32)
        axis = _weight_axis(by_name[item.node], item.position, values.ndim)
        quantized, scale = _quantized_weight(values, axis)
        inputs = [
            build.constant(f"{origin}__int8", quantized),
            build.constant(f"{origin}__scale", scale),
            build.constant(f"{origin}__zero_point", np.zeros(scale.shape, dtype=np.int8)),
        ]
        attributes: dict[str, Any] = {"axis": axis} if axis is not None else {}
        build.nodes.append(helper.make_node("DequantizeLinear", inputs, [dq_output],
                                            name=build.fresh(f"{origin}__dq"), **attributes))
        return dq_output
    lowest, highest = _origin_range(item, by_name, ranges)
    scale_name = build.constant(f"{origin}__scale", np.array(symmetric_scale(lowest, highest), dtype=np.float32))
    zero_name = build.constant(f"{origin}__zero_point", np.array(0, dtype=np.int8))
    q_output = build.fresh(f"{origin}__quantized")
    build.nodes.append(helper.make_node("QuantizeLinear", [origin, scale_name, zero_name], [q_output],
                                        name=build.fresh(f"{origin}__q")))
    build.nodes.append(helper.make_node("DequantizeLinear", [q_output, scale_name, zero_name], [dq_output],
                                        name=build.fresh(f"{origin}__dq")))
    return dq_output


def _origin_range(item: ProductInput, by_name: dict[str, onnx.NodeProto],
                  ranges: dict[str, tuple[float, float]]) -> tuple[float, float]:
    candidates = [item.origin, *(by_name[step].output[0] for step in item.path),
                  by_name[item.node].input[item.position]]
    for name in candidates:
        if name in ranges:
            return ranges[name]
    raise ValueError(f"no calibrated range for {item.origin} (input {item.position} of {item.node})")


def _clone_step(build: _Builder, node: onnx.NodeProto, data_input: str) -> str:
    """A copy of data-movement ``node`` reading ``data_input``; its output's name."""
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    clone.name = build.fresh(f"{node.name}__int8_path")
    clone.input[0] = data_input
    del clone.output[:]
    output = build.fresh(f"{node.output[0]}__int8_path")
    clone.output.append(output)
    build.nodes.append(clone)
    return output


def _insert_before_consumers(graph: onnx.GraphProto, added: list[onnx.NodeProto]) -> None:
    """Put the added nodes into ``graph`` in a topological order (each after what it reads)."""
    nodes = list(graph.node) + added
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    ordered: list[onnx.NodeProto] = []
    pending = nodes
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ValueError("the Q/DQ graph has a cycle or reads a tensor nothing produces")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [node for node in pending if node not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove data-movement nodes whose outputs nothing reads any more (paths now cloned), then the
    initializers nothing reads (float weights now stored as int8)."""
    outputs = {value.name for value in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node
                if node.op_type in PASS_THROUGH_OPS and not any(name in read for name in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    unread = [init for init in graph.initializer if init.name not in read]
    for init in unread:
        graph.initializer.remove(init)


# -- checks ------------------------------------------------------------------------------------------------


def placement_problems(model: onnx.ModelProto) -> list[str]:
    """Where a Q/DQ graph breaks the placement rules (empty when it keeps them): a dequantized tensor that
    reaches anything but a product through data movement, or a tensor quantized again after data movement
    from a dequantized one."""
    producers, consumers = _producers(model), _consumers(model)
    problems = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            problems.extend(_dequantized_reach(node, consumers))
        elif node.op_type == "QuantizeLinear":
            origin, _path = trace_origin(model, node.input[0])
            source = producers.get(origin)
            if source is not None and source.op_type == "DequantizeLinear":
                problems.append(f"{node.input[0]} is quantized again after {source.name} (quantized twice)")
    return problems


def _dequantized_reach(dequantize: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> list[str]:
    problems = []
    frontier = list(dequantize.output)
    while frontier:
        tensor = frontier.pop()
        for consumer in consumers.get(tensor, []):
            if consumer.op_type in PASS_THROUGH_OPS:
                frontier.extend(consumer.output)
            elif consumer.op_type not in QUANTIZED_OPS:
                problems.append(f"{dequantize.name} feeds {consumer.op_type} {consumer.name} (not a product)")
    return problems


def quantized_products(model: onnx.ModelProto) -> list[str]:
    """Products whose inputs 0 and 1 each come from a DequantizeLinear through data movement only."""
    producers = _producers(model)
    found = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2:
            continue
        origins = [trace_origin(model, name)[0] for name in node.input[:2]]
        if all(origin in producers and producers[origin].op_type == "DequantizeLinear" for origin in origins):
            found.append(node.name)
    return found
