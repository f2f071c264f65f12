"""The pieces every cross-attention scorer graph is built from (NAAF, SCAN).

Each family's scorer graph lives in its folder (:mod:`itmrt.families.naaf.graphs`,
:mod:`itmrt.families.scan.graphs`; CMPM's cosine scorer in
:mod:`itmrt.families.cmpm.graphs`) and mirrors its batched reference op for op
with what is here: the inputs with padded words zeroed and the similarities
``[Bi, Bc, L, n]`` from one large GEMM, masked softmax, Gram matrices, float32
constants. Masks come from int32 lengths (Range + Less), no loop over captions
or images, attended features never materialised. A model's constants are named
float32 initializers, never graph inputs, repeated in the model's ``metadata_props``.
"""

from __future__ import annotations

import numpy as np

from itmrt.bundle.names import (
    BATCH_CAPTIONS,
    BATCH_IMAGES,
    CAPTION_EMBEDDINGS,
    IMAGE_EMBEDDINGS,
    LENGTHS,
    MAX_LENGTH,
    NUM_REGIONS,
)
from itmrt.graphs.onnx_graph import FLOAT, FLOAT32_LOWEST, INT32, GraphBuilder

NORM_EPS = 1e-8
LEAKY_SLOPE = 0.1


def scalar_initializer(g: GraphBuilder, value: float, name: str) -> str:
    return g.initializer(np.asarray(value, dtype=np.float32), name)


def float32_text(value: float) -> str:
    """The float32 value as the shortest decimal that round-trips (what the initializer holds)."""
    return repr(float(np.float32(value)))


def cross_attention_inputs(g: GraphBuilder, embed_size: int) -> tuple[str, str, str, str, str]:
    """Inputs, the token mask, padded words zeroed, and ``sims [Bi, Bc, L, n]``."""
    images = g.input(IMAGE_EMBEDDINGS, FLOAT, [BATCH_IMAGES, NUM_REGIONS, embed_size])
    captions = g.input(CAPTION_EMBEDDINGS, FLOAT, [BATCH_CAPTIONS, MAX_LENGTH, embed_size])
    lengths = g.input(LENGTHS, INT32, [BATCH_CAPTIONS])
    token_mask = g.length_mask(lengths, captions, 1)  # [Bc, L]
    captions = g.where(g.unsqueeze(token_mask, [2]), captions, g.const(0.0), "captions_masked")
    # One large GEMM [Bc*L, d] x [d, Bi*n] instead of a broadcast batch of Bi*Bc small ones
    # (measured: the small products took 65% of a tile's time in ONNX Runtime).
    flat_shape = g.const([-1, embed_size], np.int64)
    flat_captions = g.op("Reshape", [captions, flat_shape], "captions_flat")  # [Bc*L, d]
    regions_t = g.transpose(g.op("Reshape", [images, flat_shape], "regions_flat"), [1, 0], "regions_t")  # [d, Bi*n]
    products = g.op("MatMul", [flat_captions, regions_t], "sims_flat")  # [Bc*L, Bi*n]
    grid = g.op(
        "Concat",
        [g.op("Shape", [captions], "caption_dims", start=0, end=2),
         g.op("Shape", [images], "image_dims", start=0, end=2)],
        "sims_grid",
        axis=0,
    )  # [Bc, L, Bi, n]
    sims = g.transpose(g.op("Reshape", [products, grid], "sims_4d"), [2, 0, 1, 3], "sims")  # [Bi, Bc, L, n]
    return images, captions, lengths, token_mask, sims


def masked_softmax(g: GraphBuilder, logits: str, mask: str, axis: int, hint: str) -> str:
    """Softmax over ``axis`` where masked-out entries get the lowest finite float (weight 0)."""
    filled = g.where(mask, logits, g.const(FLOAT32_LOWEST), f"{hint}_filled")
    return g.op("Softmax", [filled], hint, axis=axis)


def gram_matrix(g: GraphBuilder, x: str, hint: str) -> str:
    """``x x^T`` over the last two axes."""
    return g.op("MatMul", [x, g.transpose(x, [0, 2, 1], f"{hint}_t")], hint)
