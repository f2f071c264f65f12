"""Calibration data per image-input kind (torch-free): a split's images and captions, batches, random inputs.

A bundle's manifest says what its image encoder takes (``traits.image_input``,
:mod:`itmrt.bundle.traits`): ``region_features`` read from a precomputed split
(``{split}_ims.npy``, :mod:`itmrt.data.precomp`) or ``images`` (pixels,
``{split}_images.npy``, :mod:`itmrt.data.images`). Calibration and the
families' specs both read the user's data through these functions, so neither
needs the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from itmrt.bundle.names import IMAGES, REGION_FEATURES
from itmrt.errors import DataError, ItmrtError

if TYPE_CHECKING:
    from itmrt.bundle.manifest import Manifest


@dataclass
class ImageSplit:
    """A split of the user's data for calibration: image inputs (memory-mapped) and each image's captions."""

    images: np.ndarray
    captions: list[list[str]]


def _unknown(kind: str) -> ItmrtError:
    return ItmrtError(f"unknown image input {kind!r}; itmrt reads {REGION_FEATURES} or {IMAGES}")


def open_image_split(kind: str, folder: Path, split: str, manifest: Manifest) -> ImageSplit:
    """Images and captions of ``split`` in ``folder``, checked against the bundle's dimensions."""
    if kind == REGION_FEATURES:
        return _open_region_split(folder, split, manifest)
    if kind == IMAGES:
        return _open_pixel_split(folder, split, manifest)
    raise _unknown(kind)


def _open_region_split(folder: Path, split: str, manifest: Manifest) -> ImageSplit:
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


def _open_pixel_split(folder: Path, split: str, manifest: Manifest) -> ImageSplit:
    from itmrt.data.images import ImageCaptionSplit

    image_split = ImageCaptionSplit.open(folder, split)
    images = image_split.images
    check_pixel_size(images, folder, split, manifest)
    captions: list[list[str]] = [[] for _ in range(images.shape[0])]
    for caption, image in zip(image_split.captions, image_split.caption_image):
        captions[int(image)].append(caption)
    return ImageSplit(images, captions)


def check_pixel_size(images: np.ndarray, folder: Path, split: str, manifest: Manifest,
                     remedy: str = "resize the calibration images") -> None:
    """Refuse a pixel split ``[N, H, W, 3]`` whose images are not the size the bundle's image encoder takes."""
    size = int(manifest.dims["image_size"])
    if images.shape[1:3] != (size, size):
        raise DataError(
            f"{folder} split '{split}' has {images.shape[1]}x{images.shape[2]} images; "
            f"the bundle's image encoder takes {size}x{size}: {remedy}"
        )


def image_batch(kind: str, block: np.ndarray) -> np.ndarray:
    """Rows of :attr:`ImageSplit.images` as the image encoder's float32 input."""
    if kind == REGION_FEATURES:
        return np.ascontiguousarray(block, dtype=np.float32)
    if kind == IMAGES:
        from itmrt.data.images import preprocess_images

        return preprocess_images(block)
    raise _unknown(kind)


def random_images(kind: str, manifest: Manifest, count: int, rng: np.random.Generator) -> np.ndarray:
    """Random image inputs shaped like the bundle's (when no calibration data is given)."""
    if kind == REGION_FEATURES:
        shape = (count, int(manifest.dims["num_regions"]), int(manifest.dims["img_dim"]))
        return np.abs(rng.standard_normal(shape)).astype(np.float32)
    if kind == IMAGES:
        size = int(manifest.dims["image_size"])
        return rng.standard_normal((count, 3, size, size)).astype(np.float32)
    raise _unknown(kind)
