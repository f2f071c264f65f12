"""FP16 graphs with FP32 islands, made with onnxconverter-common's float16 converter.

The converter turns every float32 tensor and initializer into float16, keeps
the graph's inputs and outputs float32 (``keep_io_types``: callers feed and read
what the fp32 graph takes), and leaves the nodes in ``node_block_list`` in
float32 with Casts at their borders. Which nodes those are is decided by
:mod:`itmrt.precision.sensitivity`; this module only converts and checks.

``Cast`` nodes are always kept as they are: the converter changes the type of
a Cast's output value but not the Cast's ``to`` attribute, so a converted
``Cast(int -> float)`` would contradict its own declared type. Kept in float32
it is followed by a converter-inserted Cast to float16, which is correct.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxconverter_common import float16

from itmrt.bundle.trt_ops import check_trt_compat
from itmrt.errors import ItmrtError, first_line
from itmrt.runtime.sessions import create_session

ALWAYS_FLOAT32_OPS = ("Cast",)


SMALL_CONSTANT = 1024  # elements; float initializers up to this size are copied per consumer


def _unshare_small_initializers(model: onnx.ModelProto) -> None:
    """Give every consumer of a small shared float initializer its own copy (in place).

    The converter decides per initializer whether it becomes float16; one
    shared by a float32 island and a float16 node would be wrong for one of
    them (ORT then rejects the graph's types). Scalars such as NAAF's lambda
    and the masks' 0.0 are shared like that.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    seen: dict[str, int] = {}
    used = {name for node in model.graph.node for name in node.output} | set(initializers)
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            init = initializers.get(name)
            if (init is None or init.data_type != onnx.TensorProto.FLOAT
                    or numpy_helper.to_array(init).size > SMALL_CONSTANT):
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1:
                continue
            copy_name = f"{name}__{node.name or node.op_type}_{position}"
            while copy_name in used:
                copy_name += "_"
            used.add(copy_name)
            duplicate = onnx.TensorProto()
            duplicate.CopyFrom(init)
            duplicate.name = copy_name
            model.graph.initializer.append(duplicate)
            node.input[position] = copy_name


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` ready for the converter: every node uniquely named (block lists address
    nodes by name) and small shared float constants copied per consumer."""
    named = copy.deepcopy(model)
    used = {node.name for node in named.graph.node if node.name}
    for index, node in enumerate(named.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in used:
                candidate += "_"
            node.name = candidate
            used.add(candidate)
    _unshare_small_initializers(named)
    return named


def convert_to_fp16(model: onnx.ModelProto, keep_float32: Iterable[str] = ()) -> onnx.ModelProto:
    """``model`` in float16 except the nodes named in ``keep_float32`` (and Casts); inputs/outputs stay float32."""
    source = name_nodes(model)
    known = {node.name for node in source.graph.node}
    blocked = sorted(
        set(keep_float32) | {node.name for node in source.graph.node if node.op_type in ALWAYS_FLOAT32_OPS}
    )
    missing = [name for name in blocked if name not in known]
    if missing:
        raise ItmrtError(
            f"FP32 island node(s) {', '.join(missing[:3])} are not in the graph; rebuild the precision graphs"
        )
    with warnings.catch_warnings():
        # Values outside float16's range (the -3.4e38 mask fill) are clipped to +-65504 with a warning; intended.
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(
            source,
            keep_io_types=True,
            disable_shape_infer=False,
            node_block_list=blocked,
            op_block_list=[],  # by name, not by op type: the converter's own inserted Casts must not match
        )
    _restore_float32_outputs(converted, source)
    _drop_cast_round_trips(converted)
    return converted


def _cast_target(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _restore_float32_outputs(converted: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Make every graph output that was float32 in ``source`` float32 again (in place).

    With ``keep_io_types`` the converter still casts the output of a *blocked*
    last node to float16; the float32 island would then be rounded at the
    very end. A Cast to float16 that produces the output becomes a Cast to
    float32 (a no-op on a float32 input); any other float16 output gets a
    Cast to float32 appended.
    """
    wanted = {o.name for o in source.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    producers = {name: node for node in converted.graph.node for name in node.output}
    for output in converted.graph.output:
        if output.name not in wanted:
            continue
        producer = producers.get(output.name)
        if producer is not None and _cast_target(producer) == onnx.TensorProto.FLOAT16:
            for attribute in producer.attribute:
                if attribute.name == "to":
                    attribute.i = onnx.TensorProto.FLOAT
        elif output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            raw = f"{output.name}__fp16"
            if producer is not None:
                producer.output[list(producer.output).index(output.name)] = raw
            converted.graph.node.append(
                onnx.helper.make_node("Cast", [raw], [output.name], name=f"{output.name}__to_float32",
                                      to=onnx.TensorProto.FLOAT)
            )
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def _drop_cast_round_trips(model: onnx.ModelProto) -> None:
    """Remove float32 -> float16 -> float32 Cast pairs (in place).

    The converter casts a float32 island's outputs to float16 and back for
    the next island; between two islands that round trip only loses
    precision. The second Cast is pointed at the float32 original, then
    every Cast whose input already has its target type is bypassed (its
    readers read its input; one that writes a graph output stays), and
    Casts left without consumers are deleted. So two float32 nodes stay
    directly connected - an int8 graph's DequantizeLinear feeds its product
    with nothing between them (:mod:`itmrt.precision.qdq`).
    """
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info]}
    types.update({init.name: init.data_type for init in graph.initializer})
    producers = {name: node for node in graph.node for name in node.output}
    for node in graph.node:
        if _cast_target(node) != onnx.TensorProto.FLOAT:
            continue
        first = producers.get(node.input[0])
        if (first is not None and _cast_target(first) == onnx.TensorProto.FLOAT16
                and types.get(first.input[0]) == onnx.TensorProto.FLOAT):
            node.input[0] = first.input[0]
    outputs = {o.name for o in graph.output}
    _bypass_no_op_casts(graph, types, outputs)
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if node.op_type == "Cast" and not any(o in used for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)


def _bypass_no_op_casts(graph: onnx.GraphProto, types: dict[str, int], outputs: set[str]) -> None:
    """Point the readers of every Cast to float whose input is already that type at the Cast's input."""
    replaced: dict[str, str] = {}
    for node in graph.node:
        target = _cast_target(node)
        if target in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and node.output[0] not in outputs:
            source = replaced.get(node.input[0], node.input[0])
            if types.get(source) == target:
                replaced[node.output[0]] = source
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in replaced:
                node.input[position] = replaced[name]


VELTKAMP_SPLITTER = float(2**13 + 1)  # float32 has 24 significant bits, float16 11: split off 13
FLOAT16_ROUNDS_TO_INF = 65520.0  # float16 rounds |x| >= 65520 to infinity


SPLITTER_INITIALIZER = "__fp16_splitter"


def significand_rounding_nodes(raw: str, rounded: str) -> list[onnx.NodeProto]:
    """float32 nodes that round ``raw`` to 11 significant bits - float16's significand, and TF32's - and
    write it to ``rounded`` (Veltkamp splitting; needs the :data:`SPLITTER_INITIALIZER` initializer,
    :data:`VELTKAMP_SPLITTER`). The exponent range stays float32's."""
    make = onnx.helper.make_node
    return [
        make("Mul", [raw, SPLITTER_INITIALIZER], [f"{rounded}__t"]),
        make("Sub", [f"{rounded}__t", raw], [f"{rounded}__t_minus_x"]),
        make("Sub", [f"{rounded}__t", f"{rounded}__t_minus_x"], [rounded]),
    ]


def _rounding_nodes(raw: str, name: str) -> list[onnx.NodeProto]:
    """float32 nodes that round ``raw`` to the nearest float16 value (infinite beyond float16's range)."""
    make = onnx.helper.make_node
    return [
        *significand_rounding_nodes(raw, f"{name}__rounded"),
        make("Abs", [f"{name}__rounded"], [f"{name}__abs"]),
        make("GreaterOrEqual", [f"{name}__abs", "__fp16_overflow"], [f"{name}__overflows"]),
        make("Mul", [f"{name}__rounded", "__fp16_inf"], [f"{name}__infinite"]),
        make("Where", [f"{name}__overflows", f"{name}__infinite", f"{name}__rounded"], [name]),
    ]


def emulation_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 graph that computes what the FP16 graph ``model`` computes, rounding included.

    ONNX Runtime's CPU provider has no float16 kernel for most ops: it runs
    them in float32 between Casts it inserts and drops the Cast pairs that
    meet, so a chain of float16 ops silently runs in float32 and a measured
    error would be far too small. Here every float16 tensor becomes float32
    and is explicitly rounded to the nearest float16 value (Veltkamp
    splitting, then +-inf beyond 65504) right where the FP16 graph stores
    it: what a float16 engine stores, each op computing internally in float32
    as TensorRT's FP16 kernels accumulate. Float16 subnormals (below 6.1e-5)
    keep float32 precision here.
    """
    emulated = copy.deepcopy(model)
    inferred = onnx.shape_inference.infer_shapes(emulated)
    graph = emulated.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(VELTKAMP_SPLITTER, dtype=np.float32), SPLITTER_INITIALIZER),
            numpy_helper.from_array(np.array(FLOAT16_ROUNDS_TO_INF, dtype=np.float32), "__fp16_overflow"),
            numpy_helper.from_array(np.array(np.inf, dtype=np.float32), "__fp16_inf"),
        ]
    )
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT16:
                attribute.i = onnx.TensorProto.FLOAT
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == onnx.TensorProto.FLOAT16:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float32)))
        for position, name in enumerate(node.output):
            if name and types.get(name) == onnx.TensorProto.FLOAT16:
                raw = f"{name}__exact"
                node.output[position] = raw
                nodes.extend(_rounding_nodes(raw, name))
    del graph.node[:]
    graph.node.extend(nodes)
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return emulated


def emulation_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """ONNX Runtime CPU session of :func:`emulation_graph` (optimisations off: they could fold the rounding)."""
    return create_session(emulation_graph(model).SerializeToString(), optimization="disable")


def verify_precision_graph(model: onnx.ModelProto, name: str) -> None:
    """``onnx.checker`` and TensorRT 10's op/type check; raises a one-line :class:`ItmrtError` on a problem."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ItmrtError(f"{name} is not a valid ONNX model after conversion: {first_line(exc)}") from None
    check_trt_compat(model, name).raise_for_problems()


def float32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of a converted graph that compute in float32: every float tensor they read
    or write is float32 (comparisons included: they write booleans but read floats)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    chosen = []
    for node in graph.node:
        kinds = {types.get(name) for name in [*node.input, *node.output] if name and types.get(name) in floats}
        if node.op_type != "Cast" and kinds == {onnx.TensorProto.FLOAT}:
            chosen.append(node.name)
    return chosen
