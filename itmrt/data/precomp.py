"""Reader for precomputed region-feature datasets (the SCAN / NAAF ``*_precomp`` layout).

A split ``S`` of a dataset folder is two files:

- ``S_ims.npy``: float32, ``images x regions x img_dim`` (36 x 2048 for the public
  bottom-up-attention features). Some releases repeat every image once per caption,
  so the file then has one row per caption (5 identical consecutive rows per image).
- ``S_caps.txt``: UTF-8, one caption per line, ``CAPTIONS_PER_IMAGE`` consecutive
  lines per image.

The feature file is memory-mapped, never read whole: a 1 GB test split costs no
memory until rows are touched. For the repeated layout the reader keeps the
strided view ``[::5]`` of the memory map (still a memmap, no copy).

Only numpy and the standard library are imported: the torch-free runtime uses this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itmrt.data.npy import open_npy
from itmrt.documents import not_a_file
from itmrt.errors import DataError
from itmrt.text.tokenize import control_character

__all__ = ["CAPTIONS_PER_IMAGE", "PrecompSplit", "SplitSizes", "open_npy", "read_captions"]

CAPTIONS_PER_IMAGE = 5
"""Captions per image in Flickr30K and MSCOCO; the whole layout (and the metrics) assume it."""
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def check_split_name(split: object) -> str:
    """A split names files inside its data folder (``{split}_ims.npy``): letters, digits and underscores only,
    so that ``../x`` or ``/etc/x`` cannot lead outside it."""
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
        raise DataError(f"split name {split!r} is not allowed; use letters, digits and underscores (e.g. test)")
    return split


_LINE_END = re.compile(r"\r\n|\r|\n")
_LINE_END_BYTES = re.compile(rb"\r\n|\r|\n")

_REPEAT_CHECK_GROUPS = 2
"""How many leading image groups are compared row by row to confirm the repeated layout."""


class SplitSizes:
    """``num_images`` and ``num_captions`` of a split that holds ``images`` (one row per image) and ``captions``."""

    images: np.ndarray
    captions: list[str]

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_captions(self) -> int:
        return len(self.captions)


@dataclass(frozen=True)
class PrecompSplit(SplitSizes):
    """One split of a precomputed-feature dataset.

    ``images`` is a read-only memory map ``[num_images, num_regions, img_dim]``;
    ``captions[i]`` describes image ``caption_image_index(i)``.
    """

    data_dir: Path
    split: str
    images: np.ndarray
    captions: list[str]
    images_path: Path
    captions_path: Path
    repeated_layout: bool
    captions_per_image: int = CAPTIONS_PER_IMAGE

    @classmethod
    def open(
        cls,
        data_dir: str | Path,
        split: str,
        captions_per_image: int = CAPTIONS_PER_IMAGE,
    ) -> PrecompSplit:
        """Open ``{split}_ims.npy`` and ``{split}_caps.txt`` in ``data_dir``; raise DataError if malformed."""
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        check_split_name(split)
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(
                f"data folder {folder} does not exist; pass the folder holding {split}_ims.npy and {split}_caps.txt"
            )
        images_path = folder / f"{split}_ims.npy"
        captions_path = folder / f"{split}_caps.txt"
        captions = read_captions(captions_path)
        features = _open_features(images_path)
        images, repeated = _deduplicate(features, len(captions), captions_per_image, images_path, captions_path)
        return cls(
            data_dir=folder,
            split=split,
            images=images,
            captions=captions,
            images_path=images_path,
            captions_path=captions_path,
            repeated_layout=repeated,
            captions_per_image=captions_per_image,
        )

    @property
    def num_regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def img_dim(self) -> int:
        return int(self.images.shape[2])

    def caption_image_index(self, caption_index: int) -> int:
        """Index of the image that caption ``caption_index`` describes."""
        return caption_index // self.captions_per_image

    def image_caption_indices(self, image_index: int) -> range:
        """Indices of the captions that describe image ``image_index``."""
        start = image_index * self.captions_per_image
        return range(start, start + self.captions_per_image)


def read_captions(path: Path, layout: str = f"one caption per line, {CAPTIONS_PER_IMAGE} per image") -> list[str]:
    """Read a captions file: strict UTF-8, one non-empty caption per line.

    ``layout`` describes the expected file in the error messages.

    Lines end with ``\\n``, ``\\r\\n`` or a lone ``\\r`` (old Mac files), as Python's universal
    newlines read them. Surrounding whitespace is stripped per line, as the released
    loaders do. Blank lines after the last caption are ignored; an empty line anywhere
    else is an error, because it would shift every later caption onto the wrong image.
    """
    if path.is_dir():
        raise DataError(f"captions file {path} is a folder; expected a text file with {layout}")
    if not path.is_file():
        raise DataError(f"captions file {path} {not_a_file(path, 'not found')}; expected {layout}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read captions file {path}: {exc.strerror}") from None
    if not raw.strip():
        raise DataError(f"captions file {path} is empty; expected {layout}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_number = len(_LINE_END_BYTES.split(raw[: exc.start]))
        raise DataError(
            f"captions file {path} line {line_number} is not valid "
            f"UTF-8 (byte {exc.start}); re-encode the file as UTF-8"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _LINE_END.split(text)
    while lines and lines[-1].strip() == "":
        lines.pop()  # the newline that ends the last line, and blank lines after the last caption (they shift nothing)
    captions: list[str] = []
    for number, line in enumerate(lines, start=1):
        caption = line.strip()
        if not caption:
            raise DataError(
                f"captions file {path} line {number} is empty; remove blank lines (each line is one caption)"
            )
        control = control_character(caption)
        if control is not None:
            raise DataError(f"captions file {path} line {number} holds the control character {control}; captions "
                            "are plain text: remove it")
        captions.append(caption)
    if not captions:  # only whitespace, in the wider sense of Unicode
        raise DataError(f"captions file {path} is empty; expected {layout}")
    return captions


def _open_features(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"image features file {path} {not_a_file(path, 'not found')}; "
                        "expected a float32 .npy of images x regions x dim")
    features = open_npy(path, "image features")
    if features.ndim != 3:
        raise DataError(
            f"image features file {path} has shape {features.shape}; expected 3 dimensions (images x regions x dim)"
        )
    if features.dtype != np.float32:
        raise DataError(
            f"image features file {path} has dtype {features.dtype}; "
            "expected float32 (convert with arr.astype('float32'))"
        )
    if features.shape[1] == 0 or features.shape[2] == 0:
        raise DataError(
            f"image features file {path} has shape {features.shape}; regions and feature dim must be non-zero"
        )
    return features


def _deduplicate(
    features: np.ndarray,
    num_captions: int,
    captions_per_image: int,
    images_path: Path,
    captions_path: Path,
) -> tuple[np.ndarray, bool]:
    """Return (one row per image, whether the file repeats each image once per caption)."""
    rows = int(features.shape[0])
    if num_captions % captions_per_image != 0:
        raise DataError(
            f"captions file {captions_path} has {num_captions} lines, not a multiple of {captions_per_image}; "
            f"every image needs exactly {captions_per_image} consecutive captions"
        )
    expected_images = num_captions // captions_per_image
    if rows == expected_images:
        return features, False
    if rows == num_captions and captions_per_image > 1:
        groups = min(_REPEAT_CHECK_GROUPS, expected_images)
        head = np.asarray(features[: groups * captions_per_image])
        head = head.reshape(groups, captions_per_image, *features.shape[1:])
        if not np.array_equal(head, np.broadcast_to(head[:, :1], head.shape)):
            raise DataError(
                f"image features file {images_path} has one row per caption ({rows}) but rows "
                f"0-{captions_per_image - 1} "
                f"differ; expected {expected_images} images or each image repeated {captions_per_image}x"
            )
        return features[::captions_per_image], True
    raise DataError(
        f"image features file {images_path} has {rows} rows but {captions_path} has {num_captions} captions; "
        f"expected {expected_images} rows (or {num_captions} with each image repeated {captions_per_image}x)"
    )
