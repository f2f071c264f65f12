"""PrecompSplit: both feature layouts, memory mapping, and every malformed-input error."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from itmrt.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit
from itmrt.errors import DataError

NUM_IMAGES, NUM_REGIONS, IMG_DIM = 3, 4, 6


def _features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((NUM_IMAGES, NUM_REGIONS, IMG_DIM)).astype(np.float32)


def _captions(count: int = NUM_IMAGES * CAPTIONS_PER_IMAGE) -> list[str]:
    return [f"caption number {i} of image {i // CAPTIONS_PER_IMAGE}" for i in range(count)]


def _write(folder: Path, features: np.ndarray, captions: list[str] | bytes, split: str = "test") -> Path:
    np.save(folder / f"{split}_ims.npy", features)
    data = captions if isinstance(captions, bytes) else ("\n".join(captions) + "\n").encode("utf-8")
    (folder / f"{split}_caps.txt").write_bytes(data)
    return folder


def _open_error(folder: Path, split: str = "test") -> str:
    with pytest.raises(DataError) as info:
        PrecompSplit.open(folder, split)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_one_row_per_image(tmp_path: Path) -> None:
    features = _features()
    _write(tmp_path, features, _captions())
    split = PrecompSplit.open(tmp_path, "test")
    assert isinstance(split.images, np.memmap)
    assert not split.images.flags.writeable
    assert split.repeated_layout is False
    assert (split.num_images, split.num_regions, split.img_dim) == (NUM_IMAGES, NUM_REGIONS, IMG_DIM)
    assert split.images.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(split.images), features)
    assert split.captions == _captions()
    assert split.num_captions == 15
    assert [split.caption_image_index(i) for i in (0, 4, 5, 14)] == [0, 0, 1, 2]
    assert list(split.image_caption_indices(2)) == [10, 11, 12, 13, 14]
    assert split.data_dir == tmp_path and split.split == "test"


def test_repeated_rows_are_a_strided_memmap_view(tmp_path: Path) -> None:
    features = _features()
    _write(tmp_path, np.repeat(features, CAPTIONS_PER_IMAGE, axis=0), _captions())
    split = PrecompSplit.open(tmp_path, "test")
    assert split.repeated_layout is True
    assert isinstance(split.images, np.memmap)
    assert split.images.shape == features.shape
    row_bytes = NUM_REGIONS * IMG_DIM * 4
    assert split.images.strides[0] == CAPTIONS_PER_IMAGE * row_bytes  # a view into the file, not a copy
    assert not split.images.flags.owndata
    np.testing.assert_array_equal(np.asarray(split.images), features)


def test_repeated_layout_with_differing_rows_is_rejected(tmp_path: Path) -> None:
    rows = np.random.default_rng(1).standard_normal((15, NUM_REGIONS, IMG_DIM)).astype(np.float32)
    _write(tmp_path, rows, _captions())
    message = _open_error(tmp_path)
    assert "test_ims.npy" in message and "differ" in message


def test_crlf_bom_and_surrounding_spaces_are_tolerated(tmp_path: Path) -> None:
    text = "\ufeff" + "\r\n".join(f"  {c} " for c in _captions()) + "\r\n"
    _write(tmp_path, _features(), text.encode("utf-8"))
    assert PrecompSplit.open(tmp_path, "test").captions == _captions()


def test_non_ascii_utf8_captions(tmp_path: Path) -> None:
    captions = _captions()
    captions[3] = "un café près de la tour"
    _write(tmp_path, _features(), captions)
    assert PrecompSplit.open(tmp_path, "test").captions[3] == "un café près de la tour"


def test_missing_folder(tmp_path: Path) -> None:
    message = _open_error(tmp_path / "nowhere")
    assert "nowhere" in message and "does not exist" in message


def test_missing_features_file(tmp_path: Path) -> None:
    (tmp_path / "test_caps.txt").write_text("\n".join(_captions()) + "\n", encoding="utf-8")
    message = _open_error(tmp_path)
    assert "test_ims.npy" in message and "not found" in message


def test_missing_captions_file(tmp_path: Path) -> None:
    np.save(tmp_path / "test_ims.npy", _features())
    message = _open_error(tmp_path)
    assert "test_caps.txt" in message and "not found" in message


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_captions_file(tmp_path: Path, content: bytes) -> None:
    _write(tmp_path, _features(), content)
    message = _open_error(tmp_path)
    assert "test_caps.txt" in message and "empty" in message


def test_blank_line_names_its_line_number(tmp_path: Path) -> None:
    captions = _captions()
    captions[6] = "   "
    _write(tmp_path, _features(), captions)
    message = _open_error(tmp_path)
    assert "test_caps.txt line 7 is empty" in message


@pytest.mark.parametrize("ending", ["\n\n", "\n \n\n", "\r\n\r\n"])
def test_blank_lines_after_the_last_caption_are_ignored(tmp_path: Path, ending: str) -> None:
    from itmrt.data.precomp import read_captions

    path = tmp_path / "caps.txt"
    path.write_bytes(("first caption\nsecond caption" + ending).encode("utf-8"))
    assert read_captions(path) == ["first caption", "second caption"]
    path.write_bytes(b"first caption\n\nsecond caption\n")  # inside the file it would shift the later captions
    with pytest.raises(DataError, match="line 2 is empty"):
        read_captions(path)


@pytest.mark.parametrize(("control", "named"), [("\x00", "U+0000"), ("\x1b[31m", "U+001B"), ("\x0c", "U+000C"),
                                               ("\x85", "U+0085")])
def test_control_characters_name_their_line(tmp_path: Path, control: str, named: str) -> None:
    # a NUL or an escape sequence was read as part of a word (an unknown one) and the caption ranked
    from itmrt.data.precomp import read_captions

    path = tmp_path / "caps.txt"
    path.write_text(f"first caption\nsecond{control} caption\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"caps.txt line 2 holds the control character {named}; captions "
                                                  "are plain text: remove it")):
        read_captions(path)
    path.write_text("a\tcaption\n", encoding="utf-8")  # a tab is whitespace between words
    assert read_captions(path) == ["a\tcaption"]


def test_undecodable_bytes_name_their_line(tmp_path: Path) -> None:
    lines = [c.encode("utf-8") for c in _captions()]
    lines[4] = b"caf\xe9 latin-1 text"
    _write(tmp_path, _features(), b"\n".join(lines) + b"\n")
    message = _open_error(tmp_path)
    assert "test_caps.txt line 5" in message and "UTF-8" in message


def test_caption_count_not_a_multiple_of_five(tmp_path: Path) -> None:
    _write(tmp_path, _features(), _captions(14))
    message = _open_error(tmp_path)
    assert "14 lines" in message and "multiple of 5" in message


def test_row_count_matches_neither_layout(tmp_path: Path) -> None:
    _write(tmp_path, _features(), _captions(20))  # 4 images' worth of captions, 3 rows
    message = _open_error(tmp_path)
    assert "3 rows" in message and "20 captions" in message


def test_wrong_ndim(tmp_path: Path) -> None:
    _write(tmp_path, _features().reshape(NUM_IMAGES, -1), _captions())
    message = _open_error(tmp_path)
    assert "test_ims.npy" in message and "3 dimensions" in message


def test_wrong_dtype(tmp_path: Path) -> None:
    _write(tmp_path, _features().astype(np.float64), _captions())
    message = _open_error(tmp_path)
    assert "float64" in message and "float32" in message


def test_not_an_npy_file(tmp_path: Path) -> None:
    (tmp_path / "test_ims.npy").write_bytes(b"this is not numpy data at all")
    (tmp_path / "test_caps.txt").write_text("\n".join(_captions()) + "\n", encoding="utf-8")
    message = _open_error(tmp_path)
    assert "test_ims.npy" in message and "not a readable .npy" in message


def test_pickled_object_array_is_refused(tmp_path: Path) -> None:
    objects = np.empty((NUM_IMAGES, 1, 1), dtype=object)
    np.save(tmp_path / "test_ims.npy", objects, allow_pickle=True)
    (tmp_path / "test_caps.txt").write_text("\n".join(_captions()) + "\n", encoding="utf-8")
    message = _open_error(tmp_path)
    assert "test_ims.npy" in message


def test_other_split_name(tmp_path: Path) -> None:
    _write(tmp_path, _features(3), _captions(), split="testall")
    split = PrecompSplit.open(tmp_path, "testall")
    np.testing.assert_array_equal(np.asarray(split.images), _features(3))
    assert "dev_caps.txt" in _open_error(tmp_path, "dev")
