"""A text encoder's bidirectional GRU as two one-direction graphs that run side by side.

One caption's bi-GRU is a chain of small products: at every token each
direction multiplies its hidden state by its recurrent weights (12.6 MB per
direction at hidden size 1024), so one caption reads 25 MB per token, from the
cache at best. One thread runs the two directions in turn. ONNX Runtime's
intra-op threads instead split every step's product and meet three times per
token: spinning between the meetings they take the cores the scorer needs
next, sleeping they pay a wake-up each time.

Here the graph is cut in three: the **forward** and the **reverse** graph (each
the encoder up to its GRU, with that direction's weights only) and the
**tail** (the two directions concatenated back into the bidirectional output,
then the rest of the encoder). Each runs on its own one-thread session; the
two directions on two threads that meet once per call. Where a core is busy,
the two threads share the other (no spinning). The outputs are bit-identical
to the whole graph's: the same kernels run on the same inputs (a test compares
them).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.runtime.sessions import create_session

DIRECTIONS = ("forward", "reverse")
_TYPES = {"tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(float)": np.float32}


def _ancestors(nodes: list[Any], outputs: list[str], stop: set[str]) -> list[Any]:
    """The nodes ``outputs`` need (not looking past the tensors in ``stop``), in their graph order."""
    producers = {name: node for node in nodes for name in node.output}
    needed, todo, seen = set(), list(outputs), set()
    while todo:
        name = todo.pop()
        if name in seen or name in stop or name not in producers:
            continue
        seen.add(name)
        node = producers[name]
        needed.add(id(node))
        todo.extend(node.input)
    return [node for node in nodes if id(node) in needed]


def _graph(model: Any, nodes: list[Any], outputs: list[Any], extra_inputs: list[Any], initializers: list[Any]) -> bytes:
    """A model holding ``nodes`` (and the original initializers and inputs they use) with these outputs."""
    from onnx import helper

    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes, model.graph.name,
        [value for value in model.graph.input if value.name in used] + extra_inputs, outputs,
        [init for init in model.graph.initializer if init.name in used] + initializers,
    )
    made = helper.make_model(graph, opset_imports=list(model.opset_import))
    made.ir_version = model.ir_version
    return bytes(made.SerializeToString())


def split_bidirectional(path: str | Path) -> tuple[bytes, bytes, bytes] | None:
    """The forward, reverse and tail graphs of a graph with one bidirectional GRU; None for any other graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    grus = [node for node in nodes if node.op_type == "GRU"]
    if len(grus) != 1 or len(grus[0].output) < 1 or not grus[0].output[0]:
        return None
    gru = grus[0]
    attributes = {a.name: helper.get_attribute_value(a) for a in gru.attribute}
    if attributes.get("direction") != b"bidirectional" or any(name for name in gru.output[1:]) or len(gru.input) < 4:
        return None
    weights = {init.name: init for init in model.graph.initializer}
    if any(name not in weights for name in gru.input[1:4] if name):
        return None
    parts = []
    for index, direction in enumerate(DIRECTIONS):
        sliced, names = [], list(gru.input)
        for position in (1, 2, 3):  # W, R, B: this direction's row of each
            if not names[position]:
                continue
            name = f"{names[position]}_{direction}"
            rows = numpy_helper.to_array(weights[names[position]])[index : index + 1]
            sliced.append(numpy_helper.from_array(rows, name))
            names[position] = name
        node = helper.make_node("GRU", names, [f"gru_{direction}"], name=f"{gru.name}_{direction}",
                                **{**attributes, "direction": direction})
        head = _ancestors(nodes, list(gru.input), set())
        output = helper.make_tensor_value_info(f"gru_{direction}", TensorProto.FLOAT, None)
        parts.append(_graph(model, [*head, node], [output], [], sliced))
    concat = helper.make_node("Concat", [f"gru_{d}" for d in DIRECTIONS], [gru.output[0]], axis=1,
                              name=f"{gru.name}_directions")
    rest = [concat if node is gru else node for node in nodes]
    tail = _ancestors(rest, [value.name for value in model.graph.output], {f"gru_{d}" for d in DIRECTIONS})
    extra = [helper.make_tensor_value_info(f"gru_{d}", TensorProto.FLOAT, None) for d in DIRECTIONS]
    parts.append(_graph(model, tail, list(model.graph.output), extra, []))
    return parts[0], parts[1], parts[2]


class DirectionsBackend:
    """The text encoder's three graphs (:func:`split_bidirectional`) behind the runtime's backend interface."""

    def __init__(self, path: str | Path, graphs: tuple[bytes, bytes, bytes]) -> None:
        self.forward, self.reverse, self.tail = (create_session(graph, threads=1, spinning=False) for graph in graphs)
        self.name = f"ort:{Path(path).name} (GRU directions side by side)"
        self.input_names = [i.name for i in self.forward.get_inputs()]
        for extra in self.tail.get_inputs():
            if extra.name not in self.input_names and not extra.name.startswith("gru_"):
                self.input_names.append(extra.name)
        self.output_names = [o.name for o in self.tail.get_outputs()]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="itmrt-gru-forward")

    @classmethod
    def open(cls, path: str | Path) -> DirectionsBackend | None:
        """The backend for the graph at ``path``, or None when it has no single bidirectional GRU."""
        graphs = split_bidirectional(path)
        return cls(path, graphs) if graphs is not None else None

    @staticmethod
    def _feeds(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for value in session.get_inputs():
            if value.name in feeds:
                dtype = _TYPES.get(value.type)
                out[value.name] = np.ascontiguousarray(feeds[value.name], dtype=dtype)
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        forward = self._pool.submit(self.forward.run, None, self._feeds(self.forward, feeds))
        try:
            reverse = self.reverse.run(None, self._feeds(self.reverse, feeds))[0]
        finally:
            ahead = forward.result()[0]
        tail = self._feeds(self.tail, feeds)
        tail.update({f"gru_{DIRECTIONS[0]}": ahead, f"gru_{DIRECTIONS[1]}": reverse})
        return list(self.tail.run(self.output_names, tail))

    def close(self) -> None:
        self._pool.shutdown()
