"""Families whose images are precomputed region features (``{split}_ims.npy``: images x regions x features)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from itmrt.bundle.manifest import Manifest
from itmrt.bundle.names import REGION_FEATURES
from itmrt.errors import DataError, ItmrtError
from itmrt.families.spec import FamilySpec, ImageSplit


class RegionFeatureFamily(FamilySpec):
    """The data side of a region-feature family; its reference model has ``image_encoder.img_dim``."""

    image_input: ClassVar[str] = REGION_FEATURES

    def open_image_split(self, folder: Path, split: str, manifest: Manifest) -> ImageSplit:
        from itmrt.data.precomp import PrecompSplit

        precomp = PrecompSplit.open(folder, split)
        img_dim, regions = int(manifest.dims["img_dim"]), int(manifest.dims["num_regions"])
        if precomp.img_dim != img_dim or precomp.num_regions != regions:
            raise DataError(
                f"{folder} split '{split}' has {precomp.num_regions} regions x {precomp.img_dim} features per image; "
                f"the bundle expects {regions} x {img_dim}: calibrate with the model's feature type"
            )
        per = precomp.captions_per_image
        captions = [list(precomp.captions[i * per : (i + 1) * per]) for i in range(precomp.num_images)]
        return ImageSplit(precomp.images, captions)

    def image_batch(self, block: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(block, dtype=np.float32)

    def random_images(self, manifest: Manifest, count: int, rng: np.random.Generator) -> np.ndarray:
        shape = (count, int(manifest.dims["num_regions"]), int(manifest.dims["img_dim"]))
        return np.abs(rng.standard_normal(shape)).astype(np.float32)

    def check_reference_images(self, model: Any, features: np.ndarray, source: str) -> None:
        expected = model.image_encoder.img_dim
        if features.ndim != 3 or features.shape[2] != expected:
            raise ItmrtError(
                f"{source} has shape {features.shape}; the checkpoint expects images x regions x {expected}"
            )
