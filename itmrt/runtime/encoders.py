"""Batched encoders over a backend: captions -> token (or global) embeddings, images -> region (or global) embeddings.

Captions are tokenised with the bundle's vocabulary, sorted by length and cut
into batches of similar length, so a batch is padded only to its own longest
caption. The token embeddings of all captions are kept back to back
(``[total tokens, d]`` plus offsets) rather than padded to the longest caption
of the whole set: the scorer pads each tile on the fly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from itmrt.bundle.manifest import AxisRange
from itmrt.bundle.names import LENGTHS, TOKEN_IDS, parse_choice
from itmrt.errors import DataError, ItmrtError
from itmrt.runtime.backends import Backend
from itmrt.runtime.options import OnLong, Warn
from itmrt.text.tokenize import control_character
from itmrt.text.vocab import CaptionTooLongError, Vocabulary, count_unknown_words


def default_warn(message: str) -> None:
    """Where the runtime's warnings go when the caller gives no ``warn``: Python's warnings."""
    warnings.warn(message, stacklevel=3)


@dataclass
class CaptionEmbeddings:
    """Embeddings of N captions.

    Cross-attention models: ``vectors`` is ``[sum(lengths), d]`` (caption k's
    tokens are rows ``offsets[k]:offsets[k+1]``). Global models (CMPM):
    ``vectors`` is ``[N, D]`` and ``offsets`` is None.
    """

    vectors: np.ndarray
    lengths: np.ndarray  # [N] int32, tokens incl. <start>/<end>
    offsets: np.ndarray | None = None  # [N + 1] int64

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def token_level(self) -> bool:
        return self.offsets is not None

    def padded(self, index: np.ndarray | Sequence[int], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Captions ``index`` as a zero-padded ``[B, L, d]`` batch (L = their longest, or ``width``) and lengths."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        if self.offsets is None:
            return self.vectors[index], lengths
        longest = int(lengths.max()) if len(index) else 0
        width = longest if width is None else max(width, longest)
        batch = np.zeros((len(index), width, self.vectors.shape[1]), dtype=np.float32)
        for row, k in enumerate(index):
            start = self.offsets[k]
            batch[row, : lengths[row]] = self.vectors[start : start + lengths[row]]
        return batch, lengths

    def take(self, index: np.ndarray | Sequence[int]) -> CaptionEmbeddings:
        """A new set holding captions ``index`` in that order."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        if self.offsets is None:
            return CaptionEmbeddings(self.vectors[index], lengths)
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets.astype(np.int64)  # uint64 offsets and lengths made float rows (np.arange of the two)
        rows = (np.concatenate([np.arange(starts[k], starts[k] + int(self.lengths[k])) for k in index])
                if len(index) else np.zeros(0, np.int64))
        return CaptionEmbeddings(self.vectors[rows], lengths, offsets)


def check_caption_texts(captions: object) -> list[str]:
    """``captions`` as :meth:`Runtime.encode_captions` takes them: a list (or other iterable) of plain-text
    strings, each with a word, as a captions file's lines and the service's captions must be (a blank caption was
    ranked by nothing it said; None or a number failed as "not iterable")."""
    if isinstance(captions, (str, bytes)):
        raise ItmrtError("encode_captions takes a list of captions, not one string")
    try:
        texts = list(captions)  # type: ignore[call-overload]
    except TypeError:
        raise ItmrtError(f"encode_captions takes a list of captions (strings), not {type(captions).__name__}") from None
    for number, caption in enumerate(texts, start=1):
        if not isinstance(caption, str):
            raise ItmrtError(f"caption {number} is not a string but {type(caption).__name__}; "
                             "encode_captions takes a list of strings")
        if not caption.strip():
            raise ItmrtError(f"caption {number} is blank; give each caption at least one word")
        control = control_character(caption)
        if control is not None:
            raise ItmrtError(f"caption {number} holds the control character {control}; captions are plain text: "
                             "remove it")
    return texts


def check_caption_embeddings(captions: object) -> CaptionEmbeddings:
    """``captions`` as :meth:`Runtime.encode_captions` gives them: a set made by hand whose lengths, offsets and
    vectors disagree failed deep inside numpy or ONNX Runtime (an index out of bounds, a missing input)."""
    if not isinstance(captions, CaptionEmbeddings):
        raise ItmrtError(f"captions must be encoded first (Runtime.encode_captions), not a {type(captions).__name__}")
    problem = _caption_structure_problem(captions)
    if problem is not None:
        raise ItmrtError(f"caption embeddings: {problem}; make them with Runtime.encode_captions (a part of them "
                         "with CaptionEmbeddings.take)")
    return captions


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} of shape {value.shape}"
    return type(value).__name__


def _integers(value: object, ndim: int = 1) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == ndim and np.issubdtype(value.dtype, np.integer)


def _caption_structure_problem(captions: CaptionEmbeddings) -> str | None:
    """What is wrong with the parts of ``captions`` (see :class:`CaptionEmbeddings`), or None."""
    vectors, lengths, offsets = captions.vectors, captions.lengths, captions.offsets
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        return f"vectors must be a 2-D float array, not {_describe(vectors)}"
    if not _integers(lengths):
        return f"lengths must be a 1-D integer array, not {_describe(lengths)}"
    if len(lengths) and int(lengths.min()) < 1:
        return f"every caption needs at least one token, not {int(lengths.min())}"
    if offsets is None:
        if len(vectors) != len(lengths):
            return f"{len(vectors)} vectors for {len(lengths)} captions (one vector each without offsets)"
        return None
    if not _integers(offsets) or len(offsets) != len(lengths) + 1:
        return f"offsets must be {len(lengths) + 1} integers (one more than the captions), not {_describe(offsets)}"
    if offsets[0] != 0 or (np.diff(offsets) != lengths).any() or offsets[-1] != len(vectors):
        return (f"offsets must start at 0, step by each caption's length and end at the {len(vectors)} token "
                "vectors")
    return None


def tokenize(
    vocab: Vocabulary,
    captions: Sequence[str],
    max_length: int | None,
    on_long: OnLong | str = OnLong.TRUNCATE,
    warn: Warn | None = None,
) -> list[list[int]]:
    """Token ids per caption; a caption over ``max_length`` ids is cut (with one warning) or refused."""
    on_long = parse_choice(OnLong, on_long, "--on-long")
    if max_length is not None and max_length < 2:
        raise ItmrtError(f"--max-length must be at least 2 (<start> and <end>), not {max_length}")
    encoded = [vocab.encode(caption) for caption in captions]
    unknown = count_unknown_words(vocab, encoded)
    if unknown.unknown or unknown.no_known_word:  # words the model cannot read are said, never dropped silently
        (warn or default_warn)(unknown.summary())
    if max_length is None:
        return encoded
    too_long = [k for k, ids in enumerate(encoded) if len(ids) > max_length]
    if not too_long:
        return encoded
    first = too_long[0]
    if on_long == OnLong.REFUSE:
        raise CaptionTooLongError(
            f"caption {first + 1} has {len(encoded[first])} tokens (with <start> and <end>), more than the limit "
            f"{max_length}; shorten it, or pass --on-long truncate"
        )
    for k in too_long:
        encoded[k] = encoded[k][: max_length - 1] + [vocab.end_id]
    (warn or default_warn)(
        f"{len(too_long)} caption(s) longer than {max_length} tokens were truncated (first: caption {first + 1})"
    )
    return encoded


def length_buckets(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices sorted by length (stable), cut into batches of ``batch_size``: little padding per batch."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class CaptionEncoder:
    """Captions -> :class:`CaptionEmbeddings` through a text-encoder backend."""

    def __init__(
        self,
        backend: Backend,
        vocab: Vocabulary,
        token_level: bool,
        max_length: int | None = None,
        on_long: str = "truncate",
        batch_size: int = 128,
        max_batch: int | None = None,
        bucket: bool = True,
        warn: Warn | None = None,
        small_backend: Backend | None = None,
        small_batch: int = 0,
    ) -> None:
        """``small_backend``: the same graph on one thread, for calls of at most ``small_batch`` captions."""
        if batch_size < 1:
            raise ItmrtError(f"--batch-size must be positive, not {batch_size}")
        self.backend, self.vocab, self.token_level = backend, vocab, token_level
        self.small_backend, self.small_batch = small_backend, small_batch
        self.max_length, self.on_long, self.warn = max_length, on_long, warn
        self.batch_size = min(batch_size, max_batch) if max_batch else batch_size
        self.bucket = bucket

    def encode(self, captions: Sequence[str]) -> CaptionEmbeddings:
        ids = tokenize(self.vocab, captions, self.max_length, self.on_long, self.warn)
        return self.encode_ids(ids)

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> CaptionEmbeddings:
        lengths = np.array([len(x) for x in ids], dtype=np.int32)
        n = len(ids)
        if self.bucket:
            batches = length_buckets(lengths, self.batch_size)
            width = None
        else:  # batch-dependent models (CMPM's max over padding): every batch padded alike, input order
            order = np.arange(n)
            batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
            width = int(lengths.max()) if n else 0
        pad = self.vocab.pad_id
        backend = self.small_backend if self.small_backend is not None and n <= self.small_batch else self.backend
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        vectors: np.ndarray | None = None
        for batch in batches:
            batch_width = width or int(lengths[batch].max())
            tokens = np.full((len(batch), batch_width), pad, dtype=np.int32)
            for row, k in enumerate(batch):
                tokens[row, : lengths[k]] = ids[k]
            out = backend.run({TOKEN_IDS: tokens, LENGTHS: lengths[batch]})[0]
            check_finite_output(out, "text encoder", f"{len(batch)} captions")
            if vectors is None:
                rows = int(offsets[-1]) if self.token_level else n
                vectors = np.empty((rows, out.shape[-1]), dtype=np.float32)
            if self.token_level:
                for row, k in enumerate(batch):
                    vectors[offsets[k] : offsets[k + 1]] = out[row, : lengths[k]]
            else:
                vectors[batch] = out
        if vectors is None:
            raise ItmrtError("no captions to encode")
        return CaptionEmbeddings(vectors, lengths, offsets if self.token_level else None)


def check_finite_output(values: np.ndarray, component: str, which: str) -> None:
    """Refuse an encoder output that is not finite (finite but huge inputs overflow float32 inside it)."""
    if not np.isfinite(values).all():
        raise DataError(
            f"the {component} gave NaN or infinite embeddings for {which}: the inputs are out of the range "
            "the model was trained on (e.g. features near float32's limit), or the bundle's weights are broken"
        )


def check_image_input(
    features: np.ndarray, expected: list[int | str], ranges: dict[str, AxisRange | None], source: str
) -> None:
    """Refuse features whose shape does not fit the image encoder's declared input (one-line error)."""
    if not isinstance(features, np.ndarray):
        raise DataError(f"{source} must be a numpy array, not {type(features).__name__}")
    if not np.issubdtype(features.dtype, np.floating):  # strings, booleans, integers, objects were cast and encoded
        raise DataError(f"{source} hold {features.dtype}; give float32 values (convert with "
                        "features.astype('float32') if they are numbers)")
    if features.ndim != len(expected):
        raise DataError(
            f"{source} has shape {tuple(features.shape)}; this bundle's image encoder takes {len(expected)}-d input "
            f"({' x '.join(str(d) for d in expected)})"
        )
    for axis, (have, want) in enumerate(zip(features.shape[1:], expected[1:]), start=1):
        if isinstance(want, int) and have != want:
            raise DataError(
                f"{source} has shape {tuple(features.shape)} but the bundle expects "
                f"{' x '.join(str(d) for d in expected)} "
                f"(axis {axis} is {have}, not {want}); use features extracted for this model"
            )
        limits = ranges.get(str(want)) if isinstance(want, str) else None
        if limits and not limits.min <= have <= limits.max:
            raise DataError(
                f"{source} has {have} along axis {axis} ({want}); the bundle was exported for "
                f"{limits.min}..{limits.max}; use features extracted for this model"
            )


class ImageEncoder:
    """Region features (or preprocessed images for CMPM) -> embeddings, in batches."""

    def __init__(self, backend: Backend, input_name: str, batch_size: int = 128, max_batch: int | None = None) -> None:
        if batch_size < 1:
            raise ItmrtError(f"--batch-size must be positive, not {batch_size}")
        self.backend, self.input_name = backend, input_name
        self.batch_size = min(batch_size, max_batch) if max_batch else batch_size

    def encode(self, features: np.ndarray, out: np.ndarray | None = None, source: str = "image features") -> np.ndarray:
        """Embeddings of ``features`` (any array-like, e.g. a memmap, read one batch at a time); ``source``
        names them (e.g. their file) in the errors."""
        n = int(features.shape[0])
        if n == 0:
            raise DataError(f"no images to encode ({source} is empty)")
        for start in range(0, n, self.batch_size):
            batch = np.ascontiguousarray(features[start : start + self.batch_size], dtype=np.float32)
            if not np.isfinite(batch).all():
                raise DataError(f"{source}: images {start}..{start + len(batch) - 1} contain NaN or infinite values")
            result = self.backend.run({self.input_name: batch})[0]
            check_finite_output(result, "image encoder", f"images {start}..{start + len(batch) - 1}")
            if out is None:
                out = np.empty((n, *result.shape[1:]), dtype=np.float32)
            out[start : start + len(batch)] = result
        assert out is not None
        return out
