"""Structured synthetic region and caption embeddings for the region index benchmark: objects seen in many images.

A world of ``objects`` prototype vectors (unit, d 1024) grouped into topics. An
image is one topic: 28 of its 36 regions show objects of that topic, 8 show
objects from anywhere; each region is its object's prototype plus instance
noise (``REGION_NOISE``: a region's cosine to its prototype is about 0.8, two
regions of one object about 0.64), l2-normalised as the image encoder's output
is. So every object appears in thousands of images at 100K, each time a little
different.

A caption (8 to 20 tokens) describes one image as words do: about 45% of its
tokens name objects the image shows (the object's prototype plus word noise,
not a copy of the region: a word names a kind of thing), 30% name objects the
image does not hold (from anywhere), and 25% are function words (a few shared
directions that match no region). The exhaustive top 10 is then decided by
which images hold the most of the caption's objects - and, among the many
images of one topic that hold the same ones, by their regions' instance noise,
which only the exact score sees.

Every image and caption is a function of its number alone (its own generator),
so a gallery can be written in chunks and a query made for any image later.
Noise comes from a pool of vectors (rows with random signs) to keep 100K
images fast to make.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from itmrt.runtime.encoders import CaptionEmbeddings

REGIONS = 36
TOPIC_REGIONS = 28
REGION_NOISE = 0.75  # |noise| added to a unit prototype: cosine to it ~ 1 / sqrt(1 + 0.75^2) = 0.8
WORD_NOISE = 1.0
SHOWN, LACKING = 0.45, 0.30  # shares of a caption's tokens; the rest are function words


@dataclass(frozen=True)
class World:
    prototypes: np.ndarray  # [objects, d]
    topics: np.ndarray  # [topics, per_topic] object ids
    function_words: np.ndarray  # [F, d]
    noise: np.ndarray  # [pool, d] unit
    seed: int


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_world(depth: int = 1024, objects: int = 8192, topics: int = 1024, per_topic: int = 48, pool: int = 32768,
               function_words: int = 24, seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    prototypes = _unit(rng.standard_normal((objects, depth), dtype=np.float32))
    groups = np.stack([rng.choice(objects, size=per_topic, replace=False) for _ in range(topics)])
    return World(prototypes, groups, _unit(rng.standard_normal((function_words, depth), dtype=np.float32)),
                 _unit(rng.standard_normal((pool, depth), dtype=np.float32)), seed)


def image_objects(world: World, image: int) -> np.ndarray:
    rng = np.random.default_rng((world.seed, 1, image))
    topic = world.topics[rng.integers(len(world.topics))]
    return np.concatenate([rng.choice(topic, size=TOPIC_REGIONS),
                           rng.integers(len(world.prototypes), size=REGIONS - TOPIC_REGIONS)])


def image_regions(world: World, images: np.ndarray) -> np.ndarray:
    """``[len(images), 36, d]`` float32 region embeddings (each image's draws from its own generator; the
    arithmetic on whole blocks, the same per element as one image at a time)."""
    objects = np.empty((len(images), REGIONS), dtype=np.int64)
    noise = np.empty((len(images), REGIONS), dtype=np.int64)
    signs = np.empty((len(images), REGIONS, 1), dtype=np.float32)
    for row, image in enumerate(images):
        rng = np.random.default_rng((world.seed, 3, int(image)))
        noise[row] = rng.integers(len(world.noise), size=REGIONS)
        signs[row] = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=REGIONS)[:, None]
        objects[row] = image_objects(world, int(image))
    return _unit(world.prototypes[objects] + REGION_NOISE * signs * world.noise[noise])


def fill_regions(world: World, first: int, array: np.ndarray, chunk: int = 128, workers: int = 2) -> None:
    """``array[i]`` = image ``first + i``'s regions, in chunks on ``workers`` threads (numpy's gathers and
    arithmetic release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(start: int) -> None:
        stop = min(start + chunk, len(array))
        array[start:stop] = image_regions(world, np.arange(first + start, first + stop))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(0, len(array), chunk)))


def captions_for(world: World, images: np.ndarray, seed: int = 1) -> CaptionEmbeddings:
    """One caption per image of ``images``, in order."""
    rng = np.random.default_rng((world.seed, 2, seed))
    parts, lengths = [], []
    for image in images:
        held = image_objects(world, int(image))
        length = int(rng.integers(8, 21))
        shown = max(1, round(SHOWN * length))
        lacking = round(LACKING * length)
        others = rng.integers(len(world.prototypes), size=lacking)
        others = others[~np.isin(others, held)]
        tokens = np.concatenate([world.prototypes[rng.choice(held, size=shown)], world.prototypes[others],
                                 world.function_words[rng.integers(len(world.function_words),
                                                                   size=length - shown - len(others))]])
        tokens = tokens[rng.permutation(len(tokens))]
        tokens = tokens + WORD_NOISE * world.noise[rng.integers(len(world.noise), size=len(tokens))]
        parts.append(_unit(tokens))
        lengths.append(len(tokens))
    vectors = np.concatenate(parts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return CaptionEmbeddings(vectors, np.array(lengths, dtype=np.int32), offsets)
