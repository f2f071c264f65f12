"""itmrt's native checkpoint: one ``.safetensors`` file, the model config in its metadata.

A safetensors file holds only tensors and a JSON header, so loading one never
runs code. The header's ``__metadata__`` (string -> string) carries:

- ``itmrt_format``: ``"native-1"``;
- ``family``: ``"naaf"``, ``"scan"`` or ``"cmpm"``;
- ``config``: JSON: the full option dict of a NAAF/SCAN matcher (released option
  names, defaults filled in) or the constructor arguments of a CMPM model;
- ``itmrt_version``: the version that wrote the file.

Tensors are the model's ``state_dict`` (a matcher's includes its scorer's
buffers, e.g. the frozen NAAF threshold).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from itmrt import __version__
from itmrt.errors import CheckpointError, ItmrtError, first_line
from itmrt.io import atomic_write_bytes
from itmrt.models.cmpm import CMPMModel
from itmrt.models.matcher import CrossAttentionMatcher
from itmrt.models.statedict import load_state_dict_checked

NATIVE_FORMAT = "native-1"
NATIVE_FAMILIES = ("naaf", "scan", "cmpm")


def native_metadata(model: CrossAttentionMatcher | CMPMModel) -> dict[str, str]:
    """The safetensors metadata describing ``model``."""
    if isinstance(model, CMPMModel):
        family, config = "cmpm", model.config
    elif isinstance(model, CrossAttentionMatcher):
        family, config = model.family, model.opt
    else:
        raise TypeError(f"cannot save a {type(model).__name__} in itmrt's native format")
    try:
        config_json = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the model options cannot be stored as JSON ({exc}); keep them to numbers, strings and lists") from exc
    return {"itmrt_format": NATIVE_FORMAT, "family": family, "config": config_json, "itmrt_version": __version__}


def save_native(path: str | os.PathLike[str], model: CrossAttentionMatcher | CMPMModel) -> Path:
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
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)}); is it truncated?") from exc
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    return metadata, tensors


def load_native(path: str | os.PathLike[str]) -> CrossAttentionMatcher | CMPMModel:
    """Rebuild the model a native file describes and load its weights (strictly)."""
    metadata, tensors = read_native(path)
    if metadata.get("itmrt_format") != NATIVE_FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not an itmrt checkpoint (no itmrt_format={NATIVE_FORMAT!r} in its metadata)"
        )
    family = metadata.get("family")
    if family not in NATIVE_FAMILIES:
        raise CheckpointError(f"{path} names an unknown model family {family!r}: expected one of {', '.join(NATIVE_FAMILIES)}")
    try:
        config: dict[str, Any] = json.loads(metadata.get("config", ""))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has a malformed model config in its metadata ({exc})") from exc
    model: CrossAttentionMatcher | CMPMModel
    if family == "cmpm":
        try:
            model = CMPMModel.from_config(config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} has an invalid CMPM config: {exc}") from exc
    else:
        try:
            model = CrossAttentionMatcher.from_opt(config, family=family)
        except ItmrtError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    load_state_dict_checked(model, tensors, str(path))
    return model.eval()


