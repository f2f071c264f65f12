"""SCAN's scorer graph: stacked cross attention (t2i or i2t) as one ONNX graph.

Op for op the batched reference :func:`itmrt.families.scan.model.scan_scores`; the inputs, the
similarity GEMM and the masked softmax come from :mod:`itmrt.graphs.scorers`.
"""

from __future__ import annotations

import onnx

from itmrt.bundle.names import BATCH_CAPTIONS, BATCH_IMAGES, SCAN_LAMBDA_LSE, SCAN_LAMBDA_SOFTMAX, SCORES, Component
from itmrt.families.scan.model import check_scan_options
from itmrt.graphs.onnx_graph import FLOAT, FLOAT32_LOWEST, GraphBuilder
from itmrt.graphs.scorers import (
    LEAKY_SLOPE,
    NORM_EPS,
    cross_attention_inputs,
    float32_text,
    gram_matrix,
    masked_softmax,
    scalar_initializer,
)


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
