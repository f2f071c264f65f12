"""The PyTorch reference of ``itmrt parity`` (the torch side): a bundle's source checkpoint on shared inputs.

The report itself (:mod:`itmrt.reports.parity_report`) is torch-free; it reaches
this module by name through :func:`itmrt.optional.torch_side` when a user asks
for ``--against torch``, so a base install reads and compares bundles without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmrt.bundle.folder import BundleInfo
from itmrt.errors import ItmrtError
from itmrt.families.checkpoints import load_checkpoint
from itmrt.families.registry import get
from itmrt.io import sha256_file
from itmrt.models.evaluate import PaddedTokenEmbeddings, encode_images, score_matrix
from itmrt.runtime.encoders import CaptionEmbeddings

BarFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class ReferenceOutputs:
    """What the PyTorch model made of the shared inputs: region embeddings, token embeddings, scores."""

    images: np.ndarray  # [N, n, d]
    captions: CaptionEmbeddings
    scores: np.ndarray  # [N, C]
    described: dict[str, Any] = field(default_factory=dict)


def source_checkpoint(info: BundleInfo, checkpoint: Path | None) -> Path:
    """The checkpoint the bundle was exported from (or ``checkpoint``), checked against its recorded sha256."""
    source = info.manifest.source_checkpoint
    path = Path(checkpoint) if checkpoint is not None else Path(source.path if source is not None else "")
    if not path.is_file():
        raise ItmrtError(
            f"the bundle's source checkpoint {path} is not there; "
            "pass it with --checkpoint PATH, or use --against ort:fp32"
        )
    expected = source.sha256 if source is not None else None
    if expected and sha256_file(path) != expected:
        raise ItmrtError(
            f"{path} is not the checkpoint {info.path} was exported "
            "from (sha256 differs); pass the right one with --checkpoint"
        )
    return path


def _token_embeddings(model: Any, ids: list[list[int]], lengths: np.ndarray, offsets: np.ndarray, width_out: int,
                      batch_size: int) -> np.ndarray:
    vectors = np.empty((int(offsets[-1]), width_out), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            out = model.encode_captions(
                torch.from_numpy(_padded_batch(batch)),
                torch.from_numpy(lengths[start : start + len(batch)].astype(np.int64)),
            )
            for row in range(len(batch)):
                k = start + row
                vectors[offsets[k] : offsets[k + 1]] = out[row, : lengths[k]].numpy()
    return vectors


def _padded_batch(batch: list[list[int]]) -> np.ndarray:
    tokens = np.zeros((len(batch), max(len(x) for x in batch)), dtype=np.int64)
    for row, caption_ids in enumerate(batch):
        tokens[row, : len(caption_ids)] = caption_ids
    return tokens


def _caption_vectors(model: Any, ids: list[list[int]], lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """One embedding per caption (a global-embedding model), ``batch_size`` captions per batch in order."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            chunks.append(model.encode_captions(
                torch.from_numpy(_padded_batch(batch)),
                torch.from_numpy(lengths[start : start + len(batch)].astype(np.int64))).numpy())
    return np.concatenate(chunks).astype(np.float32, copy=False)


def torch_reference(
    info: BundleInfo, checkpoint: Path | None, features: np.ndarray, ids: list[list[int]], batch_size: int,
    bar: BarFactory | None = None,
) -> ReferenceOutputs:
    """The PyTorch model of the bundle's source checkpoint on the shared inputs.

    Token-level families give token embeddings per caption; global-embedding ones (CMPM) one vector per caption,
    encoded ``batch_size`` captions at a time in their order, padded to each batch's longest as the runtime pads.
    """
    path = source_checkpoint(info, checkpoint)
    model = load_checkpoint(path)
    model.eval()
    images = encode_images(model, features, batch_size, bar("reference: images", len(features)) if bar else None)
    lengths = np.array([len(x) for x in ids], dtype=np.int32)
    if get(model.family).token_level:
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        vectors = _token_embeddings(model, ids, lengths, offsets, images.shape[-1], batch_size)
        captions = CaptionEmbeddings(vectors, lengths, offsets)
        padded, _ = captions.padded(np.arange(len(ids)))
    else:
        captions = CaptionEmbeddings(_caption_vectors(model, ids, lengths, batch_size), lengths)
        padded = captions.vectors
    encoded = PaddedTokenEmbeddings(torch.from_numpy(padded), torch.from_numpy(lengths.astype(np.int64)))
    scores = score_matrix(model, images, encoded, progress=bar("reference: score", len(ids)) if bar else None)
    described = {"against": "torch", "checkpoint": str(path), "torch_version": torch.__version__}
    return ReferenceOutputs(images.numpy(), captions, scores, described)
