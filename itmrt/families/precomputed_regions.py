"""Families whose images are precomputed region features (``{split}_ims.npy``: images x regions x features)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from itmrt.bundle.manifest import Manifest
from itmrt.bundle.names import REGION_FEATURES
from itmrt.data import image_inputs
from itmrt.errors import ItmrtError
from itmrt.families.spec import FamilySpec, ImageSplit


class RegionFeatureFamily(FamilySpec):
    """The data side of a region-feature family; its reference model has ``image_encoder.img_dim``."""

    image_input: ClassVar[str] = REGION_FEATURES

    def open_image_split(self, folder: Path, split: str, manifest: Manifest) -> ImageSplit:
        return image_inputs.open_image_split(REGION_FEATURES, folder, split, manifest)

    def image_batch(self, block: np.ndarray) -> np.ndarray:
        return image_inputs.image_batch(REGION_FEATURES, block)

    def random_images(self, manifest: Manifest, count: int, rng: np.random.Generator) -> np.ndarray:
        return image_inputs.random_images(REGION_FEATURES, manifest, count, rng)

    def check_reference_images(self, model: Any, features: np.ndarray, source: str) -> None:
        expected = model.image_encoder.img_dim
        if features.ndim != 3 or features.shape[2] != expected:
            raise ItmrtError(
                f"{source} has shape {features.shape}; the checkpoint expects images x regions x {expected}"
            )
