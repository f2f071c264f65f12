"""SCAN (ECCV 2018): stacked cross attention, text-to-image (``t2i``) or image-to-text (``i2t``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from itmrt.bundle.names import SCAN_LAMBDA_SOFTMAX
from itmrt.families.cross_attention import CrossAttentionFamily
from itmrt.families.registry import register
from itmrt.families.scan.export_config import ScanExportConfig
from itmrt.families.spec import GraphOptions, ReferenceScorer, ScorerConstants, frozen

if TYPE_CHECKING:
    import onnx

DEFAULT_LAMBDA_SOFTMAX = 9.0


class ScanFamily(CrossAttentionFamily):
    name: ClassVar[str] = "scan"

    def scorer_graph(
        self, model: Any, options: GraphOptions
    ) -> tuple[onnx.ModelProto, ScorerConstants, ReferenceScorer]:
        from itmrt.families.scan.graphs import scan_scorer_graph

        scorer = model.scorer
        graph = scan_scorer_graph(
            model.image_encoder.embed_size, scorer.cross_attn, scorer.raw_feature_norm, scorer.agg_func,
            scorer.lambda_softmax, scorer.lambda_lse, options.opset,
        )
        constants = ScorerConstants(
            lambda_softmax=frozen(scorer.lambda_softmax, SCAN_LAMBDA_SOFTMAX),
            options={
                "cross_attn": scorer.cross_attn,
                "raw_feature_norm": scorer.raw_feature_norm,
                "agg_func": scorer.agg_func,
                "lambda_lse": float(np.float32(scorer.lambda_lse)),
            },
        )
        return graph, constants, scorer

    def export_config(self) -> ScanExportConfig:
        return ScanExportConfig()

    def training_options(self, config: Any) -> dict[str, Any]:
        lam = DEFAULT_LAMBDA_SOFTMAX if config.lambda_softmax is None else config.lambda_softmax
        return {"lambda_softmax": lam, "bi_gru": config.bi_gru, "cross_attn": config.cross_attn,
                "raw_feature_norm": config.raw_feature_norm, "agg_func": config.agg_func,
                "lambda_lse": config.lambda_lse}


SCAN = register(ScanFamily())
