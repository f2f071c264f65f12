"""Image files (JPEG, PNG, WebP) as a CMPM bundle's image-encoder input, torch-free (Pillow + numpy).

Where the images come from (:func:`list_image_files`):

* a folder: every ``.jpg``/``.jpeg``/``.png``/``.webp`` file under it, sorted by
  id; an image's id is its path relative to the folder (``cats/001.jpg``). A
  symbolic link that leads out of the folder is refused: only what the user
  listed is read;
* a text file: one image path per line (blank lines skipped); a relative path is
  taken from the list file's folder, and the line as written is the image's id.

How a file becomes model input: exactly the preprocessing the bundle's manifest
records in its ``image_preprocessing`` section (written at export by
:func:`itmrt.data.images.image_preprocessing_record`): decode to 8-bit RGB with
the EXIF orientation applied, resize the shorter side to the training size and
crop the centre when the file has another size, then the training arithmetic
:func:`itmrt.data.images.preprocess_images` (scale, mean, std, NCHW).

An unreadable or truncated file is an error naming it; with ``skip_bad`` it is
left out with a warning and counted instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.bundle.manifest import Manifest
from itmrt.bundle.names import IMAGES
from itmrt.bundle.traits import bundle_traits
from itmrt.data.images import PREPROCESSING_KEY, preprocess_images
from itmrt.documents import not_a_file
from itmrt.errors import DataError, ItmrtError, first_line
from itmrt.optional import require

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
"""Pillow's names of the formats read (by content, whatever a listed file's name says)."""


@dataclass
class ImageFiles:
    """Image files to encode: ``ids[k]`` names ``paths[k]`` in results and galleries."""

    ids: list[str]
    paths: list[Path]
    source: str

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ImagePreprocessing:
    """A bundle's ``image_preprocessing`` section: file -> ``[3, height, width]`` float32."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float
    exif_transpose: bool = True

    @classmethod
    def from_manifest(cls, manifest: Manifest, bundle: str) -> ImagePreprocessing:
        if bundle_traits(manifest).image_input != IMAGES:
            raise ItmrtError(
                f"bundle {bundle} is a {manifest.family} bundle, whose image encoder takes region features "
                "(a .npy file); image files are for CMPM bundles"
            )
        section = manifest.image_preprocessing
        if section is None:
            raise ItmrtError(
                f"bundle {bundle} does not record how its model preprocesses images (no '{PREPROCESSING_KEY}' in "
                "its manifest); export it again with this itmrt, or pass preprocessed images as a .npy file"
            )
        try:
            crop = section.crop
            if section.decode != "rgb8" or section.layout != "NCHW" or crop.at != "center":
                raise ValueError("an unknown decode, layout or crop")
            return cls(crop.height, crop.width, _triple(section.mean), _triple(section.std), section.scale,
                       section.exif_transpose)
        except (TypeError, ValueError) as exc:
            raise ItmrtError(
                f"bundle {bundle}: its '{PREPROCESSING_KEY}' section is malformed ({exc}); export it again"
            ) from None

    def pixels(self, path: Path) -> np.ndarray:
        """The file as uint8 RGB ``[height, width, 3]``: decoded, resized and cropped as recorded.

        Raises :class:`BadImageError` for a file Pillow cannot read or a format other than JPEG/PNG/WebP.
        """
        pil_image = require("PIL.Image", "reading image files")
        pil_ops = require("PIL.ImageOps", "reading image files")
        try:
            with pil_image.open(path) as opened:
                if opened.format not in IMAGE_FORMATS:
                    found = opened.format or "an unknown format"
                    raise BadImageError(path, f"it is {found}, not JPEG, PNG or WebP")
                image = pil_ops.exif_transpose(opened) if self.exif_transpose else opened
                image = image.convert("RGB")  # decodes the whole file: a truncated one fails here
        except BadImageError:
            raise
        except (OSError, SyntaxError, ValueError, pil_image.DecompressionBombError) as exc:
            raise BadImageError(path, first_line(exc)) from None
        if image.size != (self.width, self.height):
            image = _resize_and_crop(image, self.width, self.height, pil_image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> the image encoder's float32 ``[N, 3, H, W]`` (the training arithmetic)."""
        mean, std = np.array(self.mean, dtype=np.float32), np.array(self.std, dtype=np.float32)
        return preprocess_images(pixels, mean, std, self.scale)


class BadImageError(DataError):
    """An image file that cannot be read (its message names the file)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason


def _triple(values: Any) -> tuple[float, float, float]:
    first, second, third = (float(x) for x in values)
    return first, second, third


def _resize_and_crop(image: Any, width: int, height: int, resample: Any) -> Any:
    """Shorter side to the target's (aspect kept), then the centre ``width x height``."""
    have_w, have_h = image.size
    factor = max(width / have_w, height / have_h)
    new_w, new_h = max(width, round(have_w * factor)), max(height, round(have_h * factor))
    if (new_w, new_h) != (have_w, have_h):
        image = image.resize((new_w, new_h), resample)
    left, top = round((new_w - width) / 2), round((new_h - height) / 2)
    return image.crop((left, top, left + width, top + height))


def is_image_listing(path: str | Path) -> bool:
    """Whether ``--images PATH`` names image files (a folder or a list) rather than a ``.npy`` array."""
    return Path(path).suffix.lower() != ".npy"


def list_image_files(source: str | Path) -> ImageFiles:
    """The images of a folder, or of a text file listing one path per line (see the module's docstring)."""
    root = Path(source)
    if root.is_dir():
        return _folder_images(root)
    if root.is_file():
        return _listed_images(root)
    raise DataError(
        f"{root} {not_a_file(root)}; give a folder of images, a text file listing image paths, or a .npy file"
    )


def _folder_images(root: Path) -> ImageFiles:
    resolved_root = root.resolve()
    ids: list[str] = []
    paths: list[Path] = []
    for folder, _subfolders, files in os.walk(root):  # symbolic links to folders are not followed
        for name in files:
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = Path(folder) / name
            if not path.resolve().is_relative_to(resolved_root):
                raise DataError(f"{path} is a link to a file outside {root}; copy the image into the folder, "
                                "or list it in a text file")
            ids.append(path.relative_to(root).as_posix())
            paths.append(path)
    if not ids:
        raise DataError(f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                        "give a folder of images or a list file")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return ImageFiles([ids[k] for k in order], [paths[k] for k in order], str(root))


def _listed_images(listing: Path) -> ImageFiles:
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the image list {listing}: {first_line(exc)}; "
                        "give a UTF-8 text file, one path per line") from None
    ids: list[str] = []
    paths: list[Path] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry:
            continue
        if entry in seen:
            raise DataError(f"{listing} line {number}: {entry} is listed already (line {seen[entry]}); "
                            "list each image once")
        path = Path(entry) if Path(entry).is_absolute() else listing.parent / entry
        if not path.is_file():
            raise DataError(f"{listing} line {number}: no image file at {path}")
        seen[entry] = number
        ids.append(entry)
        paths.append(path)
    if not ids:
        raise DataError(f"{listing} lists no image paths; give one path per line")
    return ImageFiles(ids, paths, str(listing))


@dataclass
class ImageBatches:
    """Batches of model input from image files; unreadable files are errors or, with ``skip_bad``, skipped."""

    files: ImageFiles
    preprocessing: ImagePreprocessing
    batch_size: int
    skip_bad: bool = False
    warn: Callable[[str], None] | None = None
    skipped: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(ids, model input [B, 3, H, W])`` per batch of readable files."""
        ids: list[str] = []
        pixels: list[np.ndarray] = []
        for image_id, path in zip(self.files.ids, self.files.paths):
            try:
                pixels.append(self.preprocessing.pixels(path))
            except BadImageError as exc:
                if not self.skip_bad:
                    raise DataError(f"{exc}; fix or remove the file, or pass --skip-bad-images") from None
                self.skipped.append(image_id)
                if self.warn is not None:
                    self.warn(f"skipped {exc.path}: {exc.reason}")
                continue
            ids.append(image_id)
            if len(ids) == self.batch_size:
                yield ids, self.preprocessing.model_input(np.stack(pixels))
                ids, pixels = [], []
        if ids:
            yield ids, self.preprocessing.model_input(np.stack(pixels))
        if len(self.skipped) == len(self.files):
            raise DataError(f"none of the {len(self.files)} images of {self.files.source} could be read")
