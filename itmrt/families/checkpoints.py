"""Loading any checkpoint itmrt reads into the reference model of its family.

Released NAAF/SCAN checkpoints (``*.pth.tar``) are read by
:func:`itmrt.families.released.load_released_checkpoint`; itmrt's native
safetensors files name their family, whose spec rebuilds the model from the
stored config (:meth:`itmrt.families.FamilySpec.model_from_config`) before the
weights are loaded strictly. The reader is chosen by the file's content, not
its name. Needs torch.
"""

from __future__ import annotations

import os
from typing import Any

from itmrt.documents import parse_json
from itmrt.errors import CheckpointError, ItmrtError, first_line
from itmrt.families.registry import get
from itmrt.families.released import detect_format, load_released_checkpoint
from itmrt.models.native import NATIVE_FORMAT, VOCAB_SHA256, read_native
from itmrt.models.statedict import load_state_dict_checked


def load_native(path: str | os.PathLike[str]) -> Any:
    """Rebuild the model a native file describes and load its weights (strictly)."""
    metadata, tensors = read_native(path)
    if metadata.get("itmrt_format") != NATIVE_FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not an itmrt checkpoint "
            f"(no itmrt_format={NATIVE_FORMAT!r} in its metadata)"
        )
    family = str(metadata.get("family"))
    try:
        spec = get(family)
    except ItmrtError as exc:
        raise CheckpointError(f"{path} names an {exc}") from None
    try:
        config: dict[str, Any] = parse_json(str(metadata.get("config", "")).encode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} has a malformed model config in its metadata ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has a malformed model config in its metadata (not a JSON object)")
    try:
        model = spec.model_from_config(config)
    except ItmrtError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (TypeError, ValueError, RuntimeError) as exc:  # torch refuses impossible sizes with RuntimeError
        raise CheckpointError(f"{path} has an invalid {family.upper()} config: {first_line(exc)}") from None
    load_state_dict_checked(model, tensors, str(path))
    if metadata.get(VOCAB_SHA256):
        model.vocab_sha256 = str(metadata[VOCAB_SHA256])
    return model.eval()


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load any checkpoint itmrt reads, choosing the reader by the file's content, not its name."""
    if detect_format(path) == "safetensors":
        return load_native(path)
    return load_released_checkpoint(path)
