"""Vocabularies of the released NAAF/SCAN models and caption encoding.

The released vocabularies come in two JSON layouts:

* ``*_precomp_vocab.json``: ``word2idx``, ``idx2word`` (string keys) and
  ``idx`` (the number of words); ``<pad> <start> <end> <unk>`` are 0-3.
* ``*_precomp.json``: ``word2idx``, ``char_level`` and ``max_len``; here
  ``<unk>`` is 1 and ``<start>``/``<end>`` are 2/3.

The special tokens are therefore always looked up by name. Indices must be
exactly ``0 .. len-1`` because they index the text encoder's embedding table.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.documents import parse_json
from itmrt.errors import ItmrtError, VocabularyError, first_line
from itmrt.publish import atomic_write_text
from itmrt.text.tokenize import word_tokenize

__all__ = ["Vocabulary", "CaptionTooLongError", "SPECIAL_TOKENS", "UnknownWords", "count_unknown_words",
           "tokenize_caption"]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, START, END, UNK)
"""Special tokens, in the order ``*_precomp_vocab.json`` numbers them."""


class CaptionTooLongError(ItmrtError):
    """A caption has more tokens than the allowed maximum length."""


def tokenize_caption(caption: str) -> list[str]:
    """The released models' caption tokens: ``nltk.word_tokenize(caption.lower())``."""
    return word_tokenize(caption.lower())


class Vocabulary:
    """A word <-> index map with the four special tokens, and caption encoding."""

    def __init__(self, word2idx: dict[str, int], source: str = "vocabulary") -> None:
        """Validate ``word2idx``; ``source`` names it in error messages (e.g. a path)."""
        self.word2idx: dict[str, int] = _validated_word2idx(word2idx, source)
        self.idx2word: dict[int, str] = {index: word for word, index in self.word2idx.items()}
        self._source = source

    # -- construction -----------------------------------------------------

    @classmethod
    def from_words(cls, words: Iterable[str]) -> Vocabulary:
        """Special tokens (0-3, ``*_precomp_vocab.json`` order), then ``words`` in order, once each."""
        word2idx: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
        for word in words:
            if word not in word2idx:
                word2idx[word] = len(word2idx)
        return cls(word2idx)

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int = 4) -> Vocabulary:
        """Words that occur at least ``min_count`` times in the tokenised captions.

        This is how the released vocabularies were built (threshold 4); words
        keep the order of their first occurrence.
        """
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize_caption(caption))
        return cls.from_words(word for word, count in counts.items() if count >= min_count)

    @classmethod
    def from_json(cls, path: str | Path) -> Vocabulary:
        """Read either released JSON layout."""
        path = Path(path)
        if path.is_dir():
            raise VocabularyError(f"vocabulary {path} is a folder; give the vocabulary JSON file")
        try:
            data = parse_json(path.read_bytes())
        except FileNotFoundError:
            raise VocabularyError(f"vocabulary file {path} does not exist") from None
        except OSError as exc:
            raise VocabularyError(f"cannot read vocabulary {path}: {exc.strerror or first_line(exc)}") from None
        except RecursionError:
            raise VocabularyError(f"cannot read vocabulary {path} as JSON: it is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
            raise VocabularyError(f"cannot read vocabulary {path} as JSON: {first_line(exc)}") from None
        if not isinstance(data, dict) or not isinstance(data.get("word2idx"), dict):
            raise VocabularyError(
                f"{path} is not a vocabulary: expected a JSON object with a 'word2idx' map"
            )
        if data.get("char_level"):
            raise VocabularyError(
                f"{path} is a character-level vocabulary, which the released models do not use"
            )
        vocabulary = cls(data["word2idx"], source=str(path))
        if "idx2word" in data:
            _check_idx2word(data["idx2word"], vocabulary.word2idx, path)
        if "idx" in data and data["idx"] != len(vocabulary):
            raise VocabularyError(
                f"{path}: 'idx' is {data['idx']!r} but 'word2idx' holds {len(vocabulary)} words"
            )
        return vocabulary

    def to_json(self, path: str | Path) -> None:
        """Write the ``*_precomp_vocab.json`` layout atomically (temp file + rename)."""
        path = Path(path)
        document = {
            "idx2word": {str(index): self.idx2word[index] for index in range(len(self))},
            "word2idx": {self.idx2word[index]: index for index in range(len(self))},
            "idx": len(self),
        }
        atomic_write_text(path, json.dumps(document, ensure_ascii=False))

    # -- lookup -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.word2idx)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.word2idx == other.word2idx

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words from {self._source})"

    @property
    def pad_id(self) -> int:
        return self.word2idx[PAD]

    @property
    def start_id(self) -> int:
        return self.word2idx[START]

    @property
    def end_id(self) -> int:
        return self.word2idx[END]

    @property
    def unk_id(self) -> int:
        return self.word2idx[UNK]

    def sample_caption(self, words: int = 4) -> str:
        """A caption of the vocabulary's first ``words`` ordinary words: warm-up input it knows every word of."""
        ordinary = (self.idx2word[index] for index in range(len(self)) if self.idx2word[index] not in SPECIAL_TOKENS)
        return " ".join(word for _, word in zip(range(words), ordinary))

    def word_id(self, word: str) -> int:
        """Index of ``word``, or of ``<unk>`` when it is not in the vocabulary."""
        return self.word2idx.get(word, self.unk_id)

    @property
    def sha256(self) -> str:
        """Hash of the content (the words in index order), independent of the file layout.

        Two files that map the same words to the same indices have the same
        hash, so a bundle can check that a vocabulary is the one it was made with.
        """
        words = [self.idx2word[index] for index in range(len(self))]
        canonical = json.dumps(words, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    @property
    def fingerprint(self) -> str:
        """Same as :attr:`sha256`."""
        return self.sha256

    # -- encoding -----------------------------------------------------------

    def check_fits(self, rows: int, name: str, table: str = "the checkpoint's embedding",
                   remedy: str = "pass the vocabulary the model was trained with") -> None:
        """Refuse a vocabulary whose size is not the ``rows`` of a model's word-embedding ``table``."""
        if len(self) != rows:
            raise VocabularyError(f"{name} has {len(self)} words but {table} has {rows} rows; {remedy}")

    def encode(self, caption: str) -> list[int]:
        """``<start>``, the ids of the caption's lower-cased tokens (``<unk>`` if unknown), ``<end>``."""
        unk = self.unk_id
        ids = [self.word2idx.get(token, unk) for token in tokenize_caption(caption)]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids``; raises :class:`VocabularyError` for an index out of range."""
        words = []
        for index in ids:
            word = self.idx2word.get(int(index))
            if word is None:
                raise VocabularyError(f"token id {index} is outside the vocabulary (size {len(self)})")
            words.append(word)
        return words

    def encode_batch(
        self,
        captions: Sequence[str],
        max_length: int | None = None,
        on_long: str = "truncate",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode captions into a padded ``int64`` id matrix ``[B, L]`` and lengths ``[B]``.

        ``L`` is the longest encoded caption (``<start>`` and ``<end>``
        included). With ``max_length``, a longer caption is either cut to
        ``max_length`` ids keeping ``<start>`` and ``<end>`` (``on_long="truncate"``)
        or rejected with :class:`CaptionTooLongError` (``on_long="error"``).
        """
        if on_long not in ("truncate", "error"):
            raise ItmrtError(f"on_long must be 'truncate' or 'error', not {on_long!r}")
        if max_length is not None and max_length < 2:
            raise ItmrtError(f"max_length must be at least 2 (<start> and <end>), not {max_length}")
        encoded = [self.encode(caption) for caption in captions]
        if max_length is not None:
            for index, ids in enumerate(encoded):
                if len(ids) <= max_length:
                    continue
                if on_long == "error":
                    raise CaptionTooLongError(
                        f"caption {index} has {len(ids)} tokens (with <start> and <end>), "
                        f"more than max_length={max_length}; shorten it or raise max_length"
                    )
                encoded[index] = ids[: max_length - 1] + [self.end_id]
        lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
        width = int(lengths.max()) if len(encoded) else 0
        tokens = np.full((len(encoded), width), self.pad_id, dtype=np.int64)
        for row, ids in enumerate(encoded):
            tokens[row, : len(ids)] = ids
        return tokens, lengths


@dataclass(frozen=True)
class UnknownWords:
    """How many caption words a vocabulary does not know (each is encoded as ``<unk>``)."""

    unknown: int  # words (tokens between <start> and <end>) not in the vocabulary
    words: int  # words in all
    no_known_word: tuple[int, ...]  # captions (0-based) without a single word the vocabulary knows

    def summary(self) -> str:
        """One line: the count, and the captions that have no known word (numbered from 1)."""
        share = f" ({100.0 * self.unknown / self.words:.1f}%)" if self.words else ""
        text = f"{self.unknown} of {self.words} caption words{share} are not in the vocabulary (each counts as <unk>)"
        if self.no_known_word:
            first = ", ".join(str(k + 1) for k in self.no_known_word[:5])
            more = ", ..." if len(self.no_known_word) > 5 else ""
            text += (f"; {len(self.no_known_word)} caption(s) have no known word at all (caption {first}{more}): "
                     "their results rank images by nothing the model knows")
        return text


def count_unknown_words(vocab: Vocabulary, encoded: Sequence[Sequence[int]]) -> UnknownWords:
    """Count the ``<unk>`` ids of captions encoded by :meth:`Vocabulary.encode` (``<start>`` and ``<end>`` aside)."""
    unk = vocab.unk_id
    unknown = words = 0
    no_known: list[int] = []
    for index, ids in enumerate(encoded):
        real = ids[1:-1]
        misses = sum(1 for token in real if token == unk)
        unknown += misses
        words += len(real)
        if misses == len(real):
            no_known.append(index)
    return UnknownWords(unknown, words, tuple(no_known))


def _validated_word2idx(word2idx: Any, source: str) -> dict[str, int]:
    if not isinstance(word2idx, dict) or not word2idx:
        raise VocabularyError(f"{source}: 'word2idx' must be a non-empty map of word to index")
    checked: dict[str, int] = {}
    for word, index in word2idx.items():
        if not isinstance(word, str) or isinstance(index, bool) or not isinstance(index, int):
            raise VocabularyError(
                f"{source}: entry {word!r}: {index!r} is not a word mapped to an integer index"
            )
        checked[word] = index
    missing = [token for token in SPECIAL_TOKENS if token not in checked]
    if missing:
        raise VocabularyError(
            f"{source} lacks the special token(s) {' '.join(missing)}; "
            "a vocabulary needs <pad> <start> <end> <unk>"
        )
    if sorted(checked.values()) != list(range(len(checked))):
        raise VocabularyError(
            f"{source}: indices must be 0..{len(checked) - 1}, each used once "
            "(they index the embedding table)"
        )
    return checked


def _check_idx2word(idx2word: Any, word2idx: dict[str, int], path: Path) -> None:
    if not isinstance(idx2word, dict):
        raise VocabularyError(f"{path}: 'idx2word' must be a map of index to word")
    for key, word in idx2word.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise VocabularyError(f"{path}: 'idx2word' key {key!r} is not an integer") from None
        if word2idx.get(word) != index:
            raise VocabularyError(
                f"{path}: 'idx2word' maps {index} to {word!r} but 'word2idx' disagrees; "
                "the file is inconsistent"
            )
    if len(idx2word) != len(word2idx):
        raise VocabularyError(
            f"{path}: 'idx2word' has {len(idx2word)} entries but 'word2idx' has {len(word2idx)}"
        )
