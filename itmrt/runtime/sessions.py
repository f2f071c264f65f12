"""Creating ONNX Runtime sessions: the one place that sets their options.

Every session itmrt opens (the runtime's backends, the fused scorer's GEMMs,
export parity, FP16 emulation, calibration) comes from :func:`create_session`,
so logging, threading and optimisation settings mean the same everywhere and a
graph ONNX Runtime cannot load is always a one-line :class:`ItmrtError`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from itmrt.errors import ItmrtError, first_line
from itmrt.limits import check_threads

CPU_PROVIDER = "CPUExecutionProvider"
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


_STDOUT_SWAP = threading.Lock()
"""Held while :func:`create_session` points ``sys.stdout`` at stderr."""


def create_session(
    model: str | Path | bytes,
    *,
    providers: Sequence[str] | None = None,
    provider_options: Sequence[dict[str, Any]] | None = None,
    threads: int = 0,
    optimization: str = "all",
    spinning: bool = True,
    remedy: str = "the file may be truncated or damaged - export the bundle again",
) -> Any:
    """An ``onnxruntime.InferenceSession`` over a graph file or serialized bytes.

    ``providers``: full provider names in priority order (default: the CPU
    provider only); ``provider_options`` one dict per provider. ``threads``:
    intra-op threads, 0 for ONNX Runtime's default. ``optimization``: one of
    :data:`OPTIMIZATION_LEVELS`. ``spinning=False`` stops idle worker threads
    from spinning (they would take the cores other work runs on). ONNX
    Runtime's own warnings are silenced; a load failure raises an
    :class:`ItmrtError` naming the graph and ending with ``remedy``.
    """
    import onnxruntime as ort

    check_threads(threads)
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ItmrtError(f"unknown graph optimisation level {optimization!r}; choose {', '.join(levels)}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.graph_optimization_level = levels[optimization]
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    chosen = list(providers) if providers else [CPU_PROVIDER]
    try:
        # When a provider fails to load, ONNX Runtime print()s its fallback notice; on stdout it would
        # corrupt a command's --json output, so it goes to stderr. The swap of sys.stdout is process-wide: two
        # threads creating sessions at once (the one-caption scorer's workers) could restore each other's
        # swap and leave stdout on stderr for good (a command's table went missing), hence one at a time.
        with _STDOUT_SWAP, contextlib.redirect_stdout(sys.stderr):
            if provider_options is not None:
                return ort.InferenceSession(source, options, providers=chosen, provider_options=list(provider_options))
            return ort.InferenceSession(source, options, providers=chosen)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidProtobuf, ...)
        what = "the graph" if isinstance(model, bytes) else str(model)
        raise ItmrtError(f"ONNX Runtime cannot load {what}: {first_line(exc)}; {remedy}") from None
