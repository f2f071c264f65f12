"""CMPM / CMPC (ECCV 2018): a MobileNet image tower and a BiLSTM text tower scored by cosine.

Images are pixels (``{split}_images.npy``, :mod:`itmrt.data.images`), captions
become one global embedding each, and the scorer is one cosine matrix. A model
trained with the released max over padding (``max_over_padding``) makes a
caption's embedding depend on its batch's padding, so the runtime then keeps
captions in their order instead of batching them by length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from itmrt.bundle.manifest import Manifest
from itmrt.bundle.names import IMAGES, Component
from itmrt.bundle.traits import max_over_padding
from itmrt.data import image_inputs
from itmrt.errors import ItmrtError
from itmrt.families.cmpm.export_config import CmpmExportConfig
from itmrt.families.registry import register
from itmrt.families.spec import BuiltGraphs, FamilySpec, GraphOptions, ImageSplit, ScorerConstants

DIM_KEYS = ("vocab_size", "word_dim", "lstm_hidden", "embed_size", "width_mult", "image_size")


class CmpmFamily(FamilySpec):
    name: ClassVar[str] = "cmpm"
    image_input: ClassVar[str] = IMAGES
    token_level: ClassVar[bool] = False

    scorer_kind: ClassVar[str] = "cosine"

    def caption_buckets(self, manifest: Manifest) -> bool:
        return not max_over_padding(manifest)

    # -- data ---------------------------------------------------------------------------

    def open_image_split(self, folder: Path, split: str, manifest: Manifest) -> ImageSplit:
        return image_inputs.open_image_split(IMAGES, folder, split, manifest)

    def image_batch(self, block: np.ndarray) -> np.ndarray:
        return image_inputs.image_batch(IMAGES, block)

    def random_images(self, manifest: Manifest, count: int, rng: np.random.Generator) -> np.ndarray:
        return image_inputs.random_images(IMAGES, manifest, count, rng)

    # -- PyTorch side -------------------------------------------------------------------------

    def model_from_config(self, config: dict[str, Any]) -> Any:
        from itmrt.families.cmpm.model import CMPMModel

        return CMPMModel.from_config(config)

    def build_graphs(self, model: Any, options: GraphOptions) -> BuiltGraphs:
        from itmrt.families.cmpm.graphs import cmpm_image_encoder_graph, cmpm_text_encoder_graph, cosine_scorer_graph

        graphs = {
            Component.IMAGE_ENCODER.value: cmpm_image_encoder_graph(
                model.image_encoder, model.image_size, options.opset),
            Component.TEXT_ENCODER.value: cmpm_text_encoder_graph(model.text_encoder, options.opset),
            Component.SCORER.value: cosine_scorer_graph(model.embed_size, options.opset),
        }
        dims = {key: model.config[key] for key in DIM_KEYS}
        constants = ScorerConstants(options={"score": "cosine", "max_over_padding": model.max_over_padding})
        from itmrt.data.images import image_preprocessing_record

        return BuiltGraphs(graphs, dims, constants, None, (3, model.image_size, model.image_size),
                           image_preprocessing_record(model.image_size))

    def export_config(self) -> CmpmExportConfig:
        return CmpmExportConfig()

    def check_reference_images(self, model: Any, features: np.ndarray, source: str) -> None:
        if features.ndim != 4 or features.shape[1] != 3:
            raise ItmrtError(f"{source} has shape {features.shape}; a CMPM checkpoint takes images x 3 x H x W")


CMPM = register(CmpmFamily())
