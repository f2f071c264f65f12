"""Layer-level evidence of a built engine: the engine inspector's JSON and what it says about INT8.

Built with ``ProfilingVerbosity.DETAILED``, ``IEngineInspector.get_engine_information(
LayerInformationFormat.JSON)`` lists every layer of the engine: ``{"Layers": [{"Name",
"LayerType", "Inputs": [{"Name", "Dimensions", "Format/Datatype"}], "Outputs": [...],
"TacticName", ...}], "Bindings": [...]}`` (the format TensorRT's own engine explorer,
``tools/experimental/trt-engine-explorer``, reads). The file is kept in the bundle beside the
engine, and :func:`summarize_layers` reads two things from it:

- *unfused Q/DQ*: a ``Scale`` layer with INT8 on exactly one side is a Quantize or Dequantize
  TensorRT could not fuse into a neighbour (the rule of trex's ``QDQLinter``);
- for each ``MatMul`` node of the ONNX graph, the layer that carries its name and whether that
  layer reads INT8: whether the scorer's activation-by-activation products really run in INT8.
  A node folded into a larger region (TensorRT's ``{ForeignNode[first...last]}`` layers name
  only its first and last nodes) is reported as not found by name.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

UNFUSED_QDQ_LAYER = "Scale"


def _formats(tensors: Any) -> list[str]:
    if not isinstance(tensors, list):
        return []
    return [str(t.get("Format/Datatype", "")) for t in tensors if isinstance(t, dict)]


def _is_int8(fmt: str) -> bool:
    return "int8" in fmt.lower()


def parse_layer_json(text: str) -> dict[str, Any]:
    """The inspector's JSON; an engine built without detailed verbosity lists names only."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("Layers"), list):
        raise TypeError("not TensorRT engine-inspector JSON (no 'Layers' list)")
    return data


def summarize_layers(data: dict[str, Any], matmul_nodes: list[str] | None = None) -> dict[str, Any]:
    """Layer counts by type, unfused Q/DQ layers, and the INT8-ness of each named MatMul node."""
    layers = data.get("Layers", [])
    detailed = [layer for layer in layers if isinstance(layer, dict)]
    summary: dict[str, Any] = {"layers": len(layers), "detailed": bool(layers) and len(detailed) == len(layers)}
    if not summary["detailed"]:
        return summary
    summary["layer_types"] = dict(sorted(Counter(str(layer.get("LayerType")) for layer in detailed).items()))
    unfused = []
    for layer in detailed:
        inputs, outputs = _formats(layer.get("Inputs")), _formats(layer.get("Outputs"))
        if (
            layer.get("LayerType") == UNFUSED_QDQ_LAYER
            and inputs
            and outputs
            and _is_int8(inputs[0]) != _is_int8(outputs[0])
        ):
            unfused.append({"layer": layer.get("Name"), "role": "dequantize" if _is_int8(inputs[0]) else "quantize"})
    summary["unfused_qdq"] = unfused
    summary["int8_layers"] = sum(
        1
        for layer in detailed
        if layer.get("LayerType") != UNFUSED_QDQ_LAYER and any(_is_int8(f) for f in _formats(layer.get("Inputs")))
    )
    if matmul_nodes is not None:
        summary["matmuls"] = [_matmul_entry(node, detailed) for node in matmul_nodes]
    return summary


def _matmul_entry(node: str, layers: list[dict[str, Any]]) -> dict[str, Any]:
    for layer in layers:
        if node and node in str(layer.get("Name", "")):
            inputs = _formats(layer.get("Inputs"))
            return {
                "node": node,
                "layer": layer.get("Name"),
                "layer_type": layer.get("LayerType"),
                "input_formats": inputs,
                "int8": any(_is_int8(f) for f in inputs),
            }
    return {"node": node, "layer": None, "layer_type": None, "input_formats": [], "int8": None}


def matmul_node_names(onnx_path: Any) -> list[str]:
    """Names of the graph's MatMul nodes (what the summary looks for in layer names)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name]
