"""NAAF's scorer graph: its test-time score (docs/models.md section 2) as one ONNX graph.

It mirrors :func:`itmrt.families.naaf.model.naaf_scores` step by step, on the
cross-attention pieces every cross-attention family shares
(:mod:`itmrt.graphs.scorers`).
"""

from __future__ import annotations

import onnx

from itmrt.bundle.names import (
    BATCH_CAPTIONS,
    BATCH_IMAGES,
    NAAF_INTRA_FACTOR,
    NAAF_LAMBDA,
    NAAF_THRESHOLD,
    SCORES,
    Component,
)
from itmrt.graphs.onnx_graph import FLOAT, GraphBuilder
from itmrt.graphs.scorers import (
    LEAKY_SLOPE,
    NORM_EPS,
    cross_attention_inputs,
    float32_text,
    gram_matrix,
    masked_softmax,
    scalar_initializer,
)


def naaf_scorer_graph(
    embed_size: int, threshold: float, lambda_softmax: float, intra_factor: float, opset: int
) -> onnx.ModelProto:
    """NAAF's test-time score (docs/models.md section 2), batched over images and captions.

    Step 4 is the max-shifted masked softmax of ``naaf_scores`` (finite in
    float16); ``u . vhat`` and ``||vhat||`` come from ``sum_j w s`` and
    ``w^T G w`` with the per-image Gram matrix.
    """
    g = GraphBuilder("naaf_scorer", opset)
    t = scalar_initializer(g, threshold, NAAF_THRESHOLD)
    lam = scalar_initializer(g, lambda_softmax, NAAF_LAMBDA)
    intra_factor_c = scalar_initializer(g, intra_factor, NAAF_INTRA_FACTOR)
    images, captions, lengths, token_mask, sims = cross_attention_inputs(g, embed_size)
    zero = g.const(0.0)
    mask = g.unsqueeze(token_mask, [0], "word_mask")  # [1, Bc, L]

    # Steps 2-3: threshold shift, negative branch with intra-caption propagation.
    shifted = g.op("Sub", [sims, t], "shifted")
    row_max = g.where(mask, g.reduce("ReduceMax", shifted, [-1], False, "row_max_raw"), zero, "row_max")
    word_logits = g.op("Mul", [intra_factor_c, gram_matrix(g, captions, "word_gram")], "word_logits")  # [Bc, L, L]
    intra = masked_softmax(g, word_logits, g.unsqueeze(token_mask, [1]), -1, "intra_softmax")
    decision = g.squeeze(
        g.op("MatMul", [g.unsqueeze(intra, [0]), g.unsqueeze(row_max, [-1])], "propagated"), [-1], "decision"
    )
    negative = g.where(g.op("Less", [decision, zero], "is_negative"), row_max, zero, "negative")

    # Step 4: max-shifted masked softmax over the positive entries.
    has_positive = g.op("Greater", [row_max, zero], "has_positive")
    positive = g.op("Greater", [shifted, zero], "positive")
    centred = g.op("Sub", [shifted, g.unsqueeze(row_max, [-1])], "centred")
    exps = g.where(positive, g.op("Exp", [g.op("Mul", [lam, centred])], "exps_all"), zero, "exps")
    clamped_max = g.op("Max", [row_max, zero], "row_max_clamped")
    eps_term = g.op(
        "Mul",
        [g.const(NORM_EPS), g.op("Exp", [g.op("Mul", [g.op("Neg", [lam]), clamped_max])])],
        "eps_term",
    )
    exp_sum = g.op("Add", [g.reduce("ReduceSum", exps, [-1], False, "exp_sum"), eps_term], "exp_sum_eps")
    denominator = g.where(has_positive, exp_sum, g.const(1.0), "denominator")
    weights = g.op("Div", [exps, g.unsqueeze(denominator, [-1])], "weights")
    dot = g.reduce("ReduceSum", g.op("Mul", [weights, sims]), [-1], False, "u_dot_vhat")
    gram = g.unsqueeze(gram_matrix(g, images, "region_gram"), [1])  # [Bi, 1, n, n]
    quad = g.op("Mul", [g.op("MatMul", [weights, gram], "weights_gram"), weights])
    norm_sq = g.reduce("ReduceSum", quad, [-1], False, "vhat_norm_sq")
    vhat_norm = g.op("Sqrt", [g.op("Max", [norm_sq, g.const(NORM_EPS * NORM_EPS)])], "vhat_norm")
    aggregated = g.where(has_positive, g.op("Div", [dot, vhat_norm]), zero, "aggregated")

    # Step 5: relevance, norm over the caption's real words.
    clipped = g.op("LeakyRelu", [sims], "clipped", alpha=LEAKY_SLOPE)
    clipped = g.where(g.unsqueeze(mask, [-1]), clipped, zero, "clipped_masked")
    word_norm = g.op(
        "Sqrt",
        [g.reduce("ReduceSum", g.op("Mul", [clipped, clipped]), [-2], True, "clipped_sq_sum")],
        "clipped_norm",
    )
    normalised = g.op("Div", [clipped, g.op("Add", [word_norm, g.const(NORM_EPS)])], "clipped_normalised")
    relevance_weights = g.op("Softmax", [g.op("Mul", [lam, normalised])], "relevance_weights", axis=-1)
    relevance = g.reduce("ReduceSum", g.op("Mul", [relevance_weights, sims]), [-1], False, "relevance")

    # Step 6: mean over the real words.
    per_word = g.op("Add", [g.op("Add", [negative, aggregated]), relevance], "per_word_raw")
    per_word = g.where(mask, per_word, zero, "per_word")
    total = g.reduce("ReduceSum", per_word, [-1], False, "word_sum")
    count = g.unsqueeze(g.op("Cast", [lengths], "lengths_float", to=FLOAT), [0])
    scores = g.op("Div", [total, count], "scores_raw")
    g.output(scores, SCORES, FLOAT, [BATCH_IMAGES, BATCH_CAPTIONS])
    return g.build(
        {
            "component": Component.SCORER.value,
            "family": "naaf",
            NAAF_THRESHOLD: float32_text(threshold),
            NAAF_LAMBDA: float32_text(lambda_softmax),
            NAAF_INTRA_FACTOR: float32_text(intra_factor),
        }
    )
