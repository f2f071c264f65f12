"""The runtime's choices as str enums (typer validates them and ``--help`` lists them) and its options.

A member compares equal to its value (``ScorerChoice.FUSED == "fused"``), so
callers may pass plain strings; :func:`itmrt.runtime.load` turns them into
members and refuses anything else with a one-line error. This module imports
nothing heavy: the CLI reads it to declare its options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from itmrt.bundle.names import BackendName, Choice, Precision, parse_choice
from itmrt.errors import ItmrtError
from itmrt.limits import MAX_BATCH, MAX_MEMORY_MB, MAX_TOKENS, check_threads, store_count

DEFAULT_BUDGET_BYTES = 32 << 20  # measured: 8-32 MB tiles beat 256 MB ones by ~15% (cache), bench_scorer


class ScorerChoice(Choice):
    """What scores a tile: the bundle's scorer graph, the fused CPU scorer, or "auto" (fused where it applies)."""

    AUTO = "auto"
    GRAPH = "graph"
    FUSED = "fused"


class Direction(Choice):
    """Which queries a command answers: every caption's best images and every image's best captions, or one of
    the two (``t2i``: a search of the images for each caption)."""

    BOTH = "both"
    T2I = "t2i"
    I2T = "i2t"

    @property
    def searched(self) -> tuple[str, ...]:
        """The directions as :class:`itmrt.scale.SearchRequest` names them."""
        return ("t2i", "i2t") if self is Direction.BOTH else (str(self.value),)


SEARCHED = ("t2i", "i2t")
"""The directions :meth:`itmrt.runtime.Runtime.rank` takes (``directions=``)."""


def check_directions(directions: object) -> tuple[str, ...]:
    """``directions`` as a tuple of :data:`SEARCHED`, at least one, or a one-line error: a string was searched
    by its letters' substrings ("t2i" in "xt2i"), and an unknown name or none at all gave empty results."""
    if isinstance(directions, str) or not isinstance(directions, (tuple, list)) or not directions \
            or any(not isinstance(d, str) or d not in SEARCHED for d in directions) \
            or len(set(directions)) != len(directions):  # ("t2i", "t2i") searched every shard twice
        raise ItmrtError(f"directions must be a tuple of one or both of {', '.join(map(repr, SEARCHED))}, each "
                         f"once, not {directions!r}")
    return tuple(str(d) for d in directions)


class OnLong(Choice):
    """What happens to a caption longer than the token limit: cut (with a warning) or refused."""

    TRUNCATE = "truncate"
    REFUSE = "refuse"


Warn = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """How :func:`itmrt.runtime.load` opens a bundle (every field has the runtime's default).

    The one group of runtime options: ``load()``, ``Runtime``, the service, sharded search and every
    command that opens a bundle take it (the CLI builds it from its runtime flags, declared once in
    :mod:`itmrt.cli.flags`).
    """

    backend: BackendName = BackendName.ORT
    precision: Precision = Precision.FP32
    providers: Sequence[str] | None = None  # ONNX Runtime providers by name or alias; None: CUDA then CPU
    threads: int = 0  # ONNX Runtime intra-op threads; 0: one per core
    max_length: int | None = None  # caption token limit; None: the bundle's profile maximum
    on_long: OnLong = OnLong.TRUNCATE
    batch_size: int = 128  # images / captions per encoder call
    budget_bytes: int = DEFAULT_BUDGET_BYTES  # memory of one scoring tile
    warn: Warn | None = None  # where truncation warnings go (default: warnings.warn)
    scorer: ScorerChoice = ScorerChoice.AUTO
    device: int = 0  # the CUDA device (after CUDA_VISIBLE_DEVICES)
    gpu_mem_limit_mb: int | None = None  # cap of ONNX Runtime's CUDA memory arena

    def __post_init__(self) -> None:
        # Plain strings are accepted and checked here, once, with the choices in the message.
        object.__setattr__(self, "backend", parse_choice(BackendName, self.backend, "backend"))
        object.__setattr__(self, "precision", parse_choice(Precision, self.precision, "precision"))
        object.__setattr__(self, "on_long", parse_choice(OnLong, self.on_long, "--on-long"))
        object.__setattr__(self, "scorer", parse_choice(ScorerChoice, self.scorer, "scorer"))
        # A NumPy integer is taken as a thread count (as the scale options take it) and stored as an int.
        object.__setattr__(self, "threads", check_threads(self.threads))
        store_count(self, "batch_size", 1, MAX_BATCH, "--batch-size")
        store_count(self, "budget_bytes", 1 << 10, MAX_MEMORY_MB << 20, "the tile memory budget (bytes)")
        store_count(self, "device", 0, 255, "--device")
        if self.max_length is not None:
            store_count(self, "max_length", 2, MAX_TOKENS, "--max-length")
        if self.gpu_mem_limit_mb is not None:
            store_count(self, "gpu_mem_limit_mb", 1, 1 << 24, "the CUDA memory limit (MB)")

    def replace(self, **changes: Any) -> RuntimeOptions:
        """These options with ``changes`` (field names), checked again; an unknown name is a TypeError."""
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown runtime option(s) {', '.join(unknown)}; the options are "
                            + ", ".join(field.name for field in dataclasses.fields(self)))
        return dataclasses.replace(self, **changes) if changes else self

    def load_keywords(self) -> dict[str, Any]:
        """The options as keywords of :func:`itmrt.runtime.load` (for code that passes them on as a dict)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
