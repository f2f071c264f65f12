"""Evaluate a checkpoint with the PyTorch reference: encode, score, Recall@K.

This is the reference path every deployed backend is compared against, so it
stays simple: captions are tokenised with the released rules, encoded in
batches, and the (images x captions) score matrix is filled tile by tile with
the batched scorer of the model's family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itmrt.data.precomp import PrecompSplit
from itmrt.errors import DataError, VocabularyError
from itmrt.metrics.recall import recall_table
from itmrt.models.native import recorded_vocab_sha256
from itmrt.text.vocab import Vocabulary

ProgressFn = Callable[[int], None]


@dataclass
class PaddedTokenEmbeddings:
    """Token embeddings of captions (PyTorch), padded to a common length."""

    embeddings: torch.Tensor  # [B, L, d]
    lengths: torch.Tensor  # [B] int64


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


@torch.no_grad()
def encode_images(
    model, features: np.ndarray, batch_size: int = 128, progress: ProgressFn | None = None
) -> torch.Tensor:
    """Region features [N, n, img_dim] -> region embeddings [N, n, d] (float32, CPU)."""
    out = []
    for start, stop in _batches(len(features), batch_size):
        # a writable copy of the memmap slice
        batch = torch.from_numpy(
            np.array(features[start:stop], dtype=np.float32)
        )
        out.append(model.encode_images(batch))
        if progress:
            progress(stop - start)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_captions(
    model, vocab: Vocabulary, captions: Sequence[str], batch_size: int = 128, progress: ProgressFn | None = None
) -> PaddedTokenEmbeddings:
    """Captions -> token embeddings [N, L_max, d] (zero past each caption's length) and lengths [N]."""
    chunks: list[torch.Tensor] = []
    all_lengths: list[torch.Tensor] = []
    for start, stop in _batches(len(captions), batch_size):
        ids, lengths = vocab.encode_batch(list(captions[start:stop]))
        ids_t = torch.from_numpy(ids.astype(np.int64))
        len_t = torch.from_numpy(lengths.astype(np.int64))
        chunks.append(model.encode_captions(ids_t, len_t))
        all_lengths.append(len_t)
        if progress:
            progress(stop - start)
    max_len = max(c.shape[1] for c in chunks)
    padded = [torch.nn.functional.pad(c, (0, 0, 0, max_len - c.shape[1])) for c in chunks]
    return PaddedTokenEmbeddings(torch.cat(padded), torch.cat(all_lengths))


@torch.no_grad()
def score_matrix(
    model,
    image_embeddings: torch.Tensor,
    captions: PaddedTokenEmbeddings,
    image_tile: int = 64,
    caption_tile: int = 128,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """The (images x captions) score matrix, computed tile by tile with the family's batched scorer."""
    n_img, n_cap = image_embeddings.shape[0], captions.embeddings.shape[0]
    scores = np.empty((n_img, n_cap), dtype=np.float32)
    for c0, c1 in _batches(n_cap, caption_tile):
        lengths = captions.lengths[c0:c1]
        emb = captions.embeddings[c0:c1]
        # token embeddings: trim the tile to its own longest caption (padding is inert, but costs time)
        if emb.dim() == 3:
            emb = emb[:, : int(lengths.max())]
        for i0, i1 in _batches(n_img, image_tile):
            scores[i0:i1, c0:c1] = model.score(image_embeddings[i0:i1], emb, lengths).numpy()
        if progress:
            progress(c1 - c0)
    return scores


@torch.no_grad()
def encode_token_ids(model, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 128) -> PaddedTokenEmbeddings:
    """Captions given as token ids -> embeddings in batches: ``[N, L_max, d]`` token embeddings (zero past
    each caption's length) or ``[N, D]`` global ones, whichever the model makes."""
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
    chunks = []
    for start, stop in _batches(len(ids), batch_size):
        part = ids[start:stop]
        tokens = np.full((len(part), max(len(x) for x in part)), pad_id, dtype=np.int64)
        for row, seq in enumerate(part):
            tokens[row, : len(seq)] = seq
        chunks.append(model.encode_captions(torch.from_numpy(tokens), lengths[start:stop]))
    if chunks and chunks[0].dim() == 3:
        longest = int(lengths.max())
        chunks = [torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in chunks]
    return PaddedTokenEmbeddings(torch.cat(chunks), lengths)


def reference_scores(model, features: np.ndarray, ids: Sequence[Sequence[int]], pad_id: int,
                     batch_size: int = 128) -> np.ndarray:
    """The reference model's ``images x captions`` score matrix for image inputs and tokenised captions."""
    images = encode_images(model, features, batch_size)
    return score_matrix(model, images, encode_token_ids(model, ids, pad_id, batch_size))


def evaluate_split(
    model,
    vocab: Vocabulary,
    split: PrecompSplit,
    batch_size: int = 128,
    progress_factory: Callable[[str, int], ProgressFn] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Encode and score a split with the reference model; return (recall table, score matrix)."""
    expected = getattr(model.image_encoder, "img_dim", None)
    if expected is not None and split.img_dim != expected:
        raise DataError(
            f"image features in {split.data_dir} have dimension {split.img_dim} but the checkpoint "
            f"expects {expected}; use features extracted for this model"
        )

    def bar(label: str, total: int) -> ProgressFn | None:
        return progress_factory(label, total) if progress_factory else None

    img = encode_images(model, split.images, batch_size, bar("encode images", split.num_images))
    caps = encode_captions(model, vocab, split.captions, batch_size, bar("encode captions", len(split.captions)))
    scores = score_matrix(model, img, caps, progress=bar("score", len(split.captions)))
    return recall_table(scores), scores


def check_vocabulary(model, vocab: Vocabulary, name: str) -> str:
    """Refuse a vocabulary that cannot be ``model``'s; return what could be checked, in words.

    The size must be the embedding's row count. A model itmrt trained records its
    vocabulary's hash (:func:`itmrt.models.native.recorded_vocab_sha256`), and another
    vocabulary of the same size - shuffled, or from another dataset - is refused by it. A
    released checkpoint records none: then only the size can be checked, and the words are
    the user's to vouch for.
    """
    vocab.check_fits(model.text_encoder.vocab_size, name)
    recorded = recorded_vocab_sha256(model)
    if recorded is None:
        return ("the vocabulary cannot be checked beyond its size: the checkpoint records no vocabulary hash "
                "(a released checkpoint); make sure it is the one the model was trained with")
    if recorded != vocab.sha256:
        raise VocabularyError(
            f"{name} is not the vocabulary the model was trained with (its content hash {vocab.sha256[:12]}... "
            f"differs from {recorded[:12]}... recorded in the checkpoint); pass the training run's vocabulary"
        )
    return "the vocabulary matches the hash recorded in the checkpoint"


def load_vocabulary_for(model, vocab_path: str | Path) -> Vocabulary:
    """Load a vocabulary and check it is ``model``'s (:func:`check_vocabulary`)."""
    vocab = Vocabulary.from_json(vocab_path)
    check_vocabulary(model, vocab, f"vocabulary {vocab_path}")
    return vocab
