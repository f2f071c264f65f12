"""What NAAF and SCAN share: region features in, a GRU text encoder, token-level captions, one matcher class.

Both are :class:`itmrt.families.matcher.CrossAttentionMatcher` models (the
authors' released code has one model for both, told apart by its options);
their graphs differ only in the scorer, which each family builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from itmrt.bundle.manifest import JsonScalar
from itmrt.bundle.names import Component
from itmrt.families.precomputed_regions import RegionFeatureFamily
from itmrt.families.spec import BuiltGraphs, GraphOptions, ReferenceScorer, ScorerConstants

if TYPE_CHECKING:
    import onnx


class CrossAttentionFamily(RegionFeatureFamily):
    """A region-feature family scored by cross-attention between words and regions."""

    token_level: ClassVar[bool] = True

    def model_from_config(self, config: dict[str, Any]) -> Any:
        from itmrt.families.matcher import CrossAttentionMatcher

        return CrossAttentionMatcher.from_opt(config, family=self.name)

    def scorer_graph(
        self, model: Any, options: GraphOptions
    ) -> tuple[onnx.ModelProto, ScorerConstants, ReferenceScorer]:
        """The scorer graph, the constants it froze and the PyTorch scorer that holds the same constants."""
        raise NotImplementedError

    def build_graphs(self, model: Any, options: GraphOptions) -> BuiltGraphs:
        from itmrt.graphs.image_encoders import region_image_encoder_graph
        from itmrt.graphs.text_encoders import text_encoder_graph

        image_encoder, text_encoder = model.image_encoder, model.text_encoder
        dims: dict[str, JsonScalar] = {
            "img_dim": image_encoder.img_dim,
            "embed_size": image_encoder.embed_size,
            "word_dim": text_encoder.word_dim,
            "vocab_size": text_encoder.vocab_size,
            "num_regions": options.num_regions,
            "num_layers": text_encoder.num_layers,
            "bidirectional": text_encoder.bidirectional,
        }
        scorer, constants, reference = self.scorer_graph(model, options)
        graphs = {
            Component.IMAGE_ENCODER.value: region_image_encoder_graph(image_encoder, options.opset),
            Component.TEXT_ENCODER.value: text_encoder_graph(text_encoder, options.opset),
            Component.SCORER.value: scorer,
        }
        return BuiltGraphs(graphs, dims, constants, reference, (options.num_regions, image_encoder.img_dim))

    # -- training (the region-feature trainer, :mod:`itmrt.train.trainer`) ------------------------

    def training_options(self, config: Any) -> dict[str, Any]:
        """The family's own entries of a new model's released options (``opt``), from a ``TrainConfig``."""
        raise NotImplementedError

    def training_scores(self, model: Any, image_emb: Any, caption_emb: Any, lengths: Any, threshold: float) -> Any:
        """The scores a batch trains with (``threshold``: the threshold being learned, where there is one)."""
        return model.score(image_emb, caption_emb, lengths)
