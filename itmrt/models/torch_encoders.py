"""Image and text encoders shared by NAAF and SCAN (docs/models.md section 1).

Parameter names follow the released checkpoints exactly, so a released state
dict loads with ``strict=True``:

- image: ``fc.weight``, ``fc.bias`` (basic) or ``fc.weight_g``, ``fc.weight_v``,
  ``fc.bias`` (weight_norm);
- text: ``embed.weight`` (plain) or ``embed.glove.weight`` (GloVe layout), then
  PyTorch's GRU keys ``rnn.weight_ih_l0``, ``rnn.weight_ih_l0_reverse``, ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmrt.errors import ItmrtError
from itmrt.models.ops import l2norm

IMAGE_ENCODER_TYPES = ("basic", "weight_norm")
EMBEDDING_LAYOUTS = ("plain", "glove")


class WeightNormLinear(nn.Module):
    """A Linear layer under weight normalisation with ``dim=None``: ``W = g * V / ||V||_F``.

    PyTorch's classic ``torch.nn.utils.weight_norm`` stores exactly these
    parameters (``weight_g`` a 0-dim tensor, ``weight_v``, ``bias``), but it is
    deprecated; the parametrization API renames them
    (``parametrizations.weight.original0``), which would break loading released
    checkpoints. So the reparametrisation is written out here with the released
    names. Very old PyTorch versions saved ``weight_g`` with shape ``[1]``; such
    state dicts are accepted too.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Initialised like the released code: default Linear init for V, g = ||V||_F.
        reference = nn.Linear(in_features, out_features)
        self.weight_v = nn.Parameter(reference.weight.detach().clone())
        self.weight_g = nn.Parameter(reference.weight.detach().norm().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())

    def effective_weight(self) -> Tensor:
        """The folded plain weight ``g * V / ||V||_F``."""
        return self.weight_v * (self.weight_g / self.weight_v.norm())

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.effective_weight(), self.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "weight_g"
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.dim() > 0 and value.numel() == 1:
            state_dict[key] = value.reshape(())
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dim=None"


class ImageEncoder(nn.Module):
    """Precomputed region features ``[B, n, img_dim]`` -> region embeddings ``[B, n, embed_size]``."""

    def __init__(
        self,
        img_dim: int = 2048,
        embed_size: int = 1024,
        precomp_enc_type: str = "basic",
        no_imgnorm: bool = False,
    ) -> None:
        super().__init__()
        if precomp_enc_type not in IMAGE_ENCODER_TYPES:
            raise ItmrtError(
                f"unknown precomp_enc_type {precomp_enc_type!r}: expected one of {', '.join(IMAGE_ENCODER_TYPES)}"
            )
        self.img_dim = img_dim
        self.embed_size = embed_size
        self.precomp_enc_type = precomp_enc_type
        self.no_imgnorm = no_imgnorm
        self.fc: nn.Linear | WeightNormLinear
        if precomp_enc_type == "basic":
            self.fc = nn.Linear(img_dim, embed_size)
            # Xavier-uniform weight and zero bias, as the released basic encoder.
            bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)
            with torch.no_grad():
                self.fc.weight.uniform_(-bound, bound)
                self.fc.bias.zero_()
        else:
            self.fc = WeightNormLinear(img_dim, embed_size)

    def effective_weight(self) -> Tensor:
        """The plain Linear weight ``[embed_size, img_dim]`` (weight norm folded in)."""
        if isinstance(self.fc, WeightNormLinear):
            return self.fc.effective_weight()
        return self.fc.weight

    def forward(self, features: Tensor) -> Tensor:
        embedded = self.fc(features)
        if not self.no_imgnorm:
            embedded = l2norm(embedded, dim=-1)
        return embedded


class GloveEmbedding(nn.Module):
    """The GloVe key layout: an ``nn.Embedding`` named ``glove`` (key ``embed.glove.weight``).

    The table is frozen (``requires_grad=False``), which is what NAAF's GloVe
    variant intends; the computation is the same as a plain embedding.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.glove = nn.Embedding(num_embeddings, embedding_dim)
        self.glove.weight.requires_grad_(False)

    @property
    def weight(self) -> Tensor:
        return self.glove.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.glove(tokens)


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` -> per-token embeddings ``[B, L, embed_size]``.

    The GRU runs on the packed sequence, so each caption is processed over its
    own length only (the backward direction starts at its last real token).
    Bidirectional outputs are averaged, each token is l2-normalised unless
    ``no_txtnorm``, and padded positions come out as zero vectors.
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        embed_size: int = 1024,
        num_layers: int = 1,
        bidirectional: bool = True,
        no_txtnorm: bool = False,
        embedding_layout: str = "plain",
    ) -> None:
        super().__init__()
        if embedding_layout not in EMBEDDING_LAYOUTS:
            raise ItmrtError(
                f"unknown embedding_layout {embedding_layout!r}: expected one of {', '.join(EMBEDDING_LAYOUTS)}"
            )
        self.vocab_size = vocab_size
        self.word_dim = word_dim
        self.embed_size = embed_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.no_txtnorm = no_txtnorm
        self.embedding_layout = embedding_layout
        self.embed: nn.Embedding | GloveEmbedding
        if embedding_layout == "plain":
            self.embed = nn.Embedding(vocab_size, word_dim)
        else:
            self.embed = GloveEmbedding(vocab_size, word_dim)
        with torch.no_grad():
            self.embed.weight.uniform_(-0.1, 0.1)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional)

    def embedding_weight(self) -> Tensor:
        """The embedding table ``[vocab_size, word_dim]`` whatever the key layout."""
        return self.embed.weight

    def forward(self, tokens: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        max_len = tokens.size(1)
        lengths_cpu = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        embedded = self.embed(tokens)
        packed = pack_padded_sequence(embedded, lengths_cpu, batch_first=True, enforce_sorted=False)
        output, _ = self.rnn(packed)
        padded, _ = pad_packed_sequence(output, batch_first=True, total_length=max_len)
        if self.bidirectional:
            padded = (padded[:, :, : self.embed_size] + padded[:, :, self.embed_size :]) / 2
        if not self.no_txtnorm:
            padded = l2norm(padded, dim=-1)
        return padded
