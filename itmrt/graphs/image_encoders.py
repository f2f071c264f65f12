"""Image-encoder graphs: region features -> region embeddings (NAAF/SCAN; CMPM's: :mod:`itmrt.families.cmpm.graphs`)."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from itmrt.bundle.names import BATCH_IMAGES, IMAGE_EMBEDDINGS, NUM_REGIONS, REGION_FEATURES, Component
from itmrt.graphs.onnx_graph import FLOAT, GraphBuilder
from itmrt.models.torch_encoders import ImageEncoder


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
