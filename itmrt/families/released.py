"""Checkpoint import and export: the authors' released ``torch.save`` layout and itmrt's native safetensors.

Released NAAF/SCAN checkpoints (``*.pth.tar``) are pickles, and unpickling can
run arbitrary code. They are read with ``torch.load(weights_only=True)``, which
only rebuilds tensors and plain containers, plus ``argparse.Namespace`` for the
``opt`` entry and numeric numpy scalars (which training scripts sometimes
store); any other pickled global is refused before it is called and reported
by name.

What the importer takes from the weights rather than from ``opt``: the word
embedding's key layout (``embed.weight`` plain, ``embed.glove.weight`` GloVe)
and so ``precomp_enc_text_type``; ``vocab_size`` (the embedding's row count,
since the released evaluation recomputes it from the vocabulary file and a
checkpoint may lack it); and the image encoder type (``fc.weight_g`` means
``weight_norm``). Everything else comes from ``opt`` (defaults in
:mod:`itmrt.families.matcher`), and a weight that does not fit is reported by
name.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmrt.documents import sha256_file
from itmrt.errors import CheckpointError, ItmrtError, first_line
from itmrt.families.matcher import CrossAttentionMatcher, detect_family
from itmrt.models.native import save_native
from itmrt.models.statedict import raise_for_problems, state_dict_problems
from itmrt.publish import atomic_write_bytes

__all__ = [
    "checkpoint_sha256",
    "detect_format",
    "load_released_checkpoint",
    "matcher_from_opt",
    "save_native",
    "save_released_checkpoint",
]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_BLOCKED_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)|but got <class '([\w.]+)'>")
_NUMERIC_DTYPES = ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue", "In PyTorch 2.6")
_PLAIN_TYPES = (type(None), bool, int, float, str)


def _check_file(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"no such checkpoint file: {file}")
    if not file.is_file():
        raise CheckpointError(f"{file} is not a file; give the path of a checkpoint file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file} is empty; the checkpoint was not written completely")
    return file


def detect_format(path: str | os.PathLike[str]) -> str:
    """"safetensors" (itmrt native) or "torch" (``torch.save``, zip or legacy pickle), judged by content."""
    file = _check_file(path)
    with open(file, "rb") as handle:
        head = handle.read(9)
    if head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{file} is not a checkpoint itmrt reads (neither a PyTorch checkpoint nor a safetensors file)"
    )


def _first_line(exc: BaseException) -> str:
    # PyTorch's messages go on for several sentences after boilerplate; the first real one says what failed.
    return first_line(exc, skip=_TORCH_BOILERPLATE).split(". ", 1)[0].rstrip(".")


def _allowed_globals() -> list[Any]:
    """What a released checkpoint may pickle besides tensors: the ``opt`` Namespace and numpy scalars.

    Training scripts sometimes store numpy numbers (``best_rsum``, an option).
    Rebuilding a numeric numpy scalar from its bytes runs no user code; numpy 1
    pickles name the rebuild function ``numpy.core.multiarray.scalar``, numpy 2
    ``numpy._core.multiarray.scalar``, so both names are allowed.
    """
    allowed: list[Any] = [argparse.Namespace, np.dtype]
    allowed += [type(np.dtype(code)) for code in _NUMERIC_DTYPES]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed += [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]
    return allowed


def _plain_value(value: Any) -> Any:
    """numpy scalars (possibly nested in lists/dicts) as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain_value(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_value(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain_value(item) for key, item in value.items()}
    return value


def _safe_torch_load(file: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _BLOCKED_GLOBAL.search(str(exc))
        if blocked:
            name = (blocked.group(1) or blocked.group(2)).rstrip(".")
            raise CheckpointError(
                f"{file} contains a pickled object '{name}' that itmrt does not load; "
                "only tensors, plain containers, numbers and argparse.Namespace are accepted (nothing in the file was "
                "run)"
            ) from None
        raise CheckpointError(f"{file} cannot be read safely as a PyTorch checkpoint: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails in many ways (EOFError, struct.error, ...)
        raise CheckpointError(
            f"{file} is not a readable PyTorch checkpoint ({_first_line(exc)}); is it truncated or corrupted?"
        ) from None


def _released_parts(content: Any, file: Path) -> tuple[Mapping[str, Any], Mapping[str, Any], dict[str, Any]]:
    """(image state dict, text state dict, opt dict) of a released checkpoint's content."""
    layout_hint = ("a NAAF/SCAN checkpoint is a dict with 'model' = [image-encoder state dict, text-encoder state dict]"
                   " and 'opt'")
    if not isinstance(content, Mapping) or "model" not in content:
        raise CheckpointError(f"{file} has no 'model' entry; {layout_hint}")
    parts = content["model"]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, Mapping) for p in parts):
        raise CheckpointError(f"{file} has a 'model' entry that is not two state dicts; {layout_hint}")
    opt = content.get("opt")
    if isinstance(opt, argparse.Namespace):
        opt_dict = _plain_value(dict(vars(opt)))
    elif isinstance(opt, Mapping):
        opt_dict = _plain_value(dict(opt))
    else:
        raise CheckpointError(f"{file} has no 'opt' options (needed to rebuild the model); {layout_hint}")
    return parts[0], parts[1], opt_dict


def _options_from_weights(image_state: Mapping[str, Any], text_state: Mapping[str, Any], file: Path) -> dict[str, Any]:
    """The options the weights themselves decide: image encoder type, embedding layout, vocabulary size."""
    found: dict[str, Any] = {}
    if "fc.weight_g" in image_state or "fc.weight_v" in image_state:
        found["precomp_enc_type"] = "weight_norm"
    elif "fc.weight" in image_state:
        found["precomp_enc_type"] = "basic"
    else:
        raise CheckpointError(f"{file}: the image encoder has neither fc.weight nor fc.weight_g/fc.weight_v")
    for key, text_type in (("embed.glove.weight", "GloVe"), ("embed.weight", "basic")):
        table = text_state.get(key)
        if isinstance(table, torch.Tensor):
            if table.dim() != 2:
                raise CheckpointError(
                    f"{file}: {key} should be a [vocab_size, word_dim] table, it is {list(table.shape)}"
                )
            found["precomp_enc_text_type"] = text_type
            found["vocab_size"] = int(table.shape[0])
            return found
    raise CheckpointError(f"{file}: the text encoder has neither embed.weight nor embed.glove.weight")


def load_released_checkpoint(path: str | os.PathLike[str], family: str | None = None) -> CrossAttentionMatcher:
    """Load a NAAF/SCAN checkpoint in the authors' ``torch.save`` layout, without running pickled code.

    ``family`` ("naaf" / "scan") overrides detection from the options
    (``thres_safe`` -> NAAF, ``cross_attn`` -> SCAN). Returns the matcher in eval mode.
    """
    file = _check_file(path)
    if detect_format(file) != "torch":
        raise CheckpointError(f"{file} is an itmrt native (safetensors) checkpoint; load it with load_checkpoint")
    content = _safe_torch_load(file)
    image_state, text_state, opt = _released_parts(content, file)
    opt.update(_options_from_weights(image_state, text_state, file))
    try:
        matcher = CrossAttentionMatcher.from_opt(opt, family=family if family is not None else detect_family(opt))
    except ItmrtError as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    problems = state_dict_problems(matcher.image_encoder, image_state, "image encoder")
    problems += state_dict_problems(matcher.text_encoder, text_state, "text encoder")
    raise_for_problems(str(file), problems)
    matcher.image_encoder.load_state_dict(dict(image_state), strict=True)
    matcher.text_encoder.load_state_dict(dict(text_state), strict=True)
    matcher.checkpoint_info = {
        key: _plain_value(content[key]) for key in ("epoch", "best_rsum", "Eiters") if key in content
    }
    return matcher.eval()


def _check_plain(value: Any, name: str) -> None:
    if isinstance(value, _PLAIN_TYPES):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, name)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, name)
            _check_plain(item, name)
        return
    raise CheckpointError(
        f"option {name!r} holds a {type(value).__name__}, which a "
        "safe loader cannot read back; use numbers, strings or lists"
    )


def _cpu_state(module: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((name, value.detach().cpu().clone()) for name, value in module.state_dict().items())


def save_released_checkpoint(
    path: str | os.PathLike[str],
    matcher: CrossAttentionMatcher,
    epoch: int = 0,
    best_rsum: float = 0.0,
    eiters: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``matcher`` in the authors' layout (atomically), readable by their code and by itmrt.

    ``extra`` entries (e.g. a trainer's optimizer state) are stored beside the
    released keys; they must be plain tensors, numbers, strings, lists and dicts
    so the file still loads with ``weights_only=True``.
    """
    for name, value in matcher.opt.items():
        _check_plain(value, name)
    content = {
        "epoch": int(epoch),
        "model": [_cpu_state(matcher.image_encoder), _cpu_state(matcher.text_encoder)],
        "best_rsum": float(best_rsum),
        "opt": argparse.Namespace(**matcher.opt),
        "Eiters": int(eiters),
    }
    if extra:
        clash = set(extra) & set(content)
        if clash:
            raise ValueError(f"extra entries may not replace released keys: {sorted(clash)}")
        content.update(extra)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def matcher_from_opt(opt: Mapping[str, Any], family: str | None = None) -> CrossAttentionMatcher:
    """A freshly initialised matcher for released options (see :meth:`CrossAttentionMatcher.from_opt`)."""
    return CrossAttentionMatcher.from_opt(opt, family=family)


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a checkpoint file (recorded in bundle manifests)."""
    return sha256_file(_check_file(path))
