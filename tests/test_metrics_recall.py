"""Recall@K metrics: a hand-checked case with ties, an independent loop reference, and the 5-fold protocol."""

from __future__ import annotations

import numpy as np
import pytest

from itmrt.errors import DataError
from itmrt.metrics.recall import (
    RECALL_KEYS,
    coco_5fold_1k,
    fold_tables,
    format_recall_table,
    i2t_ranks,
    recall_table,
    t2i_ranks,
)

# 3 images x 15 captions, written out by hand (caption c describes image c // 5).
#            own captions of image 0   | image 1                   | image 2
HAND = np.array([
    [0.9, 0.1, 0.1, 0.1, 0.1,   0.0, 0.0, 0.95, 0.0, 0.0,   0.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.0, 0.0, 0.0, 0.0,   0.5, 0.5, 0.2, 0.2, 0.2,    0.0, 0.0, 0.0, 0.0, 0.6],
    [0.1, 0.1, 0.1, 0.1, 0.1,   0.1, 0.1, 0.1, 0.1, 0.1,    0.3, 0.8, 0.3, 0.3, 0.3],
])
# i2t: image 0's best own caption (0.9) is beaten by caption 7 (0.95) -> 1.
#      image 1's best own (0.5) is beaten by caption 14 (0.6) and tied by caption 0 -> 2 (pess.), 1 (opt.).
#      image 2's best own (0.8) is the row maximum -> 0.
HAND_I2T = {"pessimistic": [1, 2, 0], "optimistic": [1, 1, 0]}
# t2i: captions 1-4 score 0.1 with image 0 and tie with image 2 -> 1 (pess.), 0 (opt.);
#      caption 7 (0.2 with image 1) is beaten by image 0 (0.95) -> 1; caption 14 (0.3) by image 1 (0.6) -> 1.
HAND_T2I = {
    "pessimistic": [0, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1],
    "optimistic": [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1],
}


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_hand_checked_ranks(ties: str, dtype: type) -> None:
    scores = HAND.astype(dtype)
    assert i2t_ranks(scores, ties=ties).tolist() == HAND_I2T[ties]
    assert t2i_ranks(scores, ties=ties).tolist() == HAND_T2I[ties]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_hand_checked_table_pessimistic(dtype: type) -> None:
    table = recall_table(HAND.astype(dtype))
    assert list(table) == list(RECALL_KEYS)
    expected = {
        "i2t_r1": 100 / 3, "i2t_r5": 100.0, "i2t_r10": 100.0,
        "i2t_medr": 2.0,          # median of [1, 2, 0] is 1 -> floor(1) + 1
        "i2t_meanr": 2.0,         # mean 1 -> + 1
        "t2i_r1": 60.0,           # 9 of 15 captions at rank 0
        "t2i_r5": 100.0, "t2i_r10": 100.0,
        "t2i_medr": 1.0,          # median of nine 0s and six 1s is 0
        "t2i_meanr": 1.4,         # 6/15 + 1
    }
    expected["rsum"] = 100 / 3 + 200 + 60 + 200
    assert table == pytest.approx(expected)
    assert all(isinstance(value, float) for value in table.values())


def test_hand_checked_table_optimistic() -> None:
    table = recall_table(HAND, ties="optimistic")
    assert table["i2t_meanr"] == pytest.approx(2 / 3 + 1)
    assert table["t2i_r1"] == pytest.approx(100 * 13 / 15)
    assert table["t2i_meanr"] == pytest.approx(2 / 15 + 1)


def test_medr_floors_an_even_median_and_recall_at_5() -> None:
    scores = np.zeros((2, 10))
    scores[0, :5] = 0.1
    scores[0, 5:8] = 0.2        # three other captions beat image 0's best -> rank 3
    scores[1, 5:] = 1.0         # image 1 ranks its own captions first -> rank 0
    assert i2t_ranks(scores).tolist() == [3, 0]
    table = recall_table(scores)
    assert table["i2t_medr"] == 2.0     # median 1.5 -> floor 1 -> + 1
    assert table["i2t_meanr"] == 2.5
    assert (table["i2t_r1"], table["i2t_r5"]) == (50.0, 100.0)


def _reference_ranks(scores: np.ndarray, pessimistic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Loop reference: sort each query's items, ground truth placed after (pess.) or before (opt.) ties."""
    num_images, num_captions = scores.shape
    last = 1 if pessimistic else 0

    def first_truth_position(row: np.ndarray, truth: set[int]) -> int:
        order = sorted(range(len(row)), key=lambda j: (-row[j], (j in truth) == bool(last)))
        return min(position for position, j in enumerate(order) if j in truth)

    i2t = np.array([first_truth_position(scores[i], set(range(5 * i, 5 * i + 5))) for i in range(num_images)])
    t2i = np.array([first_truth_position(scores[:, c], {c // 5}) for c in range(num_captions)])
    return i2t, t2i


def _released_style_ranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank the way the released evaluation does: descending argsort, position of the ground truth."""
    num_images = scores.shape[0]
    i2t = np.array([
        min(int(np.where(np.argsort(scores[i])[::-1] == c)[0][0]) for c in range(5 * i, 5 * i + 5))
        for i in range(num_images)
    ])
    t2i = np.array([int(np.where(np.argsort(scores[:, c])[::-1] == c // 5)[0][0]) for c in range(5 * num_images)])
    return i2t, t2i


def test_matches_loop_reference_with_many_ties() -> None:
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 4, size=(14, 70)).astype(np.float32)  # small integers: ties everywhere
    for pessimistic, ties in ((True, "pessimistic"), (False, "optimistic")):
        i2t, t2i = _reference_ranks(scores, pessimistic)
        np.testing.assert_array_equal(i2t_ranks(scores, ties=ties), i2t)
        np.testing.assert_array_equal(t2i_ranks(scores, ties=ties), t2i)
    # The released argsort ranking lies between the two rules.
    released_i2t, released_t2i = _released_style_ranks(scores)
    assert np.all(i2t_ranks(scores, ties="optimistic") <= released_i2t)
    assert np.all(released_i2t <= i2t_ranks(scores))
    assert np.all(t2i_ranks(scores, ties="optimistic") <= released_t2i)
    assert np.all(released_t2i <= t2i_ranks(scores))


def test_equals_released_ranking_without_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((30, 150))
    scores[np.arange(30), np.arange(0, 150, 5)] += 1.5  # a weakly informative model: ranks spread over 0..29
    released_i2t, released_t2i = _released_style_ranks(scores)
    np.testing.assert_array_equal(i2t_ranks(scores), released_i2t)
    np.testing.assert_array_equal(t2i_ranks(scores), released_t2i)
    assert released_t2i.max() >= 10  # R@10 is exercised, not trivially 100
    table = recall_table(scores)
    assert table["t2i_r10"] == pytest.approx(100 * np.mean(released_t2i < 10))
    assert table["t2i_medr"] == np.floor(np.median(released_t2i)) + 1
    assert table["i2t_r5"] == pytest.approx(100 * np.mean(released_i2t < 5))


def test_rank_order_invariance_under_image_permutation() -> None:
    scores = np.random.default_rng(11).integers(0, 3, size=(8, 40)).astype(np.float64)
    permutation = np.random.default_rng(12).permutation(8)
    caption_permutation = (permutation[:, None] * 5 + np.arange(5)).ravel()
    shuffled = scores[permutation][:, caption_permutation]
    assert recall_table(shuffled) == pytest.approx(recall_table(scores))


def test_five_fold_equals_manual_average() -> None:
    fold_size = 4
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((5 * fold_size, 25 * fold_size)).astype(np.float32)
    manual = []
    for fold in range(5):
        block = scores[fold * fold_size:(fold + 1) * fold_size, fold * 5 * fold_size:(fold + 1) * 5 * fold_size]
        manual.append(recall_table(block))
    averaged = coco_5fold_1k(scores, fold_size=fold_size)
    assert list(averaged) == list(RECALL_KEYS)
    for key in RECALL_KEYS:
        assert averaged[key] == pytest.approx(sum(table[key] for table in manual) / 5)
    assert fold_tables(scores, fold_size) == manual
    # Scores outside the diagonal blocks take no part in the 5-fold protocol but do in 5K.
    perturbed = scores.copy()
    for fold in range(5):
        perturbed[fold * fold_size:(fold + 1) * fold_size, :fold * 5 * fold_size] = 100.0
    assert coco_5fold_1k(perturbed, fold_size=fold_size) == pytest.approx(averaged)
    assert recall_table(perturbed)["rsum"] != pytest.approx(recall_table(scores)["rsum"])


def test_five_fold_needs_five_folds_of_images() -> None:
    with pytest.raises(DataError, match="5 x 4 = 20"):
        coco_5fold_1k(np.zeros((21, 105)), fold_size=4)


@pytest.mark.parametrize(
    "scores, fragment",
    [
        (np.zeros((3, 14)), "expected images x captions"),
        (np.zeros((0, 0)), "expected images x captions"),
        (np.zeros(15), "2 dimensions"),
        (np.zeros((3, 15), dtype=complex), "dtype"),
    ],
)
def test_bad_score_matrices(scores: np.ndarray, fragment: str) -> None:
    with pytest.raises(DataError, match=fragment):
        recall_table(scores)


def test_nan_scores_are_refused() -> None:
    scores = HAND.copy()
    scores[1, 3] = np.nan
    with pytest.raises(DataError, match="1 NaN"):
        recall_table(scores)


def test_unknown_tie_rule() -> None:
    with pytest.raises(ValueError):
        i2t_ranks(HAND, ties="random")


def test_format_recall_table() -> None:
    text = format_recall_table(recall_table(HAND))
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["R@1", "R@5", "R@10", "medr", "meanr"]
    assert lines[1].split() == ["image->text", "33.3", "100.0", "100.0", "2.0", "2.00"]
    assert lines[2].split() == ["text->image", "60.0", "100.0", "100.0", "1.0", "1.40"]
    assert lines[3].split() == ["rsum", "493.3"]
    assert len({len(line) for line in lines[:3]}) == 1  # columns line up
    with pytest.raises(ValueError):
        format_recall_table({"rsum": 1.0})
