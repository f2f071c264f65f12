"""Strict state-dict loading whose failure is one line naming the offending keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from itmrt.errors import CheckpointError

LISTED_KEYS = 4


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:LISTED_KEYS])
    rest = len(names) - LISTED_KEYS
    return f"{shown} and {rest} more" if rest > 0 else shown


def _shape(value: Tensor) -> str:
    return "[" + ", ".join(str(size) for size in value.shape) + "]"


def state_dict_problems(module: nn.Module, state: Mapping[str, Any], label: str = "") -> list[str]:
    """Missing, unexpected, non-tensor and misshapen keys of ``state`` for ``module``, as phrases."""
    expected = module.state_dict()
    where = f" in the {label}" if label else ""
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    not_tensors = [name for name in state if name in expected and not isinstance(state[name], Tensor)]
    not_finite = [name for name, value in state.items()
                  if isinstance(value, Tensor) and value.is_floating_point() and not bool(value.isfinite().all())]
    misshapen = []
    for name, want in expected.items():
        got = state.get(name)
        if not isinstance(got, Tensor) or got.shape == want.shape:
            continue
        if got.numel() == 1 and want.numel() == 1:
            continue  # e.g. weight_g saved as [1] by old PyTorch versions; the encoder reshapes it
        misshapen.append(f"{name} is {_shape(got)} but the model expects {_shape(want)}")
    problems = []
    if missing:
        problems.append(f"missing key{'s' if len(missing) > 1 else ''}{where}: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected key{'s' if len(unexpected) > 1 else ''}{where}: {_listed(unexpected)}")
    if not_tensors:
        problems.append(f"not a tensor{where}: {_listed(not_tensors)}")
    if misshapen:
        problems.append(f"shape mismatch{where}: {_listed(misshapen)}")
    if not_finite:
        problems.append(f"NaN or infinite values{where}: {_listed(not_finite)}")
    return problems


def raise_for_problems(source: str, problems: Sequence[str]) -> None:
    if problems:
        raise CheckpointError(
            f"{source} does not match the model its options describe: " + "; ".join(problems)
        )


def load_state_dict_checked(module: nn.Module, state: Mapping[str, Any], source: str, label: str = "") -> None:
    """``module.load_state_dict(state, strict=True)``, with a one-line :class:`CheckpointError` on any mismatch."""
    raise_for_problems(source, state_dict_problems(module, state, label))
    module.load_state_dict(dict(state), strict=True)
