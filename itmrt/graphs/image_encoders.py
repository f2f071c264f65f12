"""Image-encoder graphs: region features -> region embeddings (NAAF/SCAN), images -> embedding (CMPM)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from itmrt.bundle.names import BATCH_IMAGES, IMAGE_EMBEDDINGS, IMAGES, NUM_REGIONS, REGION_FEATURES, Component
from itmrt.errors import ItmrtError
from itmrt.graphs.onnx_graph import FLOAT, GraphBuilder
from itmrt.models.cmpm import CMPMImageEncoder
from itmrt.models.encoders import ImageEncoder


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy()


def region_image_encoder_graph(encoder: ImageEncoder, opset: int) -> onnx.ModelProto:
    """``region_features [Bi, n, img_dim]`` -> ``image_embeddings [Bi, n, d]``.

    One MatMul + Add (weight normalisation folded into a plain weight), then the
    per-region l2norm unless the model was trained with ``no_imgnorm``.
    """
    g = GraphBuilder(Component.IMAGE_ENCODER.value, opset)
    features = g.input(REGION_FEATURES, FLOAT, [BATCH_IMAGES, NUM_REGIONS, encoder.img_dim])
    with torch.no_grad():
        weight_t = _numpy(encoder.effective_weight()).T  # [img_dim, d]
        bias = _numpy(encoder.fc.bias)
    projected = g.op("MatMul", [features, g.initializer(weight_t, "fc_weight_t")], "fc_matmul")
    embedded = g.op("Add", [projected, g.initializer(bias, "fc_bias")], "fc")
    if not encoder.no_imgnorm:
        embedded = g.l2norm(embedded, -1, hint="image_l2norm")
    g.output(embedded, IMAGE_EMBEDDINGS, FLOAT, [BATCH_IMAGES, NUM_REGIONS, encoder.embed_size])
    return g.build({"component": Component.IMAGE_ENCODER.value, "precomp_enc_type": encoder.precomp_enc_type})


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

    MobileNet v1 (``itmrt.models.cmpm``) is such a chain; any other leaf module
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
