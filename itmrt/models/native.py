"""itmrt's native checkpoint: one ``.safetensors`` file, the model config in its metadata.

A safetensors file holds only tensors and a JSON header, so loading one never
runs code. The header's ``__metadata__`` (string -> string) carries:

- ``itmrt_format``: ``"native-1"``;
- ``family``: the model's family (``"naaf"``, ``"scan"``, ``"cmpm"``, or any
  registered one: :mod:`itmrt.families`);
- ``config``: JSON: what the family rebuilds the model from (a NAAF/SCAN
  matcher's full option dict with defaults filled in, a CMPM model's
  constructor arguments);
- ``itmrt_version``: the version that wrote the file;
- ``vocab_sha256`` (models itmrt trained): :attr:`itmrt.text.Vocabulary.sha256` of the
  vocabulary the model was trained with, so export and evaluation refuse another one.

Tensors are the model's ``state_dict`` (a matcher's includes its scorer's
buffers, e.g. the frozen NAAF threshold). Loading - rebuilding the model of the
named family - is :func:`itmrt.families.checkpoints.load_native`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from itmrt import __version__
from itmrt.errors import CheckpointError, first_line
from itmrt.publish import atomic_write_bytes

NATIVE_FORMAT = "native-1"
VOCAB_SHA256 = "vocab_sha256"
"""Where a model itmrt trained records its vocabulary's content hash: the native metadata key, and the
``opt`` entry of a checkpoint in the released layout."""


def recorded_vocab_sha256(model: object) -> str | None:
    """The vocabulary hash ``model`` was trained with (``opt`` entry or attribute), or None (released models)."""
    opt = getattr(model, "opt", None)
    value = opt.get(VOCAB_SHA256) if isinstance(opt, dict) else None
    if value is None:
        value = getattr(model, VOCAB_SHA256, None)
    return value if isinstance(value, str) and value else None


def native_metadata(model: torch.nn.Module) -> dict[str, str]:
    """The safetensors metadata describing ``model`` (any reference model: it names its ``family`` and ``config``)."""
    family, config = getattr(model, "family", None), getattr(model, "config", None)
    if not isinstance(family, str) or not isinstance(config, dict):
        raise TypeError(f"cannot save a {type(model).__name__} in itmrt's native format")
    try:
        config_json = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the model options cannot be stored as JSON ({exc}); keep them to numbers, strings and lists"
        ) from exc
    metadata = {"itmrt_format": NATIVE_FORMAT, "family": family, "config": config_json, "itmrt_version": __version__}
    vocab_sha256 = recorded_vocab_sha256(model)
    if vocab_sha256 is not None:
        metadata[VOCAB_SHA256] = vocab_sha256
    return metadata


def save_native(path: str | os.PathLike[str], model: torch.nn.Module) -> Path:
    """Write ``model`` as one safetensors file (atomically) and return its path."""
    metadata = native_metadata(model)
    # clone(): safetensors refuses tensors that share storage or are not contiguous.
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in model.state_dict().items()}
    return atomic_write_bytes(path, save_safetensors_bytes(tensors, metadata=metadata))


def read_native(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a native file; a malformed file is a one-line :class:`CheckpointError`."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"no such checkpoint file: {file}")
    data = file.read_bytes()
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({first_line(exc)}); is it truncated?"
        ) from exc
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    return metadata, tensors
