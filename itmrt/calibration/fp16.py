"""FP16 graphs with FP32 islands, made with onnxconverter-common's float16 converter.

The converter turns every float32 tensor and initializer into float16, keeps
the graph's inputs and outputs float32 (``keep_io_types``: callers feed and read
what the fp32 graph takes), and leaves the nodes in ``node_block_list`` in
float32 with Casts at their borders. Which nodes those are is decided by
:mod:`itmrt.calibration.sensitivity`; this module only converts and checks.

``Cast`` nodes are always kept as they are: the converter changes the type of
a Cast's output value but not the Cast's ``to`` attribute, so a converted
``Cast(int -> float)`` would contradict its own declared type. Kept in float32
it is followed by a converter-inserted Cast to float16, which is correct.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import onnx
from onnxconverter_common import float16

from itmrt.errors import ItmrtError
from itmrt.export.trt_ops import check_trt_compat

ALWAYS_FLOAT32_OPS = ("Cast",)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where every node has a unique name (block lists address nodes by name)."""
    named = copy.deepcopy(model)
    used = {node.name for node in named.graph.node if node.name}
    for index, node in enumerate(named.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in used:
                candidate += "_"
            node.name = candidate
            used.add(candidate)
    return named


def convert_to_fp16(model: onnx.ModelProto, keep_float32: Iterable[str] = ()) -> onnx.ModelProto:
    """``model`` in float16 except the nodes named in ``keep_float32`` (and Casts); inputs/outputs stay float32."""
    source = name_nodes(model)
    known = {node.name for node in source.graph.node}
    blocked = sorted(set(keep_float32))
    missing = [name for name in blocked if name not in known]
    if missing:
        raise ItmrtError(f"FP32 island node(s) {', '.join(missing[:3])} are not in the graph; rebuild the precision graphs")
    with warnings.catch_warnings():
        # Values outside float16's range (the -3.4e38 mask fill) are clipped to +-65504 with a warning; intended.
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(
            source,
            keep_io_types=True,
            disable_shape_infer=False,
            node_block_list=blocked,
            op_block_list=list(ALWAYS_FLOAT32_OPS),
        )
    return converted


def verify_precision_graph(model: onnx.ModelProto, name: str) -> None:
    """``onnx.checker`` and TensorRT 10's op/type check; raises a one-line :class:`ItmrtError` on a problem."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ItmrtError(f"{name} is not a valid ONNX model after conversion: {first}") from None
    check_trt_compat(model, name).raise_for_problems()


def float32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of a converted graph that compute in float32 (for reports and tests)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    return [
        node.name
        for node in inferred.graph.node
        if node.op_type != "Cast" and any(types.get(output) == onnx.TensorProto.FLOAT for output in node.output)
    ]
