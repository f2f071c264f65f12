"""itmrt.text.vocab: the released vocabulary files, encoding, batching, saving, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from itmrt.errors import ItmrtError, VocabularyError
from itmrt.text import CaptionTooLongError, Vocabulary

RELEASED = {
    # file: (size, <pad>, <start>, <end>, <unk>)
    "coco_precomp_vocab.json": (11353, 0, 1, 2, 3),
    "f30k_precomp_vocab.json": (8481, 0, 1, 2, 3),
    "coco_precomp.json": (11306, 0, 2, 3, 1),
    "f30k_precomp.json": (8347, 0, 2, 3, 1),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_files_special_tokens_by_name(vocab_dir: Path, name: str) -> None:
    vocabulary = Vocabulary.from_json(vocab_dir / name)
    size, pad, start, end, unk = RELEASED[name]
    assert len(vocabulary) == size
    assert (vocabulary.pad_id, vocabulary.start_id, vocabulary.end_id, vocabulary.unk_id) == (pad, start, end, unk)
    raw = json.loads((vocab_dir / name).read_text(encoding="utf-8"))["word2idx"]
    assert vocabulary.word2idx == raw
    assert all(vocabulary.idx2word[index] == word for word, index in raw.items())


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_encode_with_released_file(vocab_dir: Path, name: str) -> None:
    vocabulary = Vocabulary.from_json(vocab_dir / name)
    words = vocabulary.word2idx
    ids = vocabulary.encode("A Dog runs. The xqzzyplok sits!")
    expected_words = ["a", "dog", "runs", ".", "the", None, "sits", "!"]
    expected = [words["<start>"]] + [words[w] if w else words["<unk>"] for w in expected_words] + [words["<end>"]]
    assert ids == expected
    assert vocabulary.decode(ids[1:-1]) == [w or "<unk>" for w in expected_words]


def test_to_json_round_trip_keeps_indices_and_hash(vocab_dir: Path, tmp_path: Path) -> None:
    original = Vocabulary.from_json(vocab_dir / "f30k_precomp.json")
    copy = tmp_path / "nested" / "vocab.json"
    original.to_json(copy)
    reread = Vocabulary.from_json(copy)
    assert reread == original and reread.sha256 == original.sha256
    assert reread.unk_id == 1  # indices are kept, not renumbered
    data = json.loads(copy.read_text(encoding="utf-8"))
    assert set(data) == {"word2idx", "idx2word", "idx"} and data["idx"] == len(original)
    other = Vocabulary.from_json(vocab_dir / "f30k_precomp_vocab.json")
    assert other.sha256 != original.sha256


def test_from_words_and_unknown_words() -> None:
    vocabulary = Vocabulary.from_words(["dog", "a", "dog", "<unk>", "runs", "."])
    assert vocabulary.idx2word == {
        0: "<pad>", 1: "<start>", 2: "<end>", 3: "<unk>", 4: "dog", 5: "a", 6: "runs", 7: "."
    }
    assert vocabulary.encode("A dog flies.") == [1, 5, 4, 3, 7, 2]
    assert vocabulary.word_id("cat") == vocabulary.unk_id == 3
    assert "dog" in vocabulary and "cat" not in vocabulary


def test_from_captions_counts_tokens() -> None:
    captions = ["a dog runs.", "A dog sits.", "a cat"]
    vocabulary = Vocabulary.from_captions(captions, min_count=2)
    assert [vocabulary.idx2word[i] for i in range(4, len(vocabulary))] == ["a", "dog", "."]


def test_sha256_depends_on_content_only() -> None:
    first = Vocabulary.from_words(["a", "b"])
    assert first.sha256 == Vocabulary.from_words(["a", "b"]).sha256 == first.fingerprint
    assert first.sha256 != Vocabulary.from_words(["b", "a"]).sha256
    assert len(first.sha256) == 64


def test_encode_batch_pads_to_longest() -> None:
    vocabulary = Vocabulary.from_words(["a", "dog", "runs", "."])
    tokens, lengths = vocabulary.encode_batch(["a dog runs.", "dog", ""])
    assert tokens.dtype == np.int64 and lengths.dtype == np.int64
    assert tokens.tolist() == [[1, 4, 5, 6, 7, 2], [1, 5, 2, 0, 0, 0], [1, 2, 0, 0, 0, 0]]
    assert lengths.tolist() == [6, 3, 2]
    empty_tokens, empty_lengths = vocabulary.encode_batch([])
    assert empty_tokens.shape == (0, 0) and empty_lengths.shape == (0,)


def test_encode_batch_long_captions() -> None:
    vocabulary = Vocabulary.from_words(["a", "dog", "runs", "."])
    tokens, lengths = vocabulary.encode_batch(["a dog runs.", "a"], max_length=4)
    assert tokens.tolist() == [[1, 4, 5, 2], [1, 4, 2, 0]]
    assert lengths.tolist() == [4, 3]
    with pytest.raises(CaptionTooLongError, match=r"caption 1 has 6 tokens"):
        vocabulary.encode_batch(["a", "a dog runs."], max_length=5, on_long="error")
    assert vocabulary.encode_batch(["a dog runs."], max_length=6, on_long="error")[1].tolist() == [6]
    with pytest.raises(ItmrtError):
        vocabulary.encode_batch(["a"], max_length=1)
    with pytest.raises(ItmrtError):
        vocabulary.encode_batch(["a"], on_long="drop")


def _write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "vocab.json"
    path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "cannot read vocabulary"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"idx2word": {}}), "expected a JSON object with a 'word2idx'"),
        (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "a": 3}}), "lacks the special token(s) <unk>"),
        (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 5}}), "indices must be 0..3"),
        (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": "3"}}), "not a word mapped"),
        (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "char_level": True}),
         "character-level"),
        (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3},
                     "idx2word": {"0": "<pad>", "1": "<end>", "2": "<start>", "3": "<unk>"}, "idx": 4}),
         "inconsistent"),
        (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "idx": 7}), "'idx' is 7"),
    ],
)
def test_malformed_files_raise_one_line_errors(tmp_path: Path, content: str, fragment: str) -> None:
    with pytest.raises(VocabularyError) as caught:
        Vocabulary.from_json(_write(tmp_path, content))
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="does not exist"):
        Vocabulary.from_json(tmp_path / "absent.json")


def test_to_json_leaves_no_temporary_files(tmp_path: Path) -> None:
    vocabulary = Vocabulary.from_words(["é", "a"])
    vocabulary.to_json(tmp_path / "v.json")
    vocabulary.to_json(tmp_path / "v.json")  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["v.json"]
    assert Vocabulary.from_json(tmp_path / "v.json") == vocabulary
