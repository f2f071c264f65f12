"""Synthetic galleries at the released sizes (36 regions x d 1024) with known-item queries, for the scale benchmarks.

No released image features exist here, and encoding 100K images' features
would only measure the image encoder, so the region *embeddings* are made
directly, with structure a retrieval model's space has: a vocabulary of
concept vectors grouped into topics; an image is mostly one topic's concepts
(28 of its 36 regions) plus a few from anywhere, each region a concept plus
noise, l2-normalised as the image encoder's output is. A query ("caption") is
made from one image: 8 to 20 token embeddings, three in ten a copy of one of
its regions (words the image shows), the rest other concepts (words it does
not show), each with heavy noise, l2-normalised as the text encoder's output
is. The query's own image is its known item: on 1000 images exact full
scoring of a released-size NAAF (random weights) ranks it first for 87% of
queries, and images of the same topic compete with it, so a shortlist can miss.

Every image is a function of its number alone (its own random generator), so
a gallery can be written in any chunks and a query made for any image later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from itmrt.runtime.encoders import CaptionEmbeddings

REGIONS, DEPTH = 36, 1024
TOPIC_REGIONS = 28  # regions an image draws from its topic; the rest from any concept
SHOWN = 0.3  # share of a query's tokens that copy one of its image's regions
TOKEN_NOISE = 2.0  # norm of the noise added to every token (regions: ``noise`` in image_regions)


@dataclass(frozen=True)
class Space:
    """The concept vectors, topics and a pool of noise vectors every image and query is made from."""

    concepts: np.ndarray  # [C, d] unit vectors
    topics: np.ndarray  # [T, per_topic] concept ids
    noise: np.ndarray  # [P, d] unit vectors
    seed: int


def make_space(depth: int = DEPTH, concepts: int = 4096, topics: int = 512, per_topic: int = 48,
               pool: int = 8192, seed: int = 0) -> Space:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((concepts, depth), dtype=np.float32)
    noise = rng.standard_normal((pool, depth), dtype=np.float32)
    groups = np.stack([rng.choice(concepts, size=per_topic, replace=False) for _ in range(topics)])
    return Space(_unit(vectors), groups, _unit(noise), seed)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _image_plan(space: Space, image: int, regions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``image``'s region concepts, noise rows and noise signs (from its own generator)."""
    rng = np.random.default_rng((space.seed, 1, image))
    topic = space.topics[rng.integers(len(space.topics))]
    own = min(TOPIC_REGIONS, regions)
    ids = np.concatenate([rng.choice(topic, size=own), rng.integers(len(space.concepts), size=regions - own)])
    return ids, rng.integers(len(space.noise), size=regions), rng.choice([-1.0, 1.0], size=regions)


def image_regions(space: Space, images: np.ndarray, regions: int = REGIONS, noise: float = 1.5) -> np.ndarray:
    """``[len(images), regions, d]`` float32 region embeddings of images number ``images``."""
    plans = [_image_plan(space, int(i), regions) for i in images]
    ids = np.stack([p[0] for p in plans])
    rows = np.stack([p[1] for p in plans])
    signs = np.stack([p[2] for p in plans]).astype(np.float32)
    out = space.concepts[ids]
    out += (noise * signs)[..., None] * space.noise[rows]
    return _unit(out)


def known_item_queries(space: Space, images: np.ndarray, per_image: int = 1, seed: int = 1,
                       regions: int = REGIONS) -> CaptionEmbeddings:
    """``per_image`` queries for each image of ``images``, in that order (image ``images[q // per_image]``)."""
    rng = np.random.default_rng((space.seed, 2, seed))
    parts, lengths = [], []
    for _image, own in zip(images, image_regions(space, np.asarray(images), regions)):
        for _ in range(per_image):
            length = int(rng.integers(8, 21))
            shown = max(1, round(SHOWN * length))
            tokens = np.concatenate([own[rng.integers(regions, size=shown)],
                                     space.concepts[rng.integers(len(space.concepts), size=length - shown)]])
            tokens += TOKEN_NOISE * space.noise[rng.integers(len(space.noise), size=length)]
            parts.append(_unit(tokens))
            lengths.append(length)
    vectors = np.concatenate(parts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return CaptionEmbeddings(vectors, np.array(lengths, dtype=np.int32), offsets)


def fill_regions(space: Space, first: int, array: np.ndarray, chunk: int = 512) -> None:
    """Fill ``array`` ([n, regions, d], e.g. a float16 memmap) with images ``first .. first + n - 1``."""
    regions = int(array.shape[1])
    for start in range(0, len(array), chunk):
        stop = min(start + chunk, len(array))
        array[start:stop] = image_regions(space, np.arange(first + start, first + stop), regions)
