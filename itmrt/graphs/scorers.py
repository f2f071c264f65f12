"""Scorer graphs: image embeddings x caption embeddings (+ lengths) -> scores ``[Bi, Bc]``.

Each graph mirrors the batched reference of its family op for op
(:func:`itmrt.models.scan.scan_scores`, :meth:`itmrt.models.cmpm.CMPMModel.scores`;
NAAF's graph is in its family's folder, :mod:`itmrt.families.naaf.graphs`, built
on the cross-attention pieces here): masks from int32 lengths (Range +
Less), no loop over captions or images, attended features never materialised.
The model's constants (NAAF's threshold, lambda and intra-caption factor;
SCAN's lambdas) are named float32 initializers, never graph inputs, and are
repeated in the model's ``metadata_props``.
"""

from __future__ import annotations

import numpy as np
import onnx

from itmrt.bundle.names import (
    BATCH_CAPTIONS,
    BATCH_IMAGES,
    CAPTION_EMBEDDINGS,
    IMAGE_EMBEDDINGS,
    LENGTHS,
    MAX_LENGTH,
    NUM_REGIONS,
    SCAN_LAMBDA_LSE,
    SCAN_LAMBDA_SOFTMAX,
    SCORES,
    Component,
)
from itmrt.graphs.onnx_graph import FLOAT, FLOAT32_LOWEST, INT32, GraphBuilder
from itmrt.models.scan import check_scan_options

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


def _scan_raw_norm(g: GraphBuilder, attn: str, raw_feature_norm: str, query_mask: str | None) -> str:
    """SCAN's ``raw_feature_norm`` over the query axis (-2); padded queries zeroed / masked out."""
    if raw_feature_norm == "softmax":
        if query_mask is None:
            return g.op("Softmax", [attn], "raw_softmax", axis=-2)
        return masked_softmax(g, attn, query_mask, -2, "raw_softmax")
    if raw_feature_norm.startswith("clipped"):
        attn = g.op("LeakyRelu", [attn], "raw_clipped", alpha=LEAKY_SLOPE)
    if query_mask is not None:
        attn = g.where(query_mask, attn, g.const(0.0), "raw_masked")
    if raw_feature_norm.endswith("l2norm"):
        norm = g.op("Sqrt", [g.reduce("ReduceSum", g.op("Mul", [attn, attn]), [-2], True)], "raw_l2")
        return g.op("Div", [attn, g.op("Add", [norm, g.const(NORM_EPS)])], "raw_l2norm")
    if raw_feature_norm.endswith("l1norm"):
        norm = g.reduce("ReduceSum", g.op("Abs", [attn]), [-2], True, "raw_l1")
        return g.op("Div", [attn, g.op("Add", [norm, g.const(NORM_EPS)])], "raw_l1norm")
    return attn


def _scan_aggregate(g: GraphBuilder, row_sim: str, agg_func: str, lambda_lse: str, mask: str | None) -> str:
    """Aggregate ``row_sim`` over its last axis (the queries); ``mask`` marks real queries."""
    if agg_func == "Max":
        filled = row_sim if mask is None else g.where(mask, row_sim, g.const(FLOAT32_LOWEST), "row_sim_filled")
        return g.reduce("ReduceMax", filled, [-1], False, "agg_max")
    terms = g.op("Exp", [g.op("Mul", [lambda_lse, row_sim])], "lse_terms") if agg_func == "LogSumExp" else row_sim
    if mask is not None:
        terms = g.where(mask, terms, g.const(0.0), "agg_terms")
    total = g.reduce("ReduceSum", terms, [-1], False, "agg_sum")
    if agg_func == "LogSumExp":
        return g.op("Div", [g.op("Log", [total]), lambda_lse], "agg_lse")
    if agg_func == "Mean":
        if mask is None:
            count = g.op("Cast", [g.dim_as_int32(row_sim, -1, "query_count")], "query_count_float", to=FLOAT)
        else:
            count = g.reduce("ReduceSum", g.op("Cast", [mask], "mask_float", to=FLOAT), [-1], False, "query_count")
        return g.op("Div", [total, count], "agg_mean")
    return total


def scan_scorer_graph(
    embed_size: int,
    cross_attn: str,
    raw_feature_norm: str,
    agg_func: str,
    lambda_softmax: float,
    lambda_lse: float,
    opset: int,
) -> onnx.ModelProto:
    """SCAN's score (docs/models.md section 4) for ``t2i`` or ``i2t``, batched and masked."""
    check_scan_options(cross_attn, raw_feature_norm, agg_func)
    g = GraphBuilder("scan_scorer", opset)
    lam = scalar_initializer(g, lambda_softmax, SCAN_LAMBDA_SOFTMAX)
    # Only LogSumExp uses lambda_lse; an unused initializer would be dropped by runtimes with a warning.
    lam_lse = scalar_initializer(g, lambda_lse, SCAN_LAMBDA_LSE) if agg_func == "LogSumExp" else ""
    images, captions, _lengths, token_mask, sims = cross_attention_inputs(g, embed_size)

    def norms(x: str, hint: str) -> str:
        return g.op("Sqrt", [g.reduce("ReduceSum", g.op("Mul", [x, x]), [-1], False)], hint)

    query_mask: str | None
    context_mask: str | None
    if cross_attn == "t2i":
        attn = sims  # [Bi, Bc, query=L, context=n]
        query_mask = g.unsqueeze(token_mask, [0], "query_mask")  # [1, Bc, L]
        context_mask = None
        gram = g.unsqueeze(gram_matrix(g, images, "region_gram"), [1])  # [Bi, 1, n, n]
        query_norms = g.unsqueeze(norms(captions, "word_norms"), [0])  # [1, Bc, L]
    else:
        attn = g.transpose(sims, [0, 1, 3, 2], "attn_i2t")  # [Bi, Bc, query=n, context=L]
        query_mask = None
        context_mask = g.unsqueeze(token_mask, [0, 2], "context_mask")  # [1, Bc, 1, L]
        gram = g.unsqueeze(gram_matrix(g, captions, "word_gram"), [0])  # [1, Bc, L, L]
        query_norms = g.unsqueeze(norms(images, "region_norms"), [1])  # [Bi, 1, n]

    raw_mask = None if query_mask is None else g.unsqueeze(query_mask, [-1], "query_mask_4d")
    logits = g.op("Mul", [lam, _scan_raw_norm(g, attn, raw_feature_norm, raw_mask)], "attn_logits")
    if context_mask is None:
        weights = g.op("Softmax", [logits], "attn_weights", axis=-1)
    else:
        weights = masked_softmax(g, logits, context_mask, -1, "attn_weights")
    products = g.reduce("ReduceSum", g.op("Mul", [weights, attn]), [-1], False, "query_dot_attended")
    attended_sq = g.reduce(
        "ReduceSum", g.op("Mul", [g.op("MatMul", [weights, gram]), weights]), [-1], False, "attended_sq"
    )
    attended_norms = g.op("Sqrt", [g.op("Max", [attended_sq, g.const(0.0)])], "attended_norms")
    denominator = g.op("Max", [g.op("Mul", [query_norms, attended_norms]), g.const(NORM_EPS)], "cosine_den")
    row_sim = g.op("Div", [products, denominator], "row_sim")
    scores = _scan_aggregate(g, row_sim, agg_func, lam_lse, query_mask)
    g.output(scores, SCORES, FLOAT, [BATCH_IMAGES, BATCH_CAPTIONS])
    return g.build(
        {
            "component": Component.SCORER.value,
            "family": "scan",
            "cross_attn": cross_attn,
            "raw_feature_norm": raw_feature_norm,
            "agg_func": agg_func,
            SCAN_LAMBDA_SOFTMAX: float32_text(lambda_softmax),
            SCAN_LAMBDA_LSE: float32_text(lambda_lse),
        }
    )  # lambda_lse stays in the metadata (an option of the model) even when the aggregation ignores it


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
