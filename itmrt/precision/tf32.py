"""What TF32 would do to a graph's outputs, measured on the CPU, and the record an engine build keeps of it.

TF32 (TensorRT's ``BuilderFlag::kTF32``, on by default; cuBLAS/cuDNN on
Ampere and later) rounds the inputs of float32 matrix products and
convolutions to 10 explicit mantissa bits - 11 significant bits, float16's
significand with float32's exponent range - and accumulates in float32.
:func:`tf32_emulation_graph` inserts exactly that rounding (round to nearest,
:func:`itmrt.precision.fp16.significand_rounding_nodes`) in front of every
``MatMul``/``Gemm``/``Conv`` input of a float32 graph, so ONNX Runtime on any
CPU computes what a TF32 engine computes up to accumulation order.
:func:`tf32_record` measures every graph of a bundle so ``itmrt build --tf32``
records the error next to each engine (:class:`itmrt.bundle.manifest.Tf32Record`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from itmrt.bundle.folder import bundle_file
from itmrt.bundle.manifest import Log, Manifest, Tf32Record
from itmrt.engine.settings import EngineOptions
from itmrt.precision.fp16 import (
    SPLITTER_INITIALIZER,
    VELTKAMP_SPLITTER,
    significand_rounding_nodes,
)
from itmrt.runtime.sessions import create_session

TF32_OPS = ("MatMul", "Gemm", "Conv")
Feeds = dict[str, np.ndarray]


def _float_values(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    values = [*graph.input, *graph.value_info, *graph.output]
    floats = {v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return floats | {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}


def tf32_emulation_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose float32 products read TF32-rounded inputs, and how many products that is."""
    emulated = copy.deepcopy(model)
    floats = _float_values(emulated)
    nodes: list[onnx.NodeProto] = []
    products = 0
    for node in emulated.graph.node:
        if node.op_type in TF32_OPS:
            rounded_any = False
            for position, name in enumerate(node.input[:2]):  # the product's operands (Gemm's C and biases are added)
                if name and name in floats:
                    rounded = f"{name}__tf32_{node.name or products}_{position}"
                    nodes.extend(significand_rounding_nodes(name, rounded))
                    node.input[position] = rounded
                    rounded_any = True
            products += int(rounded_any)
        nodes.append(node)
    del emulated.graph.node[:]
    emulated.graph.node.extend(nodes)
    emulated.graph.initializer.append(
        numpy_helper.from_array(np.array(VELTKAMP_SPLITTER, dtype=np.float32), SPLITTER_INITIALIZER)
    )
    return emulated, products


def tf32_session(model: onnx.ModelProto) -> Any:
    """ONNX Runtime CPU session of the TF32 emulation (optimisations off: they could fold the rounding)."""
    emulated, _products = tf32_emulation_graph(model)
    return create_session(emulated.SerializeToString(), optimization="disable")


def tf32_max_error(model: onnx.ModelProto, feeds: Sequence[Feeds]) -> float:
    """Largest |TF32 - float32| over every float output of ``model`` on ``feeds``."""
    exact = create_session(model.SerializeToString(), optimization="disable")
    rounded = tf32_session(model)
    worst = 0.0
    for feed in feeds:
        for a, b in zip(exact.run(None, dict(feed)), rounded.run(None, dict(feed))):
            if a.dtype.kind == "f":
                worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)))
    return worst


def tf32_record(folder: Path, manifest: Manifest, options: EngineOptions, say: Log) -> dict[str, Tf32Record]:
    """Per graph: whether ``options`` allow TF32 and, when they do, its measured effect on the fp32 graph's outputs."""
    if not options.tf32:
        return {graph: Tf32Record(enabled=False) for graph in manifest.graphs}
    from itmrt.precision.calib_data import FeedMaker, random_sample

    feeds = FeedMaker(folder, manifest)
    images, tokens, lengths = random_sample(manifest, seed=0)
    result = {}
    for graph, entry in manifest.graphs.items():
        model = onnx.load(str(bundle_file(folder, manifest, entry.file)))
        error = tf32_max_error(model, [feeds.feeds(graph, images, tokens, lengths)])
        products = tf32_emulation_graph(model)[1]
        result[graph] = Tf32Record(enabled=True, max_abs_error_fp32_graph=error, emulated_products=products,
                                   sample="random inputs (seed 0)")
        say(f"tf32 {graph}: allowed; emulated on the CPU, max abs output error {error:.2e} over {products} product(s)")
    return result
