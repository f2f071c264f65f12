"""Padding up to a static engine profile (a DLA engine's) and cutting back changes no real output.

TensorRT cannot run here; the padding is the runtime's own code, so it is checked on the bundle's real graphs
with ONNX Runtime: every graph run on inputs padded to its largest shapes, cut back, equals the unpadded run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from itmrt.bundle.folder import read_bundle
from itmrt.bundle.manifest import GraphEntry
from itmrt.bundle.names import LENGTHS, MAX_LENGTH, TOKEN_IDS, Component
from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.runtime.sessions import create_session
from itmrt.runtime.static_shapes import StaticPadding

from runtime_helpers import IMG_DIM, VOCAB, make_bundle, make_cmpm_bundle, random_captions, region_features


def static_profile(graph: GraphEntry) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every named axis fixed at its largest size (min = opt = max), as a DLA build makes it."""
    profile = {}
    for spec in graph.inputs:
        shape = tuple(graph.shape_ranges[a].max if isinstance(a, str) else int(a) for a in spec.shape)
        profile[spec.name] = (shape, shape, shape)
    return profile


def graph_feeds(bundle: Path) -> dict[str, dict[str, np.ndarray]]:
    """Real inputs of each graph: 3 images, 5 captions shorter than the longest the bundle takes."""
    with load(bundle, threads=1) as runtime:
        info = runtime.bundle
        captions = random_captions(5, seed=4, min_words=1, max_words=4)
        tokens, lengths = runtime.vocab.encode_batch(captions)
        if info.manifest.graph(Component.IMAGE_ENCODER).inputs[0].name == "images":
            images = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
        else:
            images = region_features(3, seed=1)
        image_input = info.manifest.graph(Component.IMAGE_ENCODER).inputs[0].name
        as_int = {spec.name: np.dtype(spec.dtype) for spec in info.manifest.graph(Component.TEXT_ENCODER).inputs}
        tokens, lengths = tokens.astype(as_int[TOKEN_IDS]), lengths.astype(as_int[LENGTHS])
        text = {TOKEN_IDS: tokens, LENGTHS: lengths}
        feeds = {Component.IMAGE_ENCODER.value: {image_input: images}, Component.TEXT_ENCODER.value: text}
        encoded_images = run(info.path / info.manifest.graph(Component.IMAGE_ENCODER).file,
                             feeds[Component.IMAGE_ENCODER.value])[0]
        encoded_text = run(info.path / info.manifest.graph(Component.TEXT_ENCODER).file, text)[0]
        scorer = info.manifest.graph(Component.SCORER)
        names = [spec.name for spec in scorer.inputs]
        values = {"image_embeddings": encoded_images, "caption_embeddings": encoded_text, LENGTHS: lengths}
        dtypes = {spec.name: np.dtype(spec.dtype) for spec in scorer.inputs}
        feeds[Component.SCORER.value] = {name: values[name].astype(dtypes[name]) for name in names}
    return feeds


def run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = create_session(path, threads=1)
    return [np.asarray(x) for x in session.run(None, feeds)]


@pytest.mark.parametrize("kind", ["naaf", "scan", "cmpm", "cmpm-max-over-padding"])
def test_padded_to_a_static_profile_and_cut_back_every_graph_gives_the_unpadded_outputs(kind: str,
                                                                                      tmp_path: Path) -> None:
    if kind.startswith("cmpm"):
        bundle = make_cmpm_bundle(tmp_path, max_over_padding=kind.endswith("padding"))
    elif kind == "scan":
        bundle = make_bundle(tmp_path, family="scan",
                             opt={"vocab_size": VOCAB, "img_dim": IMG_DIM, "embed_size": 32, "word_dim": 16})[0]
    else:
        bundle = make_bundle(tmp_path)[0]
    info = read_bundle(bundle)
    caption_buckets = not kind.endswith("padding")
    for component, feeds in graph_feeds(bundle).items():
        graph = info.manifest.graph(component)
        padding = StaticPadding.for_engine(graph, static_profile(graph),
                                           frozenset() if caption_buckets else frozenset({MAX_LENGTH}))
        assert padding is not None
        padded, real = padding.pad(feeds)
        for name, value in feeds.items():
            grown = padded[name]
            assert grown.shape[0] > value.shape[0]  # the batch axis was padded...
            np.testing.assert_array_equal(grown[tuple(slice(0, s) for s in value.shape)], value)  # ...around it
        if TOKEN_IDS in feeds:
            width = padded[TOKEN_IDS].shape[1]
            assert (width > feeds[TOKEN_IDS].shape[1]) == caption_buckets  # never where padding changes a caption
            assert (padded[LENGTHS][len(feeds[LENGTHS]):] == 1).all()
        expected = run(info.path / graph.file, feeds)
        got = padding.cut([spec.name for spec in graph.outputs], run(info.path / graph.file, padded), real)
        for want, have in zip(expected, got):
            assert have.shape == want.shape
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-6)


def test_what_cannot_be_padded_is_left_for_the_profile_check(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)[0]
    graph = read_bundle(bundle).manifest.graph(Component.TEXT_ENCODER)
    profile = static_profile(graph)
    padding = StaticPadding.for_engine(graph, profile)
    assert padding is not None
    batch, length = profile[TOKEN_IDS][2]
    too_many = {TOKEN_IDS: np.ones((batch + 1, 2), np.int32), LENGTHS: np.full(batch + 1, 2, np.int32)}
    padded, _ = padding.pad(too_many)
    assert padded[TOKEN_IDS].shape == (batch + 1, 2)  # longer than the engine's shape: the engine refuses it
    with pytest.raises(ItmrtError, match="inputs disagree on axis 'batch_captions'"):
        padding.pad({TOKEN_IDS: np.ones((2, 2), np.int32), LENGTHS: np.full(3, 2, np.int32)})
    dynamic = {name: ((1,) * len(shapes[0]), shapes[1], shapes[2]) for name, shapes in profile.items()}
    assert StaticPadding.for_engine(graph, dynamic) is None  # a dynamic profile needs no padding
