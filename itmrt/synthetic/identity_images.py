"""Synthetic images with captions and identity labels, for training and testing CMPM.

Each *identity* is a small scene: 1-3 objects of distinct classes, each with a
colour, a position and a size. An object class is drawn as a shape with a
texture (``OBJECT_SHAPES[class]``: rectangle, disc or triangle; solid, striped,
checked, dotted, hollow or two-tone), filled with its colour. Every image of an
identity redraws the same scene with jitter (position, size, brightness), a new
background tint and pixel noise, so images of one identity differ but share
their content - the person-search setting CMPM was designed for, in miniature.

Captions use the words of :mod:`itmrt.synthetic.region_features` (its object classes,
colours and caption templates; its ``vocab.json``): they name every object of
the scene with its colour, in random order, and some negate an absent object.
Captions contain only lower-case words separated by single spaces.

Files written (the format :class:`itmrt.data.images.ImageCaptionSplit` reads):
``{split}_images.npy``, ``{split}_caps.txt``, ``{split}_caption_image.npy``,
``{split}_labels.npy``, ``{split}_meta.json`` (each identity's objects) and
``vocab.json``. Identity labels are numbered ``0 .. n-1`` within each split.

Only numpy and the standard library are imported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from itmrt.data.precomp import check_split_name
from itmrt.errors import DataError
from itmrt.publish import check_empty_folder, publish_folder, staged_folder, umask_mode
from itmrt.synthetic.region_features import (
    COLOURS,
    DEFAULT_SPLITS,
    NEGATIVE_TEMPLATES,
    OBJECT_CLASSES,
    POSITIVE_TEMPLATES,
    _stable_hash,
    vocabulary_json,
)

SHAPES = ("rectangle", "disc", "triangle")
TEXTURES = ("solid", "hstripes", "vstripes", "checker", "hollow", "dots", "diagonal", "halves")
OBJECT_SHAPES: dict[str, tuple[str, str]] = {
    noun: (SHAPES[index % len(SHAPES)], TEXTURES[index // len(SHAPES)]) for index, noun in enumerate(OBJECT_CLASSES)
}
"""How each object class looks: (shape, texture). Distinct for every class."""

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "blue": (35, 70, 215),
    "green": (40, 170, 60),
    "yellow": (235, 215, 40),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "brown": (125, 75, 30),
    "orange": (245, 135, 20),
}
MAX_OBJECTS_PER_IDENTITY = 3
_SLOTS = ((0.27, 0.27), (0.27, 0.73), (0.73, 0.27), (0.73, 0.73))
"""Object centres, as fractions of the image side (one quadrant each, so objects rarely overlap)."""

if len(OBJECT_SHAPES) != len(set(OBJECT_SHAPES.values())) or set(COLOUR_RGB) != set(COLOURS):
    raise ImportError("synthetic_images: the object/colour tables do not cover itmrt.synthetic.region_features's words")


def make_synthetic_image_dataset(
    out_dir: str | Path,
    num_identities: Mapping[str, int] | int,
    images_per_identity: int = 2,
    captions_per_image: tuple[int, int] | int = (2, 5),
    image_size: int = 64,
    seed: int = 0,
    *,
    negation_fraction: float = 0.2,
    noise_std: float = 8.0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic image-caption dataset to ``out_dir`` and return that folder.

    ``num_identities``: per split, as ``{"train": 300, "dev": 100}``, or one integer
    used for each of train, dev and test. ``captions_per_image``: a fixed count or
    an inclusive range ``(low, high)`` drawn per image. The output is a pure
    function of the arguments (the same seed gives byte-identical files) and a
    split does not depend on which other splits are made. Refuses a non-empty
    existing ``out_dir`` unless ``overwrite``.
    """
    splits = _check_arguments(num_identities, images_per_identity, captions_per_image, image_size, seed,
                              negation_fraction, noise_std)
    low, high = (captions_per_image, captions_per_image) if isinstance(captions_per_image, int) else captions_per_image
    target = Path(out_dir)
    check_empty_folder(target, overwrite, error=DataError)
    target.parent.mkdir(parents=True, exist_ok=True)

    with staged_folder(target) as staging:
        for split, count in splits.items():
            rng = np.random.default_rng([seed, 2, _stable_hash(split)])
            identities = [_random_identity(rng, image_size) for _ in range(count)]
            images = np.empty((count * images_per_identity, image_size, image_size, 3), dtype=np.uint8)
            captions: list[str] = []
            caption_image: list[int] = []
            for identity_index, identity in enumerate(identities):
                for copy in range(images_per_identity):
                    image_index = identity_index * images_per_identity + copy
                    images[image_index] = _draw_image(rng, identity, image_size, noise_std)
                    for _ in range(int(rng.integers(low, high + 1))):
                        captions.append(_compose_caption(rng, identity, negation_fraction))
                        caption_image.append(image_index)
            labels = np.repeat(np.arange(count, dtype=np.int64), images_per_identity)
            np.save(staging / f"{split}_images.npy", images, allow_pickle=False)
            np.save(
                staging / f"{split}_caption_image.npy", np.asarray(caption_image, dtype=np.int64), allow_pickle=False
            )
            np.save(staging / f"{split}_labels.npy", labels, allow_pickle=False)
            (staging / f"{split}_caps.txt").write_bytes("".join(text + "\n" for text in captions).encode("utf-8"))
            meta = {
                "seed": seed, "split": split, "image_size": image_size, "images_per_identity": images_per_identity,
                "identities": [
                    [{"noun": obj["noun"], "colour": obj["colour"]} for obj in identity] for identity in identities
                ],
            }
            (staging / f"{split}_meta.json").write_bytes(
                (json.dumps(meta, separators=(",", ":")) + "\n").encode("utf-8")
            )
        (staging / "vocab.json").write_bytes(
            (json.dumps(vocabulary_json(), separators=(",", ":")) + "\n").encode("utf-8")
        )
        staging.chmod(umask_mode())  # staging folders are private; the dataset folder should not be
        publish_folder(staging, target, "merge")
    return target


def _check_arguments(
    num_identities: Mapping[str, int] | int, images_per_identity: int, captions_per_image: tuple[int, int] | int,
    image_size: int, seed: int, negation_fraction: float, noise_std: float,
) -> dict[str, int]:
    splits = ({split: num_identities for split in DEFAULT_SPLITS} if isinstance(num_identities, int)
              else dict(num_identities))
    if not splits:
        raise DataError("no splits requested; pass num_identities as an int or e.g. {'train': 300, 'dev': 100}")
    for split, count in splits.items():
        check_split_name(split)
        if not isinstance(count, int) or count < 1:
            raise DataError(f"split {split!r} needs at least 1 identity, got {count!r}")
    if not isinstance(images_per_identity, int) or images_per_identity < 1:
        raise DataError(f"images_per_identity must be >= 1, got {images_per_identity!r}")
    bounds = ((captions_per_image, captions_per_image) if isinstance(captions_per_image, int)
              else tuple(captions_per_image))
    if len(bounds) != 2 or not all(isinstance(b, int) for b in bounds) or not 1 <= bounds[0] <= bounds[1]:
        raise DataError(
            "captions_per_image must be a count >= 1 or a range (low, "
            f"high) with 1 <= low <= high, got {captions_per_image!r}"
        )
    if not isinstance(image_size, int) or image_size < 32:
        raise DataError(f"image_size must be an integer >= 32 (MobileNet downsamples by 32), got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= negation_fraction <= 1.0:
        raise DataError(f"negation_fraction must be within [0, 1], got {negation_fraction}")
    if noise_std < 0:
        raise DataError(f"noise_std must be >= 0, got {noise_std}")
    return splits


def _random_identity(rng: np.random.Generator, image_size: int) -> list[dict]:
    """1-3 objects of distinct classes, each in its own quadrant, with a colour and a radius in pixels."""
    count = int(rng.integers(1, MAX_OBJECTS_PER_IDENTITY + 1))
    classes = rng.choice(len(OBJECT_CLASSES), size=count, replace=False)
    slots = rng.choice(len(_SLOTS), size=count, replace=False)
    identity = []
    for class_index, slot in zip(classes, slots):
        # A lone object may sit near the centre and be larger.
        centre = (0.5, 0.5) if count == 1 else _SLOTS[int(slot)]
        scale = (0.18, 0.3) if count == 1 else (0.13, 0.2)
        identity.append({
            "noun": OBJECT_CLASSES[int(class_index)],
            "colour": COLOURS[int(rng.integers(len(COLOURS)))],
            "cy": (centre[0] + rng.uniform(-0.05, 0.05)) * image_size,
            "cx": (centre[1] + rng.uniform(-0.05, 0.05)) * image_size,
            "radius": rng.uniform(*scale) * image_size,
        })
    return identity


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Pixels inside a shape of the given radius centred at (0, 0); dy/dx are pixel offsets."""
    if shape == "rectangle":
        return (np.abs(dy) <= 0.75 * radius) & (np.abs(dx) <= radius)
    if shape == "disc":
        return dy * dy + dx * dx <= radius * radius
    # Upward triangle: apex at the top, base at the bottom; half-width grows linearly.
    height = (dy + radius) / (2 * radius)
    return (height >= 0) & (height <= 1) & (np.abs(dx) <= height * radius)


def _texture_mask(texture: str, dy: np.ndarray, dx: np.ndarray, radius: float, inside: np.ndarray,
                  shape: str) -> np.ndarray:
    """Which pixels of the object take its colour (the rest take a contrasting shade)."""
    period = max(2.0, radius / 3.0)
    if texture == "solid":
        return np.ones_like(inside)
    if texture == "hstripes":
        return np.floor(dy / period) % 2 == 0
    if texture == "vstripes":
        return np.floor(dx / period) % 2 == 0
    if texture == "checker":
        return (np.floor(dy / period) + np.floor(dx / period)) % 2 == 0
    if texture == "hollow":
        return ~_shape_mask(shape, dy, dx, radius * 0.55)
    if texture == "dots":
        cell = period * 1.5
        return (np.mod(dy, cell) - cell / 2) ** 2 + (np.mod(dx, cell) - cell / 2) ** 2 > (cell / 3.5) ** 2
    if texture == "diagonal":
        return np.floor((dy + dx) / period) % 2 == 0
    return dx < 0  # "halves": left half coloured, right half shaded


def _contrast_shade(rgb: np.ndarray) -> np.ndarray:
    """A darker version of a light colour, a lighter version of a dark one."""
    luminance = float(rgb @ np.array([0.299, 0.587, 0.114]))
    return rgb * 0.35 if luminance > 90 else rgb + (255.0 - rgb) * 0.55


def _draw_image(rng: np.random.Generator, identity: list[dict], size: int, noise_std: float) -> np.ndarray:
    """One image of an identity: its objects with per-image jitter on a tinted, noisy background."""
    grey = rng.uniform(95, 165)
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[...] = grey + rng.uniform(-15, 15, size=3)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    for obj in identity:
        shape, texture = OBJECT_SHAPES[obj["noun"]]
        radius = obj["radius"] * rng.uniform(0.9, 1.1)
        dy = rows - (obj["cy"] + rng.uniform(-0.06, 0.06) * size)
        dx = cols - (obj["cx"] + rng.uniform(-0.06, 0.06) * size)
        inside = _shape_mask(shape, dy, dx, radius)
        coloured = _texture_mask(texture, dy, dx, radius, inside, shape)
        rgb = np.clip(np.asarray(COLOUR_RGB[obj["colour"]], dtype=np.float64) * rng.uniform(0.88, 1.12), 0, 255)
        shade = _contrast_shade(rgb)
        canvas[inside & coloured] = rgb
        if texture != "hollow":  # a hollow shape shows the background through its middle
            canvas[inside & ~coloured] = shade
    canvas += rng.normal(0.0, noise_std, size=canvas.shape) if noise_std > 0 else 0.0
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _compose_caption(rng: np.random.Generator, identity: list[dict], negation_fraction: float) -> str:
    """Name every object with its colour, in random order, with one of synthetic.py's templates."""
    phrases = [f"{_article(obj['colour'])} {obj['colour']} {obj['noun']}" for obj in identity]
    phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    listing = " and ".join(phrases)
    templates = [t for t in POSITIVE_TEMPLATES if len(phrases) > 1 or "{rest}" not in t]
    template = templates[int(rng.integers(len(templates)))]
    positive = template.format(objects=listing, first=phrases[0], rest=" and ".join(phrases[1:]))
    if rng.random() >= negation_fraction:
        return positive
    present = {obj["noun"] for obj in identity}
    absent = [noun for noun in OBJECT_CLASSES if noun not in present]
    negative = NEGATIVE_TEMPLATES[int(rng.integers(len(NEGATIVE_TEMPLATES)))]
    return negative.format(positive=positive, objects=listing, absent=absent[int(rng.integers(len(absent)))])
