"""Images with captions and identity labels: the dataset format CMPM trains and evaluates on.

A dataset folder holds ``vocab.json`` (either released vocabulary layout) and, per
split ``S``:

- ``S_images.npy``: uint8, ``images x H x W x 3`` (RGB, channels last), memory-mapped;
- ``S_caps.txt``: UTF-8, one caption per line (no blank lines);
- ``S_caption_image.npy``: int64 (any integer dtype is accepted), one entry per
  caption: the index of the image it describes. An image may have any number of
  captions (person-search data has about two, Flickr30K five);
- ``S_labels.npy`` (optional): int64, one *identity* label per image. Images with
  the same label show the same identity (the same person in CUHK-PEDES), so a
  caption matches every image of its identity. Without the file every image is its
  own identity. A caption's label is its image's label.

:func:`preprocess_images` turns uint8 images into the network input and
:func:`identity_recall_table` is the Recall@K of this setting: a retrieved item
counts as correct when it has the query's identity.

Only numpy and the standard library are imported: the torch-free runtime uses this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itmrt.bundle.manifest import CropStep, ImagePreprocessingRecord, ResizeStep
from itmrt.data.precomp import SplitSizes, check_split_name, open_npy, read_captions
from itmrt.errors import DataError
from itmrt.text.vocab import Vocabulary

IMAGE_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGE_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
"""Per-channel RGB mean and std applied after scaling to [0, 1] (the ImageNet values torchvision uses)."""

VOCAB_FILE = "vocab.json"


def preprocess_images(
    images: np.ndarray, mean: np.ndarray = IMAGE_MEAN, std: np.ndarray = IMAGE_STD, scale: float = 1.0 / 255.0
) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` RGB -> float32 ``[N, 3, H, W]``: ``(x * scale - mean) / std`` per channel.

    What CMPM trains on (scale 1/255, the ImageNet mean and std); the runtime
    applies it to image files with the values a bundle's manifest records.
    """
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise DataError(f"images have dtype {array.dtype}; expected uint8 RGB pixels (0-255)")
    if array.ndim != 4 or array.shape[3] != 3:
        raise DataError(f"images have shape {array.shape}; expected N x H x W x 3 (RGB, channels last)")
    scaled = array.astype(np.float32) * np.float32(scale)
    normalised = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


PREPROCESSING_KEY = "image_preprocessing"
"""The manifest section of a CMPM bundle that says how an image file becomes the image encoder's input."""


def image_preprocessing_record(image_size: int) -> ImagePreprocessingRecord:
    """The manifest's ``image_preprocessing`` section for a model trained on ``image_size`` square images.

    Training feeds uint8 RGB images of exactly ``image_size`` x ``image_size``
    through :func:`preprocess_images`. An image file is decoded to RGB (EXIF
    orientation applied); a file of another size is first resized, its shorter
    side to ``image_size`` (bilinear, antialiased), and cropped at the centre.
    """
    return ImagePreprocessingRecord(
        decode="rgb8",
        exif_transpose=True,
        resize=ResizeStep(shorter_side=int(image_size), filter="bilinear"),
        crop=CropStep(height=int(image_size), width=int(image_size), at="center"),
        scale=1.0 / 255.0,
        mean=[float(x) for x in IMAGE_MEAN],
        std=[float(x) for x in IMAGE_STD],
        layout="NCHW",
        trained_with="itmrt.data.images.preprocess_images",
    )


@dataclass(frozen=True)
class ImageCaptionSplit(SplitSizes):
    """One split of an image-caption dataset.

    ``images`` is a read-only memory map ``[num_images, H, W, 3]`` (uint8);
    ``captions[c]`` describes image ``caption_image[c]``; ``image_labels[i]`` is the
    identity of image ``i``.
    """

    data_dir: Path
    split: str
    images: np.ndarray
    captions: list[str]
    caption_image: np.ndarray
    image_labels: np.ndarray
    has_labels: bool

    @classmethod
    def open(cls, data_dir: str | Path, split: str) -> ImageCaptionSplit:
        """Open split ``split`` of ``data_dir``; raise :class:`DataError` (one line) if anything is malformed."""
        check_split_name(split)
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"data folder {folder} does not exist; pass the folder holding {split}_images.npy")
        images = _open_images(folder / f"{split}_images.npy")
        captions = read_captions(folder / f"{split}_caps.txt", "one caption per line")
        index_path = folder / f"{split}_caption_image.npy"
        caption_image = _open_integers(index_path, "caption-to-image index")
        if len(caption_image) != len(captions):
            raise DataError(
                f"{index_path} has {len(caption_image)} entries but {folder / f'{split}_caps.txt'} has "
                f"{len(captions)} captions; they need one entry per caption"
            )
        num_images = int(images.shape[0])
        if len(caption_image) and (int(caption_image.min()) < 0 or int(caption_image.max()) >= num_images):
            raise DataError(
                f"{index_path} holds image indices outside 0..{num_images - 1} "
                f"(min {int(caption_image.min())}, max {int(caption_image.max())}); {split}_images.npy has "
                f"{num_images} images"
            )
        labels_path = folder / f"{split}_labels.npy"
        if labels_path.exists():
            labels = _open_integers(labels_path, "identity labels")
            if len(labels) != num_images:
                raise DataError(
                    f"{labels_path} has {len(labels)} labels but {split}_images.npy has {num_images} images; "
                    "give one identity label per image"
                )
            has_labels = True
        else:
            labels = np.arange(num_images, dtype=np.int64)
            has_labels = False
        return cls(folder, split, images, captions, caption_image, labels, has_labels)

    @property
    def image_height(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_width(self) -> int:
        return int(self.images.shape[2])

    @property
    def caption_labels(self) -> np.ndarray:
        """Identity label of every caption (its image's label)."""
        return self.image_labels[self.caption_image]

    @property
    def num_identities(self) -> int:
        return int(np.unique(self.image_labels).size)


def load_vocabulary(data_dir: str | Path) -> Vocabulary:
    """The ``vocab.json`` of a dataset folder (raises :class:`~itmrt.errors.VocabularyError`)."""
    return Vocabulary.from_json(Path(data_dir) / VOCAB_FILE)


def _open_images(path: Path) -> np.ndarray:
    images = open_npy(path, "images")
    if images.dtype != np.uint8:
        raise DataError(f"images file {path} has dtype {images.dtype}; expected uint8 RGB pixels (N x H x W x 3)")
    if images.ndim != 4 or images.shape[3] != 3:
        raise DataError(f"images file {path} has shape {images.shape}; expected N x H x W x 3 (RGB, channels last)")
    if 0 in images.shape:
        raise DataError(f"images file {path} has shape {images.shape}; it holds no pixels")
    return images


def _open_integers(path: Path, what: str) -> np.ndarray:
    values = open_npy(path, what)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise DataError(
            f"{what} file {path} has dtype {values.dtype} and shape {values.shape}; expected a 1-D integer array"
        )
    return np.asarray(values, dtype=np.int64)
