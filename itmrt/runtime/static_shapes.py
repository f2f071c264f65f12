"""Smaller inputs for an engine whose profile is static: padded up to its shapes, outputs cut back.

A DLA engine takes exactly one shape per input (its optimisation profile has
min = opt = max; TensorRT's DLA restrictions), while the runtime batches what
it is given: the last batch of a gallery, one caption, captions shorter than
the longest the engine was built for. :class:`StaticPadding` fills such an
input up to the engine's shape along the axes that are static and shorter,
and afterwards cuts every output back along the same symbolic axes (the
manifest names each input and output axis: ``batch_images``,
``batch_captions``, ``max_length``...).

What the padding holds never reaches a real row: every graph of a bundle
computes each image, caption and image-caption pair on its own (no batch
statistics), and captions are masked by their ``lengths``, so padded captions
get length 1 (a zero length would be a caption with no word) and everything
else zeros. The one exception is a model whose caption embedding depends on
its padding (the manifest's ``caption_buckets`` is false: CMPM's released
max over padded positions): its ``max_length`` is never padded, so such an
engine takes captions of exactly its length. ``tests/test_runtime_static_shapes.py`` checks this on the real
graphs with ONNX Runtime: padded and cut back, every output equals the
unpadded run's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from itmrt.bundle.manifest import GraphEntry
from itmrt.bundle.names import LENGTHS
from itmrt.errors import ItmrtError

PAD_VALUES: dict[str, int] = {LENGTHS: 1}
"""What a padded row of an input holds when zero would not do (others: 0)."""


@dataclass(frozen=True)
class StaticPadding:
    """How to pad one engine's inputs up to its static shapes and cut its outputs back."""

    input_axes: dict[str, tuple[int | str, ...]]
    output_axes: dict[str, tuple[int | str, ...]]
    static: dict[str, tuple[int, ...]]  # input -> its shape, for inputs whose profile has min == max on some axis
    static_axes: dict[str, tuple[bool, ...]]  # input -> per axis: min == max

    @classmethod
    def for_engine(cls, graph: GraphEntry, profile: Mapping[str, Sequence[Sequence[int]]],
                   unpadded: frozenset[str] = frozenset()) -> StaticPadding | None:
        """The padding for an engine of ``graph`` with ``profile`` (input -> (min, opt, max)); None when no
        input axis can be padded. An axis the manifest does not name (nothing could cut it back) or one of
        ``unpadded`` (``max_length`` where a caption's embedding depends on its padding) is never padded."""
        static: dict[str, tuple[int, ...]] = {}
        static_axes: dict[str, tuple[bool, ...]] = {}
        input_axes = {spec.name: tuple(spec.shape) for spec in graph.inputs}
        for name, (low, _opt, high) in profile.items():
            fixed = tuple(int(lo) == int(hi) for lo, hi in zip(low, high))
            axes = input_axes.get(name)
            if axes is None or len(axes) != len(fixed):
                return None
            named = [isinstance(axis, str) and axis not in unpadded for axis in axes]
            if any(f and n for f, n in zip(fixed, named)):
                static[name] = tuple(int(hi) for hi in high)
                static_axes[name] = tuple(f and n for f, n in zip(fixed, named))
        if not static:
            return None
        return cls(input_axes, {spec.name: tuple(spec.shape) for spec in graph.outputs}, static, static_axes)

    def pad(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """``feeds`` with each input shorter than its static shape padded up to it, and the real size of every
        padded axis (by its manifest name). An input longer than the engine's shape is left for the engine's own
        profile check to refuse."""
        padded: dict[str, np.ndarray] = {}
        real: dict[str, int] = {}
        for name, value in feeds.items():
            target, which = self.static.get(name), self.static_axes.get(name)
            if target is None or which is None or value.shape == target or value.ndim != len(target):
                padded[name] = value
                continue
            shape = tuple(t if w else s for s, t, w in zip(value.shape, target, which))
            if any(s > t for s, t in zip(value.shape, shape)) or shape == value.shape:
                padded[name] = value
                continue
            for size, full, axis, static in zip(value.shape, shape, self.input_axes[name], which):
                if static and size < full:
                    _record(real, str(axis), size)
            grown = np.full(shape, PAD_VALUES.get(name, 0), dtype=value.dtype)
            grown[tuple(slice(0, s) for s in value.shape)] = value
            padded[name] = grown
        return padded, real

    def cut(self, names: Sequence[str], outputs: Sequence[np.ndarray], real: Mapping[str, int]) -> list[np.ndarray]:
        """``outputs`` cut back to the real sizes of the padded axes."""
        if not real:
            return list(outputs)
        result = []
        for name, output in zip(names, outputs):
            axes = self.output_axes.get(name, ())
            keep = tuple(slice(0, real[axis]) if isinstance(axis, str) and axis in real else slice(None)
                         for axis in axes)
            result.append(np.ascontiguousarray(output[keep]) if len(axes) == output.ndim else output)
        return result


def _record(real: dict[str, int], axis: str, size: int) -> None:
    if real.setdefault(axis, size) != size:
        raise ItmrtError(f"inputs disagree on axis '{axis}' ({real[axis]} and {size}); pass inputs of one batch")
