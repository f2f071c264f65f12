"""Tiled scoring and streaming top-k: equal to the full matrix and to a stable sort of it."""

from __future__ import annotations

import numpy as np
import pytest

from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.runtime.tiled import StreamingTopK, score_tiled, tile_shape, top_k_of_matrix

from runtime_helpers import make_bundle, random_captions, region_features


def stable_top(matrix: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-matrix, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("block", [1, 3, 7, 50])
def test_streaming_top_k_matches_stable_sort_with_ties(block: int) -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(9, 40)).astype(np.float32)  # many ties: order must be by lower index
    top = StreamingTopK(9, 5)
    for start in range(0, 40, block):
        top.update(slice(0, 9), scores[:, start : start + block], np.arange(start, min(start + block, 40)))
    np.testing.assert_array_equal(top.indices, stable_top(scores, 5))
    np.testing.assert_array_equal(top.scores, np.take_along_axis(scores, stable_top(scores, 5), axis=1))


def test_streaming_top_k_fewer_candidates_than_k_and_row_subsets() -> None:
    top = StreamingTopK(3, 4)
    top.update(np.array([2, 0]), np.array([[1.0, 2.0], [0.5, 0.25]], np.float32), np.array([7, 3]))
    assert top.indices[0].tolist() == [7, 3, -1, -1]
    assert top.indices[2].tolist() == [3, 7, -1, -1]
    assert top.indices[1].tolist() == [-1] * 4 and np.isneginf(top.scores[1]).all()
    with pytest.raises(ItmrtError):
        StreamingTopK(3, 0)


def test_tile_shape_respects_budget_and_limits() -> None:
    bi, bc = tile_shape(1000, 5000, bytes_per_pair=20 * 36 * 4 * 8, budget_bytes=64 << 20)
    assert bi * bc * 20 * 36 * 4 * 8 <= 64 << 20 and bi * bc > 1000
    assert tile_shape(1000, 5000, 10**12, budget_bytes=1) == (1, 1)  # never below one pair
    assert tile_shape(1000, 5000, 4, 1 << 30, max_images=16, max_captions=32) == (16, 32)
    assert tile_shape(3, 4, 4, 1 << 30) == (3, 4)
    with pytest.raises(ItmrtError):
        tile_shape(3, 4, 4, 0)


@pytest.fixture(scope="module")
def runtime_and_data(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    bundle, _, _ = make_bundle(tmp_path_factory.mktemp("tiled"))
    runtime = load(bundle, threads=1)
    images = runtime.encode_images(region_features(19, seed=1))
    captions = runtime.encode_captions(random_captions(31, seed=2))
    return runtime, images, captions


def test_tiles_equal_one_full_call(runtime_and_data) -> None:  # type: ignore[no-untyped-def]
    runtime, images, captions = runtime_and_data
    embeddings, lengths = captions.padded(np.arange(len(captions)))
    full = runtime.backends["scorer"].run(
        {"image_embeddings": images, "caption_embeddings": embeddings, "lengths": lengths.astype(np.int32)}
    )[0]
    t2i_ref, i2t_ref = top_k_of_matrix(full, 10)
    for tile in [(1, 1), (4, 7), (19, 31), (5, 31)]:
        result = score_tiled(runtime.backends["scorer"], images, captions, top_k=10, keep_scores=True, tile=tile)
        np.testing.assert_allclose(result.scores, full, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(result.t2i.indices, t2i_ref.indices)
        np.testing.assert_array_equal(result.i2t.indices, i2t_ref.indices)
        np.testing.assert_allclose(result.i2t.scores, i2t_ref.scores, atol=1e-6)
    # A tiny budget gives many tiles, same answer; without keep_scores no matrix is held.
    small = score_tiled(runtime.backends["scorer"], images, captions, top_k=3, budget_bytes=40_000)
    assert small.scores is None and small.tiles > 4
    np.testing.assert_array_equal(small.t2i.indices, t2i_ref.indices[:, :3])


def test_top_k_larger_than_gallery_is_clipped(runtime_and_data) -> None:  # type: ignore[no-untyped-def]
    runtime, images, captions = runtime_and_data
    result = runtime.rank(images[:4], captions, top_k=10)
    assert result.t2i.indices.shape == (len(captions), 4)
    assert sorted(result.t2i.indices[0].tolist()) == [0, 1, 2, 3]
