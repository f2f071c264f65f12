"""A synthetic precomputed-feature dataset that a model can learn, built around mismatched words.

The world has ``len(OBJECT_CLASSES)`` object classes and ``len(COLOURS)`` colours.
Each class and each colour is a fixed random direction in feature space (shared by
all splits of one seed). An image holds 2-4 distinct objects; each object fills a
few regions with ``prototype + colour + noise``, the other regions are background
noise, and the region order is shuffled.

Every caption names all objects present (usually with their colour). Images come
in confusable pairs: image B has exactly image A's objects (same colours) plus one
extra object X. A caption of B therefore names one object, X, that image A does
not hold - a *mismatched word* against A. That is NAAF's point: SCAN-style
attention keeps only aligned evidence, so such a caption fits A almost as well as
B; NAAF learns a boundary between matched and mismatched word-region similarities
and lets a mismatched word lower the score. :mod:`itmrt.metrics.mismatched_words` measures it.

With ``negations=True`` many captions also name an *absent* object under a
negation ("with no cat", "but without any kite", "and there is no bus"), and
several of A's captions say "no X". This is linguistic negation, which NAAF does
not model: its negative branch sees the word X, which B holds, whatever precedes
it. Real captions (Flickr30K, COCO) rarely negate; the recipe keeps the "no X"
captions all the same because, measured, they help: trained with them, the small
NAAF and SCAN rank an image's own caption above its pair's (which names an object
it lacks) more often, on captions *without* negations, than trained on
``negations=False`` data (docs/naaf-negative-branch.md).

Files written per split: ``{split}_ims.npy`` (float32, images x regions x dim),
``{split}_caps.txt`` (5 captions per image) and ``{split}_meta.json`` (what each
image contains and what each caption asserts and negates); plus ``vocab.json`` in
the released ``*_precomp_vocab.json`` format. Captions contain only lower-case
words separated by single spaces, so ``nltk.word_tokenize`` splits them exactly at
the spaces and every token is in the vocabulary.

Only numpy and the standard library are imported.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from itmrt.data.precomp import CAPTIONS_PER_IMAGE, check_split_name
from itmrt.errors import DataError
from itmrt.publish import check_empty_folder, publish_folder, staged_folder, umask_mode

OBJECT_CLASSES = (
    "dog", "cat", "car", "bicycle", "horse", "bird", "boat", "bus",
    "chair", "table", "tree", "ball", "umbrella", "kite", "bench", "cup",
    "truck", "sheep", "cow", "train", "clock", "bottle", "guitar", "hat",
)
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange")
SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")

# "{objects}" is the list of present objects; "{first}"/"{rest}" split it; "{absent}" a negated noun.
POSITIVE_TEMPLATES = (
    "{objects}",
    "a photo of {objects}",
    "a picture showing {objects}",
    "there is {objects}",
    "an image with {objects}",
    "{first} next to {rest}",
    "{first} near {rest}",
)
NEGATIVE_TEMPLATES = (
    "{positive} with no {absent}",
    "{positive} but without any {absent}",
    "{positive} and there is no {absent}",
    "{positive} but no {absent}",
    "there is no {absent} only {objects}",
)
_FILLER_WORDS = (
    "a", "an", "and", "photo", "of", "picture", "showing", "there", "is", "image", "with",
    "next", "to", "near", "no", "but", "without", "any", "only",
)
DEFAULT_SPLITS = ("train", "dev", "test")
MIN_OBJECTS, MAX_OBJECTS = 2, 4


def synthetic_vocabulary_words() -> list[str]:
    """Every word a synthetic caption can contain, sorted (specials not included)."""
    return sorted(set(_FILLER_WORDS) | set(OBJECT_CLASSES) | set(COLOURS))


def vocabulary_json() -> dict[str, object]:
    """The vocabulary in the released format: ``word2idx``, ``idx2word`` (string keys), ``idx``."""
    words = list(SPECIAL_TOKENS) + synthetic_vocabulary_words()
    return {
        "idx2word": {str(index): word for index, word in enumerate(words)},
        "word2idx": {word: index for index, word in enumerate(words)},
        "idx": len(words),
    }


def make_synthetic_dataset(
    out_dir: str | Path,
    num_images: Mapping[str, int] | int,
    seed: int = 0,
    img_dim: int = 2048,
    num_regions: int = 36,
    *,
    noise_scale: float = 0.5,
    colour_scale: float = 0.5,
    negation_fraction: float = 0.4,
    pair_fraction: float = 1.0,
    negations: bool = True,
    repeat_images: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset to ``out_dir`` and return that folder.

    ``num_images``: images per split, as ``{"train": 2000, "test": 100}`` or one
    integer used for each of train, dev and test. ``pair_fraction`` is the share of
    images placed in confusable pairs; ``negation_fraction`` the chance that a
    caption not already forced to negate its pair's extra object negates some other
    absent object. ``negations=False`` writes every caption without its negation
    (only what the image holds) while drawing the same random numbers, so the
    features and every caption's positive part are byte-identical to the
    ``negations=True`` dataset of the same seed: the two differ only in the
    negations. ``repeat_images`` writes the feature file with each image
    repeated once per caption (the other released layout). The output is a pure
    function of the arguments: the same seed gives byte-identical files.
    Refuses a non-empty existing ``out_dir`` unless ``overwrite``.
    """
    splits = _check_arguments(num_images, seed, img_dim, num_regions, noise_scale, colour_scale,
                              negation_fraction, pair_fraction)
    target = Path(out_dir)
    check_empty_folder(target, overwrite, error=DataError)
    repeat = CAPTIONS_PER_IMAGE if repeat_images else 1
    _check_room(target, sum(splits.values()) * (num_regions * img_dim * 4 * repeat + TEXT_BYTES_PER_IMAGE))
    target.parent.mkdir(parents=True, exist_ok=True)

    world = _World.create(seed, img_dim)
    with staged_folder(target) as staging:
        for split, count in splits.items():
            # Seeded by the split's name only: asking for other splits does not change this one.
            rng = np.random.default_rng([seed, 1, _stable_hash(split)])
            images, captions = _plan_split(rng, count, negation_fraction, pair_fraction, negations)
            _write_features(staging / f"{split}_ims.npy", rng, world, images, num_regions,
                            noise_scale, colour_scale, repeat_images)
            caption_text = "".join(entry["text"] + "\n" for entry in captions)
            (staging / f"{split}_caps.txt").write_bytes(caption_text.encode("utf-8"))
            meta = {
                "seed": seed, "split": split, "img_dim": img_dim, "num_regions": num_regions,
                "captions_per_image": CAPTIONS_PER_IMAGE, "repeated_layout": repeat_images, "negations": negations,
                "images": images, "captions": captions,
            }
            (staging / f"{split}_meta.json").write_bytes(_json_bytes(meta))
        (staging / "vocab.json").write_bytes(_json_bytes(vocabulary_json()))
        staging.chmod(umask_mode())  # staging folders are private; the dataset folder should not be
        publish_folder(staging, target, "merge")
    return target


TEXT_BYTES_PER_IMAGE = 2048
"""Captions and metadata an image adds to a dataset (about 1.2 KB measured), with room to spare."""


def _check_room(target: Path, needed: int) -> None:
    """Refuse, before any work, a dataset the file system at ``target`` has no room for: the features are written
    through a memory map, and a page written where the disk is full kills the process (SIGBUS), mid-dataset."""
    existing = target.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:  # the folder cannot be examined: writing it says why
        return
    if needed > free:
        raise DataError(f"the dataset takes about {needed / 1e9:.2f} GB and {existing} has {free / 1e9:.2f} GB free; "
                        "ask for fewer images or write it elsewhere")


def _check_arguments(
    num_images: Mapping[str, int] | int, seed: int, img_dim: int, num_regions: int,
    noise_scale: float, colour_scale: float, negation_fraction: float, pair_fraction: float,
) -> dict[str, int]:
    if isinstance(num_images, int):
        splits = {split: num_images for split in DEFAULT_SPLITS}
    else:
        splits = dict(num_images)
    if not splits:
        raise DataError("no splits requested; pass num_images as an int or e.g. {'train': 1000, 'test': 100}")
    for split, count in splits.items():
        check_split_name(split)
        if not isinstance(count, int) or count < 1:
            raise DataError(f"split {split!r} needs at least 1 image, got {count!r}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if img_dim < 1:
        raise DataError(f"img_dim must be >= 1, got {img_dim}")
    if num_regions < MAX_OBJECTS:
        raise DataError(f"num_regions must be >= {MAX_OBJECTS} (one region per object at least), got {num_regions}")
    if noise_scale < 0 or colour_scale < 0:
        raise DataError("noise_scale and colour_scale must be >= 0")
    for name, value in (("negation_fraction", negation_fraction), ("pair_fraction", pair_fraction)):
        if not 0.0 <= value <= 1.0:
            raise DataError(f"{name} must be within [0, 1], got {value}")
    return splits


def _stable_hash(text: str) -> int:
    """A process-independent hash of a split name (Python's hash() is salted per process)."""
    value = 0
    for byte in text.encode("utf-8"):
        value = (value * 131 + byte) % (1 << 31)
    return value


class _World:
    """Class prototypes and colour directions: fixed per seed, shared by every split."""

    def __init__(self, prototypes: np.ndarray, colours: np.ndarray) -> None:
        self.prototypes = prototypes
        self.colours = colours

    @classmethod
    def create(cls, seed: int, img_dim: int) -> _World:
        rng = np.random.default_rng([seed, 0])
        prototypes = rng.standard_normal((len(OBJECT_CLASSES), img_dim), dtype=np.float32)
        colours = rng.standard_normal((len(COLOURS), img_dim), dtype=np.float32)
        return cls(prototypes, colours)


def _random_objects(rng: np.random.Generator, count: int, exclude: Collection[int] = ()) -> list[list[int]]:
    """``count`` distinct classes (not in ``exclude``), each with a random colour: [[class, colour], ...]."""
    candidates = np.array([c for c in range(len(OBJECT_CLASSES)) if c not in exclude])
    chosen = rng.choice(candidates, size=count, replace=False)
    return [[int(c), int(rng.integers(len(COLOURS)))] for c in chosen]


def _plan_split(
    rng: np.random.Generator, count: int, negation_fraction: float, pair_fraction: float, negations: bool
) -> tuple[list[dict], list[dict]]:
    """Decide each image's objects and each caption's content (no features yet)."""
    images: list[dict] = []
    while len(images) < count:
        if count - len(images) >= 2 and rng.random() < pair_fraction:
            base = _random_objects(rng, int(rng.integers(MIN_OBJECTS, MAX_OBJECTS)))
            extra = _random_objects(rng, 1, {c for c, _ in base})
            first, second = len(images), len(images) + 1
            images.append({"objects": base, "partner": second, "extra": extra[0][0]})
            images.append({"objects": base + extra, "partner": first, "extra": None})
        else:
            objects = _random_objects(rng, int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)))
            images.append({"objects": objects, "partner": None, "extra": None})

    captions: list[dict] = []
    for index, image in enumerate(images):
        present = {c for c, _ in image["objects"]}
        forced = int(rng.integers(2, 4)) if image["extra"] is not None else 0
        for caption_number in range(CAPTIONS_PER_IMAGE):
            absent: int | None = None
            confuser: int | None = None
            if caption_number < forced:
                absent, confuser = image["extra"], image["partner"]
            elif rng.random() < negation_fraction:
                absent = int(rng.choice([c for c in range(len(OBJECT_CLASSES)) if c not in present]))
            captions.append(_compose_caption(rng, index, image["objects"], absent, confuser, negations))
        # The forced negations should not always sit at caption slots 0..k-1.
        group = captions[-CAPTIONS_PER_IMAGE:]
        order = rng.permutation(CAPTIONS_PER_IMAGE)
        captions[-CAPTIONS_PER_IMAGE:] = [group[i] for i in order]

    for image in images:
        image["objects"] = [{"noun": OBJECT_CLASSES[c], "colour": COLOURS[k]} for c, k in image["objects"]]
        image["extra"] = OBJECT_CLASSES[image["extra"]] if image["extra"] is not None else None
    return images, captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _compose_caption(
    rng: np.random.Generator, image_index: int, objects: list[list[int]], absent: int | None, confuser: int | None,
    negations: bool,
) -> dict:
    order = rng.permutation(len(objects))
    phrases = []
    for position in order:
        noun = OBJECT_CLASSES[objects[position][0]]
        if rng.random() < 0.75:
            colour = COLOURS[objects[position][1]]
            phrases.append(f"{_article(colour)} {colour} {noun}")
        else:
            phrases.append(f"{_article(noun)} {noun}")
    listing = " and ".join(phrases)
    template = POSITIVE_TEMPLATES[int(rng.integers(len(POSITIVE_TEMPLATES)))]
    positive = template.format(objects=listing, first=phrases[0], rest=" and ".join(phrases[1:]))
    text = positive
    if absent is not None:
        negative = NEGATIVE_TEMPLATES[int(rng.integers(len(NEGATIVE_TEMPLATES)))]  # drawn either way: same stream
        if negations:
            text = negative.format(positive=positive, objects=listing, absent=OBJECT_CLASSES[absent])
        else:
            absent = confuser = None
    return {
        "image": image_index,
        "text": text,
        "mentions": [OBJECT_CLASSES[objects[p][0]] for p in order],
        "negated": [OBJECT_CLASSES[absent]] if absent is not None else [],
        "confuser": confuser,
    }


def _write_features(
    path: Path, rng: np.random.Generator, world: _World, images: list[dict], num_regions: int,
    noise_scale: float, colour_scale: float, repeat_images: bool,
) -> None:
    """Fill the .npy through a memory map, a chunk of images at a time (bounded memory)."""
    img_dim = world.prototypes.shape[1]
    repeat = CAPTIONS_PER_IMAGE if repeat_images else 1
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(len(images) * repeat, num_regions, img_dim))
    class_index = {name: i for i, name in enumerate(OBJECT_CLASSES)}
    colour_index = {name: i for i, name in enumerate(COLOURS)}
    max_per_object = max(1, min(3, num_regions // MAX_OBJECTS))
    chunk = max(1, (1 << 24) // (num_regions * img_dim * repeat))
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        block = rng.standard_normal((stop - start, num_regions, img_dim), dtype=np.float32)
        for offset, image in enumerate(images[start:stop]):
            slots = rng.permutation(num_regions)
            used = 0
            for obj in image["objects"]:
                regions = int(rng.integers(1, max_per_object + 1))
                rows = slots[used:used + regions]
                used += regions
                signal = (world.prototypes[class_index[obj["noun"]]]
                          + colour_scale * world.colours[colour_index[obj["colour"]]])
                block[offset, rows] = signal + noise_scale * block[offset, rows]
        if repeat == 1:
            out[start:stop] = block
        else:
            out[start * repeat:stop * repeat] = np.repeat(block, repeat, axis=0)
    out.flush()
    del out


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
