"""NAAF (CVPR 2022): SCAN's cross-attention plus a learned threshold between matched and mismatched fragments.

Export freezes the checkpoint's ``thres_safe`` (or ``--threshold``), lambda and
the intra-caption factor into the scorer graph; training learns ``thres`` and
``thres_safe`` (:mod:`itmrt.families.naaf.threshold`) and scores batches without the
intra-caption propagation (docs/models.md section 2, last paragraph).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from itmrt.bundle.names import NAAF_INTRA_FACTOR, NAAF_LAMBDA, NAAF_THRESHOLD
from itmrt.errors import ItmrtError
from itmrt.families.cross_attention import CrossAttentionFamily
from itmrt.families.naaf.export_config import NaafExportConfig
from itmrt.families.registry import register
from itmrt.families.spec import GraphOptions, ReferenceScorer, ScorerConstants, frozen

if TYPE_CHECKING:
    import onnx

DEFAULT_LAMBDA_SOFTMAX = 20.0


class NaafFamily(CrossAttentionFamily):
    name: ClassVar[str] = "naaf"
    learns_threshold: ClassVar[bool] = True
    fused_scorer: ClassVar[bool] = True

    def scorer_graph(
        self, model: Any, options: GraphOptions
    ) -> tuple[onnx.ModelProto, ScorerConstants, ReferenceScorer]:
        from itmrt.families.naaf.graphs import naaf_scorer_graph
        from itmrt.families.naaf.model import NAAFScorer

        scorer = model.scorer
        checkpoint_threshold = float(model.opt.get("thres_safe", float(scorer.threshold)))
        if options.threshold is None:
            # The scorer's float32 buffer: exactly what PyTorch scores with.
            threshold, source = float(scorer.threshold), "checkpoint thres_safe"
        else:
            if not math.isfinite(options.threshold):
                raise ItmrtError(f"--threshold must be a finite number, not {options.threshold}")
            threshold, source = float(options.threshold), "--threshold override"
        lam, intra = float(scorer.lambda_softmax), float(scorer.intra_factor)
        graph = naaf_scorer_graph(model.image_encoder.embed_size, threshold, lam, intra, options.opset)
        constants = ScorerConstants(
            threshold=frozen(threshold, NAAF_THRESHOLD, source=source, checkpoint_value=checkpoint_threshold),
            lambda_softmax=frozen(lam, NAAF_LAMBDA),
            intra_factor=frozen(intra, NAAF_INTRA_FACTOR),
            options={"propagate": True},
        )
        return graph, constants, NAAFScorer(threshold, lam, intra)

    def export_config(self) -> NaafExportConfig:
        return NaafExportConfig()

    def training_options(self, config: Any) -> dict[str, Any]:
        lam = DEFAULT_LAMBDA_SOFTMAX if config.lambda_softmax is None else config.lambda_softmax
        return {"lambda_softmax": lam, "thres": 0.0, "thres_safe": 0.0, "alpha": config.alpha}

    def training_scores(self, model: Any, image_emb: Any, caption_emb: Any, lengths: Any, threshold: float) -> Any:
        from itmrt.families.naaf.model import naaf_scores

        # docs/models.md section 2, last paragraph: opt.thres and no intra-caption propagation.
        return naaf_scores(image_emb, caption_emb, lengths, threshold,
                           lambda_softmax=float(model.opt["lambda_softmax"]), propagate=False)


NAAF = register(NaafFamily())
