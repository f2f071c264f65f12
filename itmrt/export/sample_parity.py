"""Export parity: ONNX Runtime (CPU) runs the exported graphs against the PyTorch reference on sample inputs.

The sample captions mix every length from 2 to L in one padded batch, so a
graph that lets padding leak (a GRU whose reverse pass starts at the padding,
a scorer that averages over padded words) shows up as an error here. The
reference is any model with the reference interface (``encode_images``,
``encode_captions``, ``score``); which inputs each graph takes is read off the
graphs themselves, so every family is checked by the same code. The outputs
are compared by itmrt's one comparator (:mod:`itmrt.reports.comparator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from itmrt.bundle.manifest import ExportParity, ParitySample
from itmrt.bundle.names import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS, LENGTHS, TOKEN_IDS, Component
from itmrt.families.spec import ReferenceScorer
from itmrt.reports.comparator import Comparison, check, max_abs_error, top_k_identical
from itmrt.runtime.sessions import CPU_PROVIDER, create_session

PROVIDER = CPU_PROVIDER
TOP_K = 10


@dataclass
class SampleInputs:
    """Inputs for one parity run (numpy, in the graphs' dtypes)."""

    images: np.ndarray  # region features [Bi, n, img_dim] or pixels [Bi, 3, H, W], float32
    token_ids: np.ndarray  # [Bc, L] int32
    lengths: np.ndarray  # [Bc] int32, every value in 2..L
    seed: int = 0


@dataclass
class ParityResult:
    """Worst absolute error per graph (and end to end), and whether top-K rankings agree."""

    max_abs_error: dict[str, float]
    top_k_identical: bool
    top_k: int
    sample: ParitySample

    def worst(self) -> tuple[str, float]:
        name = max(self.max_abs_error, key=lambda key: self.max_abs_error[key])
        return name, self.max_abs_error[name]

    def comparison(self, tolerance: float) -> Comparison:
        """The comparator's record: every graph's worst error within ``tolerance``, the top-k rankings identical."""
        checks = [check(f"{name} max abs error", error, tolerance, "<=") for name, error in self.max_abs_error.items()]
        checks.append(check(f"top-{self.top_k} rankings identical", float(self.top_k_identical), 1.0, ">="))
        return Comparison({"max_abs_error": dict(self.max_abs_error), "top_k_identical": self.top_k_identical}, checks)

    def record(self, tolerance: float) -> ExportParity:
        """The manifest's ``parity`` entry."""
        return ExportParity(provider=PROVIDER, tolerance=tolerance, max_abs_error=dict(self.max_abs_error),
                            top10_identical=self.top_k_identical, sample=self.sample)


def sample_inputs(
    image_shape: tuple[int, ...],
    batch_images: int,
    batch_captions: int,
    max_length: int,
    vocab_size: int,
    special_ids: tuple[int, int, int],
    seed: int = 0,
    nonnegative_images: bool = True,
) -> SampleInputs:
    """Deterministic sample: non-negative region features (like bottom-up features; or standard
    normal values, like normalised pixels, with ``nonnegative_images=False``), and
    captions ``<start> w... <end>`` padded with ``<pad>``, lengths cycling through 2..max_length.

    ``special_ids`` = (pad, start, end); words are drawn from the other ids.
    """
    if max_length < 2:
        raise ValueError("parity captions need max_length >= 2")
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_images, *image_shape)).astype(np.float32)
    if nonnegative_images:
        images = np.abs(images)
    pad_id, start_id, end_id = special_ids
    words = np.array([i for i in range(vocab_size) if i not in special_ids], dtype=np.int32)
    lengths = np.array([2 + (k * 5) % (max_length - 1) for k in range(batch_captions)], dtype=np.int32)
    lengths[0] = max_length  # the batch is as long as its longest caption
    tokens = np.full((batch_captions, max_length), pad_id, dtype=np.int32)
    for row, length in enumerate(lengths):
        tokens[row, 0] = start_id
        tokens[row, 1 : length - 1] = rng.choice(words, size=length - 2)
        tokens[row, length - 1] = end_id
    return SampleInputs(images, tokens, lengths, seed)


def session(model_bytes: bytes) -> ort.InferenceSession:
    return create_session(model_bytes, providers=[PROVIDER])


def _run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return sess.run(None, feeds)[0]


def _graph_inputs(session: ort.InferenceSession) -> list[str]:
    return [value.name for value in session.get_inputs()]


@torch.no_grad()
def check_parity(
    model: Any,
    graphs: dict[str, bytes],
    sample: SampleInputs,
    reference_scorer: ReferenceScorer | None = None,
) -> ParityResult:
    """Run every graph in ONNX Runtime and the same computation in PyTorch; compare.

    ``reference_scorer`` is the PyTorch scorer with the constants the scorer
    graph froze (it differs from ``model.score`` when the threshold was
    overridden); ``None`` means the model's own.
    """
    sessions = {name: session(data) for name, data in graphs.items()}
    tokens_t = torch.from_numpy(sample.token_ids.astype(np.int64))
    lengths_t = torch.from_numpy(sample.lengths.astype(np.int64))
    scorer = reference_scorer if reference_scorer is not None else model.score
    ref_images = model.encode_images(torch.from_numpy(sample.images))
    ref_captions = model.encode_captions(tokens_t, lengths_t)
    ref_scores = scorer(ref_images, ref_captions, lengths_t).numpy()
    image_input = _graph_inputs(sessions[Component.IMAGE_ENCODER])[0]
    ort_images = _run(sessions[Component.IMAGE_ENCODER], {image_input: sample.images})
    ort_captions = _run(sessions[Component.TEXT_ENCODER], {TOKEN_IDS: sample.token_ids, LENGTHS: sample.lengths})
    available = {
        IMAGE_EMBEDDINGS: ref_images.numpy(), CAPTION_EMBEDDINGS: ref_captions.numpy(), LENGTHS: sample.lengths
    }
    score_feeds = {name: available[name] for name in _graph_inputs(sessions[Component.SCORER])}
    errors = {
        Component.IMAGE_ENCODER.value: max_abs_error(ort_images, ref_images.numpy()),
        Component.TEXT_ENCODER.value: max_abs_error(ort_captions, ref_captions.numpy()),
        Component.SCORER.value: max_abs_error(_run(sessions[Component.SCORER], score_feeds), ref_scores),
    }
    chained = dict(score_feeds, **{IMAGE_EMBEDDINGS: ort_images, CAPTION_EMBEDDINGS: ort_captions})
    ort_scores = _run(sessions[Component.SCORER], chained)
    errors["end_to_end"] = max_abs_error(ort_scores, ref_scores)
    described = ParitySample(batch_images=int(sample.images.shape[0]), batch_captions=int(sample.token_ids.shape[0]),
                             lengths=[int(x) for x in sample.lengths], seed=sample.seed)
    return ParityResult(errors, top_k_identical(ort_scores, ref_scores, TOP_K), TOP_K, described)
