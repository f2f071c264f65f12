"""One runner interface: a graph (or the PyTorch computation it was exported from) opened, run, closed.

Every way itmrt runs one component of a bundle - ONNX Runtime
(:class:`itmrt.runtime.backends.OrtBackend`), native TensorRT engines
(:class:`itmrt.runtime.backend_trt.TrtBackend`) and the PyTorch reference
(:class:`itmrt.families.reference.TorchRunner`, on the torch side) - is a
:class:`Runner`:

- open: each runner's constructor, through its opener
  (:func:`itmrt.runtime.backends.open_backend` for ONNX Runtime and TensorRT,
  ``TorchRunner.open`` for the reference);
- input metadata: :meth:`Runner.inputs` (name, numpy dtype, shape with
  symbolic axes as names), :attr:`Runner.input_names`, :attr:`Runner.output_names`;
- infer: :meth:`Runner.infer` (outputs by name) over :meth:`Runner.run` (outputs
  in ``output_names`` order, what the encoders and the tiled scorer call);
- close: :meth:`Runner.close` frees what the runner holds (a no-op where
  nothing needs freeing); a runner is also a context manager.

Feeds are the graph's own input names (:mod:`itmrt.bundle.names`), so the same
feeds run on any runner and their outputs compare directly
(:mod:`itmrt.reports.comparator`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """One input of a runner: its name, numpy dtype name and shape (symbolic axes by name, unknown ones None)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


class Runner(ABC):
    """A component of a bundle, ready to run: see the module docstring for the four parts of the interface."""

    name: str
    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def inputs(self) -> list[TensorInfo]:
        """The runner's inputs, in ``input_names`` order."""

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; outputs in ``output_names`` order (float32, or the graph's integer type)."""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; outputs by name."""
        return dict(zip(self.output_names, self.run(dict(feeds))))

    def close(self) -> None:  # noqa: B027 - most runners hold nothing that needs freeing
        """Free what the runner holds now (engines, device memory); a later run may fail."""

    def __enter__(self) -> Runner:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
