"""What a model family is to itmrt: the base class every family spec fills in.

A family spec holds everything that differs between model families - the
reference model it rebuilds from a checkpoint's config, the graphs export
builds for it and the constants it freezes into the manifest, what its image
input is (region features or pixels) and how calibration reads and feeds that
data, whether its captions are token-level, and its training hooks - so the
pipeline code (export, calibration, runtime, reports, training) asks the spec
instead of testing family names. Each family's folder defines one subclass in
its ``spec.py`` and registers one instance (:func:`itmrt.families.register`).

Importing a spec never imports torch: the methods that need the PyTorch side
(the reference model, graph building) import it when called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from itmrt.bundle.manifest import FrozenConstant, ImagePreprocessingRecord, JsonScalar, Manifest
from itmrt.bundle.names import REGION_FEATURES
from itmrt.bundle.traits import RuntimeTraits
from itmrt.data.image_inputs import ImageSplit
from itmrt.errors import ItmrtError
from itmrt.families.export_config import ExportConfig

if TYPE_CHECKING:
    import onnx
    import torch

ReferenceScorer = Callable[..., "torch.Tensor"]
"""``(image embeddings, caption embeddings, lengths) -> scores [Bi, Bc]`` in PyTorch."""


@dataclass
class GraphOptions:
    """What export asks of a family's graphs: opset, regions per image, an optional threshold override."""

    opset: int = 17
    num_regions: int = 36
    threshold: float | None = None


@dataclass
class ScorerConstants:
    """The constants a scorer graph freezes (recorded in the manifest beside the graph)."""

    threshold: FrozenConstant | None = None
    lambda_softmax: FrozenConstant | None = None
    intra_factor: FrozenConstant | None = None
    options: dict[str, JsonScalar] = field(default_factory=dict)


@dataclass
class BuiltGraphs:
    """Every graph of a model's bundle (in memory), with what the manifest says about the model."""

    models: dict[str, onnx.ModelProto]
    dims: dict[str, JsonScalar]
    constants: ScorerConstants
    reference_scorer: ReferenceScorer | None  # the PyTorch scorer with the frozen constants; None: model.score
    image_shape: tuple[int, ...]  # one image input without its batch axis
    image_preprocessing: ImagePreprocessingRecord | None = None  # how an image file becomes the input (images)


def frozen(value: float, initializer: str, **extra: Any) -> FrozenConstant:
    """A constant as the scorer graph stores it: rounded to float32."""
    return FrozenConstant(value=float(np.float32(value)), initializer=initializer, **extra)


class FamilySpec:
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    image_input: ClassVar[str]
    """The image encoder's input: ``region_features`` (precomputed) or ``images`` (pixels)."""
    token_level: ClassVar[bool]
    """Captions become token embeddings and the scorer attends across words and regions."""
    learns_threshold: ClassVar[bool] = False
    """Training learns a similarity threshold that export freezes (``--threshold`` overrides it)."""
    fused_scorer: ClassVar[bool] = False
    """The runtime's fused CPU scorer computes this family's score."""
    scorer_kind: ClassVar[str | None] = None
    """The scorer's kind export records in the manifest's ``traits`` (None: the family's name)."""

    @property
    def nonnegative_images(self) -> bool:
        """Image inputs are non-negative (bottom-up region features); pixels are normalised around 0."""
        return self.image_input == REGION_FEATURES

    def caption_buckets(self, manifest: Manifest) -> bool:
        """Whether captions may be batched by length (an embedding does not depend on its batch's padding)."""
        return True

    def runtime_traits(self, manifest: Manifest) -> RuntimeTraits:
        """What export records in the manifest's ``traits``: all the runtime needs to know of this family."""
        return RuntimeTraits(
            image_input=self.image_input, token_level=self.token_level,
            caption_buckets=self.caption_buckets(manifest), scorer=self.scorer_kind or self.name,
            fused_scorer=self.fused_scorer,
        )

    # -- the user's data (torch-free) -------------------------------------------------

    def open_image_split(self, folder: Path, split: str, manifest: Manifest) -> ImageSplit:
        """Images and captions of ``split`` in ``folder``, checked against the bundle's dimensions."""
        raise NotImplementedError

    def image_batch(self, block: np.ndarray) -> np.ndarray:
        """Rows of :attr:`ImageSplit.images` as the image encoder's float32 input."""
        raise NotImplementedError

    def random_images(self, manifest: Manifest, count: int, rng: np.random.Generator) -> np.ndarray:
        """Random image inputs shaped like the bundle's (when no calibration data is given)."""
        raise NotImplementedError

    # -- the PyTorch side ------------------------------------------------------------------

    def model_from_config(self, config: dict[str, Any]) -> Any:
        """A freshly initialised reference model from the config a native checkpoint stores."""
        raise NotImplementedError

    def build_graphs(self, model: Any, options: GraphOptions) -> BuiltGraphs:
        """Every graph of ``model``'s bundle, checked by ``onnx.checker`` and strict shape inference."""
        raise NotImplementedError

    def export_config(self) -> ExportConfig:
        """The family's exporter config (its graphs, its parity tolerance); every family folder has one."""
        raise NotImplementedError

    def check_reference_images(self, model: Any, features: np.ndarray, source: str) -> None:
        """Refuse image inputs the reference model cannot take (one-line :class:`ItmrtError`)."""
        raise NotImplementedError

    def check_graph_options(self, options: GraphOptions, threshold_families: Sequence[str]) -> None:
        if options.threshold is not None and not self.learns_threshold:
            raise ItmrtError(
                f"--threshold applies to {', '.join(name.upper() for name in threshold_families)} models only; "
                f"this checkpoint is a {self.name.upper()} model"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
