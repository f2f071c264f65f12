"""Image-caption datasets: the synthetic generator, the reader's errors, preprocessing and identity recall."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from itmrt.data.images import IMAGE_MEAN, IMAGE_STD, ImageCaptionSplit, load_vocabulary, preprocess_images
from itmrt.errors import DataError
from itmrt.metrics.recall import identity_recall_table, recall_table
from itmrt.synthetic.identity_images import make_synthetic_image_dataset
from itmrt.synthetic.region_features import COLOURS, OBJECT_CLASSES


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_image_dataset(
        tmp_path_factory.mktemp("images") / "d", {"train": 12, "dev": 5}, seed=3, image_size=32
    )


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first = make_synthetic_image_dataset(tmp_path / "a", {"train": 4, "test": 3}, seed=7, image_size=32)
    second = make_synthetic_image_dataset(tmp_path / "b", {"train": 4, "test": 3}, seed=7, image_size=32)
    other = make_synthetic_image_dataset(tmp_path / "c", {"train": 4, "test": 3}, seed=8, image_size=32)
    names = [f"{split}_{part}" for split in ("test", "train")
             for part in ("caps.txt", "caption_image.npy", "images.npy", "labels.npy", "meta.json")]
    assert sorted(_files(first)) == sorted(names + ["vocab.json"])
    assert _files(first) == _files(second)
    assert _files(first)["train_images.npy"] != _files(other)["train_images.npy"]
    assert _files(first)["train_caps.txt"] != _files(other)["train_caps.txt"]
    alone = make_synthetic_image_dataset(tmp_path / "d", {"test": 3}, seed=7, image_size=32)
    assert (alone / "test_images.npy").read_bytes() == (first / "test_images.npy").read_bytes()


def test_structure_labels_and_caption_counts(tmp_path: Path) -> None:
    folder = make_synthetic_image_dataset(tmp_path / "d", {"train": 10}, images_per_identity=3,
                                          captions_per_image=(2, 4), seed=1, image_size=32)
    split = ImageCaptionSplit.open(folder, "train")
    assert split.images.shape == (30, 32, 32, 3) and split.images.dtype == np.uint8
    assert split.has_labels and split.num_identities == 10
    np.testing.assert_array_equal(split.image_labels, np.repeat(np.arange(10), 3))
    per_image = np.bincount(split.caption_image, minlength=30)
    assert per_image.min() >= 2 and per_image.max() <= 4 and len(set(per_image.tolist())) > 1
    assert np.all(np.diff(split.caption_image) >= 0)
    fixed = make_synthetic_image_dataset(tmp_path / "e", {"dev": 4}, captions_per_image=3, image_size=32)
    assert np.bincount(ImageCaptionSplit.open(fixed, "dev").caption_image).tolist() == [3] * 8


def test_captions_name_every_object_with_its_colour(dataset: Path) -> None:
    split = ImageCaptionSplit.open(dataset, "train")
    meta = json.loads((dataset / "train_meta.json").read_text(encoding="utf-8"))
    vocab = load_vocabulary(dataset)
    for caption, label in zip(split.captions, split.caption_labels):
        words = caption.split()
        assert all(word in vocab for word in words) and caption == " ".join(words)
        objects = meta["identities"][int(label)]
        assert 1 <= len(objects) <= 3
        for obj in objects:
            assert f"{obj['colour']} {obj['noun']}" in caption
        named = [w for i, w in enumerate(words) if w in OBJECT_CLASSES and words[i - 1] in COLOURS]
        assert sorted(named) == sorted(obj["noun"] for obj in objects)  # negated nouns carry no colour


def test_images_of_one_identity_differ_but_resemble_each_other(dataset: Path) -> None:
    images = np.asarray(ImageCaptionSplit.open(dataset, "train").images, dtype=np.float64)
    pairs = images.reshape(12, 2, -1)
    same = np.abs(pairs[:, 0] - pairs[:, 1]).mean(axis=1)
    other = np.abs(pairs[:, 0] - np.roll(pairs[:, 1], 1, axis=0)).mean(axis=1)
    assert np.all(same > 0)
    assert np.median(same) < np.median(other)


def test_refuses_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    folder = make_synthetic_image_dataset(tmp_path / "d", {"train": 2}, image_size=32)
    with pytest.raises(DataError, match="not empty"):
        make_synthetic_image_dataset(folder, {"train": 2}, seed=5, image_size=32)
    make_synthetic_image_dataset(folder, {"train": 2}, seed=5, overwrite=True, image_size=32)
    with pytest.raises(DataError, match="image_size"):
        make_synthetic_image_dataset(tmp_path / "e", {"train": 2}, image_size=16)
    with pytest.raises(DataError, match="captions_per_image"):
        make_synthetic_image_dataset(tmp_path / "e", {"train": 2}, captions_per_image=(3, 2), image_size=32)
    assert not (tmp_path / "e").exists()


def _break(folder: Path, how: str) -> None:
    if how == "no_images":
        (folder / "dev_images.npy").unlink()
    elif how == "float_images":
        np.save(folder / "dev_images.npy", np.zeros((10, 32, 32, 3), dtype=np.float32))
    elif how == "grey_images":
        np.save(folder / "dev_images.npy", np.zeros((10, 32, 32), dtype=np.uint8))
    elif how == "not_npy":
        (folder / "dev_images.npy").write_bytes(b"not an array")
    elif how == "empty_line":
        lines = (folder / "dev_caps.txt").read_text(encoding="utf-8").splitlines()
        (folder / "dev_caps.txt").write_text("\n".join(lines[:2] + [""] + lines[3:]) + "\n", encoding="utf-8")
    elif how == "bad_utf8":
        (folder / "dev_caps.txt").write_bytes((folder / "dev_caps.txt").read_bytes() + b"a caf\xe9 dog\n")
    elif how == "extra_caption":
        with open(folder / "dev_caps.txt", "a", encoding="utf-8") as handle:
            handle.write("one more caption\n")
    elif how == "index_range":
        index = np.load(folder / "dev_caption_image.npy")
        index[-1] = 10
        np.save(folder / "dev_caption_image.npy", index)
    elif how == "float_index":
        np.save(folder / "dev_caption_image.npy", np.load(folder / "dev_caption_image.npy").astype(np.float64))
    elif how == "labels_count":
        np.save(folder / "dev_labels.npy", np.arange(9))
    elif how == "no_index":
        (folder / "dev_caption_image.npy").unlink()


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("no_images", "not found"),
        ("float_images", "dtype float32"),
        ("grey_images", "N x H x W x 3"),
        ("not_npy", "not a readable .npy"),
        ("empty_line", "line 3 is empty"),
        ("bad_utf8", "not valid UTF-8"),
        ("extra_caption", "one entry per caption"),
        ("index_range", "outside 0..9"),
        ("float_index", "1-D integer array"),
        ("labels_count", "9 labels"),
        ("no_index", "caption-to-image index file"),
    ],
)
def test_reader_errors_are_one_line(tmp_path: Path, how: str, expected: str) -> None:
    folder = make_synthetic_image_dataset(tmp_path / "d", {"dev": 5}, image_size=32)
    ImageCaptionSplit.open(folder, "dev")  # intact before breaking it
    _break(folder, how)
    with pytest.raises(DataError, match=expected) as info:
        ImageCaptionSplit.open(folder, "dev")
    assert "\n" not in str(info.value)


def test_missing_folder_and_missing_labels(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageCaptionSplit.open(tmp_path / "nowhere", "dev")
    folder = make_synthetic_image_dataset(tmp_path / "d", {"dev": 3}, image_size=32)
    (folder / "dev_labels.npy").unlink()
    split = ImageCaptionSplit.open(folder, "dev")
    assert not split.has_labels
    np.testing.assert_array_equal(split.image_labels, np.arange(6))
    np.testing.assert_array_equal(split.caption_labels, split.caption_image)


def test_preprocess_images() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    out = preprocess_images(images)
    assert out.dtype == np.float32 and out.shape == (2, 3, 5, 4) and out.flags["C_CONTIGUOUS"]
    n, y, x, c = 1, 3, 2, 2
    assert out[n, c, y, x] == pytest.approx((images[n, y, x, c] / 255.0 - IMAGE_MEAN[c]) / IMAGE_STD[c], rel=1e-6)
    white = preprocess_images(np.full((1, 1, 1, 3), 255, dtype=np.uint8))
    np.testing.assert_allclose(white[0, :, 0, 0], (1 - IMAGE_MEAN) / IMAGE_STD, rtol=1e-6)
    with pytest.raises(DataError, match="uint8"):
        preprocess_images(images.astype(np.float32))
    with pytest.raises(DataError, match="N x H x W x 3"):
        preprocess_images(images[..., :2])


def test_identity_recall_hand_example() -> None:
    # 3 images: identities 0, 0, 1. 3 captions: identities 0, 1, 1.
    image_labels = np.array([0, 0, 1])
    caption_labels = np.array([0, 1, 1])
    scores = np.array([
        [0.1, 0.9, 0.2],   # image 0 (id 0): best caption is id 1 -> first correct (caption 0) at rank 2
        [0.8, 0.3, 0.0],   # image 1 (id 0): caption 0 first -> rank 0
        [0.5, 0.2, 0.4],   # image 2 (id 1): caption 0 (wrong) first, caption 2 second -> rank 1
    ])
    table = identity_recall_table(scores, image_labels, caption_labels)
    # i2t ranks [2, 0, 1]; t2i: caption 0 -> image 1 (0.8) first, correct -> 0;
    # caption 1 -> image 0 (0.9, wrong), image 1 (0.3, wrong), image 2 (0.2) -> 2;
    # caption 2 -> image 2 (0.4) first -> 0.
    assert table["i2t_r1"] == pytest.approx(100 / 3) and table["i2t_r5"] == 100.0
    assert table["i2t_meanr"] == pytest.approx(2.0) and table["i2t_medr"] == 2.0
    assert table["t2i_r1"] == pytest.approx(200 / 3) and table["t2i_meanr"] == pytest.approx(5 / 3)
    tie = identity_recall_table(np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([0, 1]), np.array([1, 0]))
    assert tie["i2t_r1"] == 0.0  # a wrong caption tying the right one is counted ahead of it


def test_identity_recall_equals_recall_table_with_one_image_per_identity() -> None:
    rng = np.random.default_rng(4)
    scores = rng.standard_normal((30, 150)).astype(np.float32)
    caption_labels = np.repeat(np.arange(30), 5)
    assert identity_recall_table(scores, np.arange(30), caption_labels) == pytest.approx(recall_table(scores))
    with pytest.raises(DataError, match="shape"):
        identity_recall_table(scores[:, :10], np.arange(30), caption_labels)
