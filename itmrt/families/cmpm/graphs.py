"""CMPM's graphs: the MobileNet image tower, the BiLSTM text tower and the cosine scorer.

Each mirrors :class:`itmrt.families.cmpm.model.CMPMModel` (``encode_images``,
``encode_captions``, ``scores``); the text tower runs its LSTM with the shared
recurrent pieces of :mod:`itmrt.graphs.text_encoders`.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from itmrt.bundle.names import (
    BATCH_CAPTIONS,
    BATCH_IMAGES,
    CAPTION_EMBEDDINGS,
    IMAGE_EMBEDDINGS,
    IMAGES,
    LENGTHS,
    MAX_LENGTH,
    SCORES,
    TOKEN_IDS,
    Component,
)
from itmrt.errors import ItmrtError
from itmrt.families.cmpm.model import CMPMImageEncoder, CMPMTextEncoder
from itmrt.graphs.onnx_graph import FLOAT, FLOAT32_LOWEST, INT32, GraphBuilder
from itmrt.graphs.text_encoders import embed_time_major, run_rnn


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias with an eval-mode BatchNorm folded in."""
    weight = conv.weight.detach().to(torch.float64)
    bias = (
        conv.bias.detach().to(torch.float64)
        if conv.bias is not None
        else torch.zeros(conv.out_channels, dtype=torch.float64)
    )
    if bn is not None:
        assert bn.running_mean is not None and bn.running_var is not None
        scale = bn.weight.detach().to(torch.float64) / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
        weight = weight * scale.reshape(-1, 1, 1, 1)
        bias = (bias - bn.running_mean.to(torch.float64)) * scale + bn.bias.detach().to(torch.float64)
    return weight.to(torch.float32).numpy(), bias.to(torch.float32).numpy()


def _conv(g: GraphBuilder, x: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, hint: str) -> str:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ItmrtError(f"cannot export {hint}: only numeric zero padding is supported")
    weight, bias = _folded_conv(conv, bn)
    pad_h, pad_w = conv.padding
    return g.op(
        "Conv",
        [x, g.initializer(weight, f"{hint}_weight"), g.initializer(bias, f"{hint}_bias")],
        hint,
        kernel_shape=list(conv.kernel_size),
        strides=list(conv.stride),
        pads=[pad_h, pad_w, pad_h, pad_w],
        dilations=list(conv.dilation),
        group=conv.groups,
    )


def _sequential_cnn(g: GraphBuilder, x: str, backbone: nn.Module) -> str:
    """Convert a backbone whose forward runs its Conv/BN/ReLU leaves in registration order.

    MobileNet v1 (``itmrt.families.cmpm.model``) is such a chain; any other leaf module
    is refused instead of being silently skipped.
    """
    leaves = [m for m in backbone.modules() if len(list(m.children())) == 0]
    index = 0
    layer = 0
    while index < len(leaves):
        module = leaves[index]
        if isinstance(module, nn.Conv2d):
            following = leaves[index + 1] if index + 1 < len(leaves) else None
            bn = following if isinstance(following, nn.BatchNorm2d) else None
            x = _conv(g, x, module, bn, f"conv{layer}")
            index += 2 if bn is not None else 1
            layer += 1
        elif isinstance(module, nn.ReLU):
            x = g.op("Relu", [x], "relu")
            index += 1
        elif isinstance(module, nn.ReLU6):
            x = g.op("Clip", [x, g.const(0.0), g.const(6.0)], "relu6")
            index += 1
        else:
            raise ItmrtError(f"cannot export the CMPM backbone: unsupported layer {type(module).__name__}")
    return x


def cmpm_image_encoder_graph(encoder: CMPMImageEncoder, image_size: int, opset: int) -> onnx.ModelProto:
    """``images [Bi, 3, H, W]`` (preprocessed) -> ``image_embeddings [Bi, embed_size]`` (not normalised).

    Conv layers carry their BatchNorm folded in (eval mode); global average
    pooling and the 1x1 projection finish the embedding.
    """
    if encoder.training:
        raise ValueError("put the CMPM model in eval mode before exporting it")
    g = GraphBuilder(Component.IMAGE_ENCODER.value, opset)
    images = g.input(IMAGES, FLOAT, [BATCH_IMAGES, 3, image_size, image_size])
    features = _sequential_cnn(g, images, encoder.backbone)
    pooled = g.op("GlobalAveragePool", [features], "pool")
    projected = _conv(g, pooled, encoder.projection, None, "projection")
    embedding = g.op("Flatten", [projected], "flatten", axis=1)
    g.output(embedding, IMAGE_EMBEDDINGS, FLOAT, [BATCH_IMAGES, encoder.embed_size])
    return g.build({"component": Component.IMAGE_ENCODER.value, "image_size": str(image_size)})


def cmpm_text_encoder_graph(encoder: CMPMTextEncoder, opset: int) -> onnx.ModelProto:
    """``token_ids [Bc, L] int32``, ``lengths [Bc] int32`` -> ``caption_embeddings [Bc, embed_size]``.

    Embedding -> bidirectional ONNX LSTM with ``sequence_lens`` -> directions
    concatenated -> max over time -> linear projection. The max runs over the
    real tokens (padded positions set to the lowest float) unless the model
    reproduces the released max over the padding (padded positions set to 0).
    """
    g = GraphBuilder(Component.TEXT_ENCODER.value, opset)
    tokens = g.input(TOKEN_IDS, INT32, [BATCH_CAPTIONS, MAX_LENGTH])
    lengths = g.input(LENGTHS, INT32, [BATCH_CAPTIONS])
    x = embed_time_major(g, tokens, encoder.embed.weight)
    y = run_rnn(g, "LSTM", x, lengths, encoder.rnn)  # [L, 2, B, H]
    per_token = g.transpose(y, [2, 0, 1, 3], "lstm_batch_major")  # [B, L, 2, H]
    features = g.op("Reshape", [per_token, g.const([0, 0, -1], np.int64)], "lstm_concat")  # [B, L, 2H]
    mask = g.unsqueeze(g.length_mask(lengths, tokens, 1), [2], "token_mask_3d")
    fill = 0.0 if encoder.max_over_padding else FLOAT32_LOWEST
    features = g.where(mask, features, g.const(fill), "masked_features")
    pooled = g.reduce("ReduceMax", features, [1], False, "max_over_time")  # [B, 2H]
    weight_t = encoder.projection.weight.detach().to(torch.float32).cpu().numpy().T
    bias = encoder.projection.bias.detach().to(torch.float32).cpu().numpy()
    projected = g.op("MatMul", [pooled, g.initializer(weight_t, "projection_weight_t")], "projection_matmul")
    embedding = g.op("Add", [projected, g.initializer(bias, "projection_bias")], "projection")
    g.output(embedding, CAPTION_EMBEDDINGS, FLOAT, [BATCH_CAPTIONS, encoder.embed_size])
    return g.build(
        {"component": Component.TEXT_ENCODER.value, "max_over_padding": str(encoder.max_over_padding).lower()}
    )


def cosine_scorer_graph(embed_size: int, opset: int) -> onnx.ModelProto:
    """CMPM's score: cosine of global embeddings, ``[Bi, D] x [Bc, D] -> [Bi, Bc]``.

    Kept as a graph (one normalisation and one MatMul) so every family's bundle
    has a ``scorer.onnx`` and the runtime treats them alike.
    """
    g = GraphBuilder("cosine_scorer", opset)
    images = g.input(IMAGE_EMBEDDINGS, FLOAT, [BATCH_IMAGES, embed_size])
    captions = g.input(CAPTION_EMBEDDINGS, FLOAT, [BATCH_CAPTIONS, embed_size])
    image_unit = g.l2norm(images, -1, hint="image_unit")
    caption_unit = g.l2norm(captions, -1, hint="caption_unit")
    scores = g.op("MatMul", [image_unit, g.transpose(caption_unit, [1, 0])], "cosine")
    g.output(scores, SCORES, FLOAT, [BATCH_IMAGES, BATCH_CAPTIONS])
    return g.build({"component": Component.SCORER.value, "family": "cmpm"})
