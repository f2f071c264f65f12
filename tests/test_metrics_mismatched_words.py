"""Mismatched-word comparisons on the synthetic data's confusable pairs, judged on score matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from itmrt.errors import DataError
from itmrt.metrics.mismatched_words import accuracy, comparisons, flips, format_accuracy, read_meta
from itmrt.synthetic.region_features import make_synthetic_dataset

SMALL = {"img_dim": 16, "num_regions": 8}


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = make_synthetic_dataset(tmp_path_factory.mktemp("mismatch") / "d", {"test": 20}, seed=4, **SMALL)
    return read_meta(folder, "test")


def _object_count_scores(meta: dict, negation_aware: bool) -> np.ndarray:
    """A stand-in scorer: +1 per named object the image holds, -1 per named object it lacks (if aware)."""
    held = [{o["noun"] for o in image["objects"]} for image in meta["images"]]
    scores = np.zeros((len(held), len(meta["captions"])))
    for c, caption in enumerate(meta["captions"]):
        for i, objects in enumerate(held):
            named = set(caption["mentions"])
            lacking = len(named - objects) if negation_aware else 0
            scores[i, c] = len(named & objects) - lacking - 0.1 * len(objects - named)
    return scores


def test_comparisons_pair_the_right_images_and_captions(meta: dict) -> None:
    found = comparisons(meta)
    for (b, caption), (a, same) in zip(zip(*found["own_image"].right), zip(*found["own_image"].wrong)):
        assert caption == same and meta["captions"][caption]["image"] == b and not meta["captions"][caption]["negated"]
        assert meta["images"][a]["partner"] == b and meta["images"][a]["extra"] in meta["captions"][caption]["mentions"]
    for (a, own), (same, other) in zip(zip(*found["own_caption"].right), zip(*found["own_caption"].wrong)):
        assert a == same and meta["captions"][own]["image"] == a
        assert meta["captions"][other]["image"] == meta["images"][a]["partner"]
    for (a, caption), (b, _) in zip(zip(*found["negated"].right), zip(*found["negated"].wrong)):
        assert meta["captions"][caption]["negated"] == [meta["images"][a]["extra"]]
        assert meta["images"][b]["partner"] == a
    assert all(len(found[name]) > 0 for name in found)


def test_a_scorer_that_penalises_absent_objects_gets_every_mismatched_comparison_right(meta: dict) -> None:
    found = comparisons(meta)
    aware, blind = _object_count_scores(meta, True), _object_count_scores(meta, False)
    right = accuracy(aware, found)
    assert right["own_caption"]["accuracy"] == 100.0 and right["own_image"]["accuracy"] == 100.0
    # B holds the k + 1 named objects; A holds k and lacks X: 2 apart.
    assert right["own_image"]["median_margin"] == pytest.approx(2.0)
    wrong = accuracy(blind, found)
    assert wrong["own_caption"]["accuracy"] == 0.0  # blind: B's caption names one more held object
    assert flips(aware, blind, found)["own_caption"] == len(found["own_caption"])
    assert "median margin" in format_accuracy(right)


def test_a_score_matrix_of_another_split_is_refused(meta: dict, tmp_path: Path) -> None:
    found = comparisons(meta)
    with pytest.raises(DataError, match="score that split"):
        accuracy(np.zeros((3, 4)), found)
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path, "test")
