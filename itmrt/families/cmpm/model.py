"""CMPM / CMPC dual encoder: MobileNet v1 image tower and BiLSTM text tower (docs/models.md section 5).

Both towers end in a projection to a joint space of ``embed_size`` (512); the
score of an image and a caption is the cosine of their embeddings, so a gallery
is ranked with one matrix product.

Max over time in the text tower
-------------------------------
The released CMPM code takes the maximum of the BiLSTM outputs over the whole
padded length of the batch, where the outputs are zero. A caption's embedding
then depends on how much padding its batch had (every negative coordinate of a
short caption is lifted to 0 when a longer caption shares its batch).
``max_over_padding=False`` (the default, what itmrt trains and deploys) takes
the maximum over the caption's real tokens only, so an embedding is the same
in any batch. ``max_over_padding=True`` reproduces the released behaviour: the
padded positions of the given ``tokens`` tensor take part as zero vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# (output channels, stride) of the 13 depthwise-separable blocks of MobileNet v1.
_MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
_MOBILENET_V1_STEM = 32
_CONFIG_KEYS = ("vocab_size", "word_dim", "lstm_hidden", "embed_size", "width_mult", "image_size", "max_over_padding")


_CONFIG_SIZES = {"vocab_size": 1 << 24, "word_dim": 1 << 16, "lstm_hidden": 1 << 16, "embed_size": 1 << 16,
                 "image_size": 4096}


def _check_config(config: dict[str, Any]) -> None:
    """Sizes are integers from 1 to a sane maximum, ``width_mult`` a finite number in (0, 4] (``ValueError``)."""
    for key, high in _CONFIG_SIZES.items():
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
            raise ValueError(f"'{key}' is {value!r}; it must be an integer from 1 to {high}")
    width = config.get("width_mult", 1.0)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4 or width != width:
        raise ValueError(f"'width_mult' is {width!r}; it must be a finite number in (0, 4]")


def scaled_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """Channels scaled by ``width_mult``, rounded to a multiple of ``divisor``.

    The usual MobileNet rounding: to the nearest multiple, never below
    ``divisor`` and never more than 10% below the exact scaled value.
    """
    exact = channels * width_mult
    rounded = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * exact:
        rounded += divisor
    return rounded


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv_bn_relu(in_ch, in_ch, 3, stride, groups=in_ch)
        self.pointwise = _conv_bn_relu(in_ch, out_ch, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """MobileNet v1 feature extractor (no classifier): [B, 3, H, W] -> [B, C, H/32, W/32]."""

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.width_mult = width_mult
        stem = scaled_channels(_MOBILENET_V1_STEM, width_mult)
        layers: list[nn.Module] = [_conv_bn_relu(3, stem, 3, 2)]
        in_ch = stem
        for channels, stride in _MOBILENET_V1_BLOCKS:
            out_ch = scaled_channels(channels, width_mult)
            layers.append(DepthwiseSeparable(in_ch, out_ch, stride))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.out_channels = in_ch

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


class CMPMImageEncoder(nn.Module):
    """MobileNet v1 -> global average pool -> 1x1 conv projection: [B, 3, H, W] -> [B, embed_size]."""

    def __init__(self, embed_size: int = 512, width_mult: float = 1.0) -> None:
        super().__init__()
        self.backbone = MobileNetV1(width_mult)
        self.projection = nn.Conv2d(self.backbone.out_channels, embed_size, kernel_size=1)
        self.embed_size = embed_size

    def forward(self, images: Tensor) -> Tensor:
        pooled = self.backbone(images).mean(dim=(2, 3), keepdim=True)
        return self.projection(pooled).flatten(1)


def _lengths_tensor(lengths: Tensor | Sequence[int], batch: int, max_len: int) -> Tensor:
    as_tensor = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1).cpu()
    if as_tensor.numel() != batch:
        raise ValueError(f"got {as_tensor.numel()} lengths for a batch of {batch} captions")
    if batch and (int(as_tensor.min()) < 1 or int(as_tensor.max()) > max_len):
        raise ValueError(f"caption lengths must lie in [1, {max_len}], got {as_tensor.tolist()}")
    return as_tensor


class CMPMTextEncoder(nn.Module):
    """Embedding -> BiLSTM (packed) -> concat directions -> max over time -> linear: [B, L] -> [B, embed_size]."""

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        lstm_hidden: int = 512,
        embed_size: int = 512,
        max_over_padding: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.LSTM(word_dim, lstm_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.projection = nn.Linear(2 * lstm_hidden, embed_size)
        self.vocab_size = vocab_size
        self.word_dim = word_dim
        self.lstm_hidden = lstm_hidden
        self.embed_size = embed_size
        self.max_over_padding = max_over_padding

    def token_features(self, tokens: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        """BiLSTM outputs [B, L, 2*hidden], each caption run over its own length; zeros at padding."""
        batch, max_len = tokens.shape
        lengths_cpu = _lengths_tensor(lengths, batch, max_len)
        packed = pack_padded_sequence(self.embed(tokens), lengths_cpu, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        return padded

    def forward(self, tokens: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        features = self.token_features(tokens, lengths)
        if not self.max_over_padding:
            positions = torch.arange(features.shape[1], device=features.device)
            lengths_dev = torch.as_tensor(lengths, dtype=torch.int64, device=features.device).reshape(-1, 1)
            padding = (positions.unsqueeze(0) >= lengths_dev).unsqueeze(-1)
            features = features.masked_fill(padding, float("-inf"))
        pooled = features.max(dim=1).values
        return self.projection(pooled)


class CMPMModel(nn.Module):
    """The CMPM/CMPC dual encoder; ``scores`` is the cosine matrix of the two embeddings.

    ``encode_images`` / ``encode_captions`` / ``score`` are the interface every
    reference model shares (:class:`itmrt.families.matcher.CrossAttentionMatcher`
    has the same), so export parity and the reference paths treat families alike.
    """

    family = "cmpm"
    vocab_sha256: str | None = None  # the training vocabulary's hash, where itmrt trained the model

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        lstm_hidden: int = 512,
        embed_size: int = 512,
        width_mult: float = 1.0,
        image_size: int = 224,
        max_over_padding: bool = False,
    ) -> None:
        super().__init__()
        self.image_encoder = CMPMImageEncoder(embed_size, width_mult)
        self.text_encoder = CMPMTextEncoder(vocab_size, word_dim, lstm_hidden, embed_size, max_over_padding)
        self.vocab_size = vocab_size
        self.word_dim = word_dim
        self.lstm_hidden = lstm_hidden
        self.embed_size = embed_size
        self.width_mult = width_mult
        # The input resolution the model is trained and exported at; the network
        # itself accepts any size (global pooling).
        self.image_size = image_size
        self.max_over_padding = max_over_padding

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments; ``CMPMModel(**model.config)`` builds the same architecture."""
        return {key: getattr(self, key) for key in _CONFIG_KEYS}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CMPMModel:
        known = set(_CONFIG_KEYS)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown CMPM config keys: {', '.join(unknown)}")
        _check_config(config)
        return cls(**config)

    def encode_image(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, embed_size] (not normalised)."""
        return self.image_encoder(images)

    def encode_text(self, tokens: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        """[B, L] token ids with real lengths -> [B, embed_size] (not normalised)."""
        return self.text_encoder(tokens, lengths)

    def encode_images(self, images: Tensor) -> Tensor:
        return self.encode_image(images)

    def encode_captions(self, tokens: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        return self.encode_text(tokens, lengths)

    def score(self, image_emb: Tensor, text_emb: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Scores ``[Bi, Bc]`` (caption lengths are not needed: the embeddings are global)."""
        return self.scores(image_emb, text_emb)

    @staticmethod
    def scores(image_emb: Tensor, text_emb: Tensor, eps: float = 1e-8) -> Tensor:
        """Cosine similarity matrix [Bi, Bt]."""
        image_unit = image_emb / (image_emb.norm(dim=-1, keepdim=True) + eps)
        text_unit = text_emb / (text_emb.norm(dim=-1, keepdim=True) + eps)
        return image_unit @ text_unit.transpose(0, 1)

    def forward(self, images: Tensor, tokens: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        return self.scores(self.encode_image(images), self.encode_text(tokens, lengths))
