"""The PyTorch reference (the torch side): a bundle's source checkpoint run like the bundle's graphs.

:class:`TorchRunner` runs one component of the reference model behind the
runner interface the ONNX Runtime and TensorRT backends have
(:class:`itmrt.runtime.runner.Runner`): the same feeds, by the graphs' input
names, give outputs that compare directly. :func:`torch_reference` is
``itmrt parity``'s reference on its shared inputs. The report itself
(:mod:`itmrt.reports.parity_report`) is torch-free; it reaches this module by
name through :func:`itmrt.optional.torch_side` when a user asks for
``--against torch``, so a base install reads and compares bundles without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmrt.bundle.folder import BundleInfo
from itmrt.bundle.names import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS, LENGTHS, TOKEN_IDS, Component
from itmrt.documents import sha256_file
from itmrt.errors import ItmrtError
from itmrt.families.checkpoints import load_checkpoint
from itmrt.families.registry import get
from itmrt.models.evaluate import PaddedTokenEmbeddings, encode_images, score_matrix
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.runner import Runner, TensorInfo

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


class TorchRunner(Runner):
    """One component of the bundle's PyTorch reference model, fed and answering like the component's graph.

    The scorer runs the model's own ``score``: a bundle exported with ``--threshold`` froze another constant,
    and its scorer has no runner here (one-line error at open).
    """

    def __init__(self, model: Any, component: str, info: BundleInfo) -> None:
        entry = info.manifest.graph(component)
        self.model, self.component = model, Component(component)
        self.name = f"torch:{component}"
        self._inputs = [TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in entry.inputs]
        self.input_names = [t.name for t in entry.inputs]
        self.output_names = [t.name for t in entry.outputs]
        threshold = info.manifest.threshold
        if self.component == Component.SCORER and threshold is not None and threshold.checkpoint_value is not None \
                and np.float32(threshold.checkpoint_value) != np.float32(threshold.value):
            raise ItmrtError(
                f"bundle {info.path} froze threshold {threshold.value:g}, not the checkpoint's "
                f"{threshold.checkpoint_value:g}: the PyTorch scorer would compute another score"
            )

    @classmethod
    def open(cls, info: BundleInfo, component: str, checkpoint: Path | None = None, model: Any = None) -> TorchRunner:
        """``component`` of the bundle's source checkpoint (or ``checkpoint``; sha256 checked), or of ``model``."""
        if model is None:
            model = load_checkpoint(source_checkpoint(info, checkpoint)).eval()
        return cls(model, component, info)

    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            if self.component == Component.IMAGE_ENCODER:
                out = self.model.encode_images(torch.from_numpy(np.ascontiguousarray(feeds[self.input_names[0]],
                                                                                     dtype=np.float32)))
            elif self.component == Component.TEXT_ENCODER:
                tokens = torch.from_numpy(np.asarray(feeds[TOKEN_IDS], dtype=np.int64))
                out = self.model.encode_captions(tokens, torch.from_numpy(np.asarray(feeds[LENGTHS], dtype=np.int64)))
                if out.dim() == 3 and out.shape[1] < tokens.shape[1]:  # the graph keeps the padded width
                    out = torch.nn.functional.pad(out, (0, 0, 0, tokens.shape[1] - out.shape[1]))
            else:
                lengths = feeds.get(LENGTHS)
                out = self.model.score(
                    torch.from_numpy(np.asarray(feeds[IMAGE_EMBEDDINGS], dtype=np.float32)),
                    torch.from_numpy(np.asarray(feeds[CAPTION_EMBEDDINGS], dtype=np.float32)),
                    None if lengths is None else torch.from_numpy(np.asarray(lengths, dtype=np.int64)),
                )
        return [out.numpy().astype(np.float32, copy=False)]

