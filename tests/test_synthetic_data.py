"""Synthetic dataset: determinism, on-disk format, caption structure, and that negation matters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from itmrt.data.precomp import PrecompSplit
from itmrt.errors import DataError
from itmrt.metrics.recall import recall_table
from itmrt.synthetic.region_features import COLOURS, OBJECT_CLASSES, SPECIAL_TOKENS, _World, make_synthetic_dataset

SMALL = {"img_dim": 64, "num_regions": 12}
NEGATION = re.compile(r"\b(?:no|any) (\w+)")


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _meta(folder: Path, split: str = "test") -> dict:
    return json.loads((folder / f"{split}_meta.json").read_text(encoding="utf-8"))


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path / "a", {"train": 6, "test": 5}, seed=3, **SMALL)
    second = make_synthetic_dataset(tmp_path / "b", {"train": 6, "test": 5}, seed=3, **SMALL)
    other = make_synthetic_dataset(tmp_path / "c", {"train": 6, "test": 5}, seed=4, **SMALL)
    assert sorted(_files(first)) == [
        "test_caps.txt", "test_ims.npy", "test_meta.json", "train_caps.txt", "train_ims.npy", "train_meta.json",
        "vocab.json",
    ]
    assert _files(first) == _files(second)
    for name in ("train_ims.npy", "test_ims.npy", "train_caps.txt", "test_caps.txt"):
        assert _files(first)[name] != _files(other)[name]
    assert _files(first)["train_ims.npy"] != _files(first)["test_ims.npy"]


def test_a_split_does_not_depend_on_which_other_splits_are_made(tmp_path: Path) -> None:
    alone = make_synthetic_dataset(tmp_path / "a", {"test": 4}, seed=1, **SMALL)
    together = make_synthetic_dataset(tmp_path / "b", {"train": 8, "dev": 2, "test": 4}, seed=1, **SMALL)
    for name in ("test_ims.npy", "test_caps.txt"):
        assert (alone / name).read_bytes() == (together / name).read_bytes()


def test_reader_opens_it_in_both_layouts(tmp_path: Path) -> None:
    plain = make_synthetic_dataset(tmp_path / "plain", 7, seed=2, **SMALL)
    repeated = make_synthetic_dataset(tmp_path / "rep", 7, seed=2, repeat_images=True, **SMALL)
    for split_name in ("train", "dev", "test"):
        a = PrecompSplit.open(plain, split_name)
        b = PrecompSplit.open(repeated, split_name)
        assert (a.num_images, a.num_regions, a.img_dim, a.num_captions) == (7, 12, 64, 35)
        assert not a.repeated_layout and b.repeated_layout
        np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
        assert a.captions == b.captions


def test_vocabulary_file_format_and_coverage(tmp_path: Path) -> None:
    folder = make_synthetic_dataset(tmp_path / "d", {"test": 30}, seed=0, **SMALL)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert set(vocab) == {"word2idx", "idx2word", "idx"}
    assert [vocab["word2idx"][token] for token in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert vocab["idx"] == len(vocab["word2idx"]) == len(vocab["idx2word"])
    assert all(vocab["idx2word"][str(index)] == word for word, index in vocab["word2idx"].items())
    captions = PrecompSplit.open(folder, "test").captions
    for caption in captions:
        # Lower-case words separated by single spaces: nltk.word_tokenize splits exactly here.
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption), caption
        assert all(word in vocab["word2idx"] for word in caption.split())


def test_captions_name_present_objects_and_negate_absent_ones(tmp_path: Path) -> None:
    folder = make_synthetic_dataset(tmp_path / "d", {"test": 60}, seed=5, **SMALL)
    meta = _meta(folder)
    captions = PrecompSplit.open(folder, "test").captions
    assert [entry["text"] for entry in meta["captions"]] == captions
    assert len(meta["images"]) == 60
    negated_count = 0
    for index, (caption, entry) in enumerate(zip(captions, meta["captions"])):
        assert entry["image"] == index // 5
        present = {obj["noun"] for obj in meta["images"][entry["image"]]["objects"]}
        assert 2 <= len(present) <= 4
        negated = set(NEGATION.findall(caption))
        named = {word for word in caption.split() if word in OBJECT_CLASSES}
        assert negated == set(entry["negated"])
        assert named - negated == present          # every present object, nothing else, is asserted
        assert not negated & present               # negations only ever name absent objects
        for obj in meta["images"][entry["image"]]["objects"]:
            for colour in COLOURS:                 # a colour word, when used, is the object's own colour
                if f"{colour} {obj['noun']}" in caption:
                    assert colour == obj["colour"]
        negated_count += bool(negated)
    assert negated_count >= 0.4 * len(captions)


def test_confusable_pairs(tmp_path: Path) -> None:
    folder = make_synthetic_dataset(tmp_path / "d", {"test": 40}, seed=6, **SMALL)
    meta = _meta(folder)
    with_confuser = [entry for entry in meta["captions"] if entry["confuser"] is not None]
    assert len(with_confuser) >= 2 * 20 * 0.8  # nearly every pair's first image has 2-3 such captions
    for entry in with_confuser:
        own = meta["images"][entry["image"]]["objects"]
        other = meta["images"][entry["confuser"]]["objects"]
        (absent,) = entry["negated"]
        # The confuser holds everything the caption asserts (same colours) plus the object it negates.
        assert other == own + [{"noun": absent, "colour": other[-1]["colour"]}]
        assert absent not in {obj["noun"] for obj in own}


def _detect_objects(features: np.ndarray, seed: int, img_dim: int) -> np.ndarray:
    """Which classes each image shows: any region with cosine > 0.5 to the class prototype."""
    prototypes = _World.create(seed, img_dim).prototypes
    unit_regions = features / np.linalg.norm(features, axis=-1, keepdims=True)
    unit_prototypes = prototypes / np.linalg.norm(prototypes, axis=-1, keepdims=True)
    return (np.einsum("ird,kd->irk", unit_regions, unit_prototypes).max(axis=1) > 0.5).astype(np.float64)


def test_features_carry_the_objects_and_negation_changes_retrieval(tmp_path: Path) -> None:
    seed = 9
    folder = make_synthetic_dataset(tmp_path / "d", {"test": 40}, seed=seed, **SMALL)
    split = PrecompSplit.open(folder, "test")
    meta = _meta(folder)
    presence = _detect_objects(np.asarray(split.images), seed, SMALL["img_dim"])
    truth = np.zeros_like(presence)
    for index, image in enumerate(meta["images"]):
        for obj in image["objects"]:
            truth[index, OBJECT_CLASSES.index(obj["noun"])] = 1.0
    np.testing.assert_array_equal(presence, truth)

    asserted = np.zeros((len(split.captions), len(OBJECT_CLASSES)))
    negated = np.zeros_like(asserted)
    for c, caption in enumerate(split.captions):
        negated_words = set(NEGATION.findall(caption))
        for word in caption.split():
            if word in OBJECT_CLASSES:
                target = negated if word in negated_words else asserted
                target[c, OBJECT_CLASSES.index(word)] = 1.0
    # Score = objects the caption asserts that the image shows, minus those it negates (or, blind to
    # negation, plus them), minus a little for each shown object the caption does not assert.
    unasserted = 0.1 * presence @ (1.0 - asserted).T
    bag_of_words = presence @ (asserted + negated).T - unasserted
    negation_aware = presence @ (asserted - negated).T - unasserted
    for c, entry in enumerate(meta["captions"]):
        if entry["confuser"] is not None:
            own, confuser = entry["image"], entry["confuser"]
            assert bag_of_words[confuser, c] > bag_of_words[own, c]
            assert negation_aware[own, c] > negation_aware[confuser, c]
    blind = recall_table(bag_of_words)
    aware = recall_table(negation_aware)
    assert aware["t2i_r1"] > blind["t2i_r1"] + 10.0
    assert aware["rsum"] > blind["rsum"]


def test_refuses_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    make_synthetic_dataset(target, {"test": 2}, seed=0, **SMALL)  # an empty folder is fine
    before = _files(target)
    with pytest.raises(DataError, match="not empty"):
        make_synthetic_dataset(target, {"test": 2}, seed=1, **SMALL)
    assert _files(target) == before
    make_synthetic_dataset(target, {"test": 2}, seed=1, overwrite=True, **SMALL)
    assert _files(target)["test_ims.npy"] != before["test_ims.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging folder left behind


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"num_images": 0}, "at least 1 image"),
        ({"num_images": {}}, "no splits"),
        ({"num_images": {"../x": 2}}, "not allowed"),
        ({"num_images": 2, "num_regions": 3}, "num_regions"),
        ({"num_images": 2, "seed": -1}, "seed"),
        ({"num_images": 2, "negation_fraction": 1.5}, "negation_fraction"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    arguments = {"img_dim": 8, "num_regions": 8, **kwargs}
    with pytest.raises(DataError, match=fragment):
        make_synthetic_dataset(tmp_path / "d", **arguments)
    assert not (tmp_path / "d").exists()


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        make_synthetic_dataset(tmp_path / "f", 2, **SMALL)


def test_without_negations_only_the_negations_differ(tmp_path: Path) -> None:
    """negations=False draws the same numbers: same features, every caption its positive part, no 'no X'."""
    kept = make_synthetic_dataset(tmp_path / "kept", {"train": 10, "test": 12}, seed=5, **SMALL)
    dropped = make_synthetic_dataset(tmp_path / "dropped", {"train": 10, "test": 12}, seed=5, negations=False, **SMALL)
    for split in ("train", "test"):
        assert (kept / f"{split}_ims.npy").read_bytes() == (dropped / f"{split}_ims.npy").read_bytes()
        with_neg, without = _meta(kept, split), _meta(dropped, split)
        assert with_neg["images"] == without["images"] and without["negations"] is False
        negated = 0
        for a, b in zip(with_neg["captions"], without["captions"]):
            assert b["negated"] == [] and b["confuser"] is None and b["mentions"] == a["mentions"]
            assert not NEGATION.search(b["text"]) and " no " not in f" {b['text']} "
            if a["negated"]:
                negated += 1
                assert a["text"] != b["text"]
            else:
                assert a["text"] == b["text"]
        assert negated > 0
    assert (kept / "vocab.json").read_bytes() == (dropped / "vocab.json").read_bytes()
