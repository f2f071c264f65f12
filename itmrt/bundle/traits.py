"""What the runtime needs to know about a bundle's model, read from the manifest alone (torch-free).

Export writes a ``traits`` section into ``manifest.json`` (:class:`RuntimeTraits`):

- ``image_input``: what the image encoder takes - ``region_features``
  (precomputed, images x regions x features) or ``images`` (pixels, read from
  image files through the manifest's ``image_preprocessing``);
- ``token_level``: the caption granularity - token embeddings the scorer attends
  across (NAAF, SCAN), or one global embedding per caption (CMPM);
- ``caption_buckets``: whether captions may be batched by length (false when a
  caption's embedding depends on its batch's padding);
- ``scorer``: the scorer's kind (``naaf``, ``scan``, ``cosine``, or a family's
  own); its constants are the manifest's ``threshold``, ``lambda_softmax``,
  ``intra_factor`` and ``scorer_options``;
- ``fused_scorer``: the runtime's fused CPU scorer computes this score.

So a bundle opens where only the base install is present: the runtime, the
service, calibration and the reports read these fields, never the family
registry (which lives on the PyTorch side). A manifest written before the
section existed still reads: :func:`bundle_traits` fills it in from the small
table :data:`BUILTIN_TRAITS` of the built-in families' values (a test checks
that table against the family specs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from itmrt.bundle.names import IMAGES, REGION_FEATURES
from itmrt.bundle.record import JsonRecord
from itmrt.errors import ItmrtError

if TYPE_CHECKING:
    from itmrt.bundle.manifest import Manifest

IMAGE_INPUTS = (REGION_FEATURES, IMAGES)
SCORER_PATTERN = {"pattern": r"^[a-z][a-z0-9_]{0,31}$", "means": "a scorer kind"}


@dataclass(kw_only=True)
class RuntimeTraits(JsonRecord):
    """The manifest's ``traits``: how the runtime feeds and scores the bundle's graphs."""

    image_input: str = field(metadata={"choices": IMAGE_INPUTS})
    token_level: bool
    caption_buckets: bool = True
    scorer: str = field(metadata=SCORER_PATTERN)
    fused_scorer: bool = False

    @property
    def nonnegative_images(self) -> bool:
        """Image inputs are non-negative (bottom-up region features); pixels are normalised around 0."""
        return self.image_input == REGION_FEATURES


BUILTIN_TRAITS: dict[str, RuntimeTraits] = {
    "naaf": RuntimeTraits(image_input=REGION_FEATURES, token_level=True, scorer="naaf", fused_scorer=True),
    "scan": RuntimeTraits(image_input=REGION_FEATURES, token_level=True, scorer="scan"),
    "cmpm": RuntimeTraits(image_input=IMAGES, token_level=False, scorer="cosine"),
}
"""The built-in families' traits, for manifests written before export recorded them."""


def max_over_padding(manifest: Manifest) -> bool:
    """A CMPM model trained with the released max over padding: its caption embedding depends on the padding."""
    return bool(manifest.scorer_options.get("max_over_padding", False))


def bundle_traits(manifest: Manifest) -> RuntimeTraits:
    """The manifest's ``traits``, or for an older manifest its built-in family's (one-line error otherwise)."""
    if manifest.traits is not None:
        return manifest.traits
    default = BUILTIN_TRAITS.get(manifest.family)
    if default is None:
        raise ItmrtError(
            f"the bundle's manifest records no 'traits' and {manifest.family!r} is not a built-in family; "
            "export the bundle again with this itmrt"
        )
    return replace(default, caption_buckets=not max_over_padding(manifest))
