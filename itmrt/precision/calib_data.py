"""Calibration and sample data for precision variants: streamed in batches, checked against the bundle.

A calibration folder is the user's own data in the layout of the model family
(the bundle's image-input kind says which: :func:`itmrt.data.image_inputs.open_image_split`):
precomputed region features (``{split}_ims.npy`` + ``{split}_caps.txt``, see
:mod:`itmrt.data.precomp`) for NAAF/SCAN, or images (``{split}_images.npy`` +
captions, see :mod:`itmrt.data.images`) for CMPM. Only the sampled rows are
read, one batch at a time from the memory-mapped arrays, so a large split
never has to fit in memory. The folder is refused with a one-line error when
its dimensions or vocabulary do not match the bundle, or when it holds fewer
than ``min_samples`` images.

The scorer's calibration inputs are embeddings: they come from running the
bundle's float32 encoders on the same batches.

Only numpy, onnxruntime and tqdm are imported here (no torch).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader
from tqdm import tqdm

from itmrt.bundle.folder import bundle_file
from itmrt.bundle.manifest import Manifest
from itmrt.bundle.names import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS, LENGTHS, MAX_LENGTH, TOKEN_IDS, Component
from itmrt.bundle.traits import bundle_traits
from itmrt.data import image_inputs
from itmrt.errors import DataError, ItmrtError, VocabularyError
from itmrt.runtime.sessions import create_session
from itmrt.text.vocab import Vocabulary

Feeds = dict[str, np.ndarray]
DEFAULT_SAMPLES = 256
DEFAULT_MIN_SAMPLES = 32
DEFAULT_BATCH = 16
MAX_UNKNOWN_SHARE = 0.5  # more unknown words than this: the captions are not in the bundle's vocabulary


def ort_session(path_or_bytes: str | Path | bytes) -> ort.InferenceSession:
    """A quiet CPU session (the FP16 converter's clipped constants make ORT warn otherwise)."""
    return create_session(path_or_bytes)


def _numpy_dtype(manifest: Manifest, graph: str, input_name: str) -> np.dtype[Any]:
    for entry in manifest.graph(graph).inputs:
        if entry.name == input_name:
            return np.dtype(entry.dtype)
    raise ItmrtError(f"the bundle's {graph} has no input '{input_name}'; export the bundle again")


def _max_length(manifest: Manifest) -> int:
    limits = manifest.graph(Component.TEXT_ENCODER).shape_ranges.get(MAX_LENGTH)
    return limits.max if limits is not None else 64


@dataclass
class CalibrationData:
    """A sample of the user's data, read lazily: ``images[rows]`` and the captions of those images."""

    data_dir: Path
    split: str
    image_input: str  # the image encoder's input kind (the manifest's traits.image_input)
    images: np.ndarray  # memmap: features [N, n, d] or uint8 pixels [N, H, W, 3]
    rows: np.ndarray  # which images are sampled (sorted)
    captions: list[list[str]]  # captions of each sampled image
    vocabulary: Vocabulary
    max_length: int
    token_dtype: np.dtype[Any]
    length_dtype: np.dtype[Any]

    @property
    def num_samples(self) -> int:
        return int(len(self.rows))

    @property
    def fingerprint(self) -> str:
        """Identifies the sample (file sizes, rows, split): the calibration entry records it."""
        digest = hashlib.sha256()
        digest.update(f"{self.data_dir.resolve()}|{self.split}|{self.images.shape}".encode())
        digest.update(self.rows.astype(np.int64).tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        return f"{self.data_dir} split '{self.split}' ({self.num_samples} images)"

    # -- batches ---------------------------------------------------------
    # Every batch has the same shape (ORT's histogram calibrators stack the
    # batches' activations): ``batch_size`` images, one caption each (the
    # image's captions in turn), padded to the sample's longest caption; a
    # final incomplete batch is left out unless it is the only one.

    def _starts(self, batch_size: int) -> range:
        full = len(self.rows) // batch_size
        return range(0, max(full, 1) * batch_size, batch_size)

    def num_batches(self, batch_size: int) -> int:
        return len(self._starts(batch_size))

    def image_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Graph-ready image inputs of the sampled rows, ``batch_size`` at a time."""
        for start in self._starts(batch_size):
            rows = self.rows[start : start + batch_size]
            batch = np.asarray(self.images[rows])
            if not np.isfinite(batch).all():
                raise DataError(f"{self.describe()}: images {rows[0]}..{rows[-1]} hold NaN or infinite values; "
                                "calibrate on clean data (every value finite)")
            yield image_inputs.image_batch(self.image_input, batch)

    def _caption(self, index: int) -> str:
        captions = self.captions[index]
        return captions[index % len(captions)]

    @property
    def caption_width(self) -> int:
        """Token width of every caption batch: the longest sampled caption (at most the profile's max)."""
        longest = max(len(self.vocabulary.encode(self._caption(i))) for i in range(len(self.rows)))
        return min(longest, self.max_length)

    def caption_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Token ids ``[batch, caption_width]`` and lengths of one caption per sampled image."""
        width = self.caption_width
        for start in self._starts(batch_size):
            texts = [self._caption(i) for i in range(start, min(start + batch_size, len(self.rows)))]
            tokens, lengths = self.vocabulary.encode_batch(texts, max_length=self.max_length)
            padded = np.full((len(texts), width), self.vocabulary.pad_id, dtype=tokens.dtype)
            padded[:, : tokens.shape[1]] = tokens
            yield padded.astype(self.token_dtype), lengths.astype(self.length_dtype)

    def paired_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        yield from (
            (images, tokens, lengths)
            for images, (tokens, lengths) in zip(self.image_batches(batch_size), self.caption_batches(batch_size))
        )


def _sample_rows(available: int, samples: int) -> np.ndarray:
    """``samples`` rows spread evenly over the split (deterministic; all rows when fewer)."""
    if samples >= available:
        return np.arange(available)
    return np.unique(np.linspace(0, available - 1, samples).round().astype(np.int64))


def _check_vocabulary(data_dir: Path, vocabulary: Vocabulary, manifest: Manifest) -> None:
    data_vocab = data_dir / "vocab.json"
    if data_vocab.is_file():
        theirs = Vocabulary.from_json(data_vocab)
        if theirs.sha256 != manifest.vocab.content_sha256:
            raise VocabularyError(
                f"{data_vocab} ({len(theirs)} words) is not the bundle's vocabulary ({manifest.vocab.size} words); "
                "calibrate with data tokenised by the model's vocabulary"
            )


def _check_unknown_share(captions: list[list[str]], vocabulary: Vocabulary, data_dir: Path) -> None:
    ids = [token for group in captions for caption in group[:1] for token in vocabulary.encode(caption)[1:-1]]
    if ids and sum(token == vocabulary.unk_id for token in ids) / len(ids) > MAX_UNKNOWN_SHARE:
        raise VocabularyError(
            f"most caption words in {data_dir} are not in the bundle's vocabulary; "
            "these captions do not belong to this model's vocabulary"
        )


def open_calibration_data(
    bundle: Path,
    manifest: Manifest,
    data_dir: str | Path,
    split: str = "train",
    samples: int = DEFAULT_SAMPLES,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> CalibrationData:
    """Open ``data_dir``'s ``split``, check it against the bundle, and pick ``samples`` images from it."""
    folder = Path(data_dir)
    image_input = bundle_traits(manifest).image_input
    if samples < 1:
        raise ItmrtError(f"--samples must be at least 1, not {samples}")
    vocabulary = Vocabulary.from_json(bundle_file(bundle, manifest, manifest.vocab.file))
    _check_vocabulary(folder, vocabulary, manifest)
    image_split = image_inputs.open_image_split(image_input, folder, split, manifest)
    images, by_image = image_split.images, image_split.captions
    available = sum(1 for captions in by_image if captions)
    if available < min_samples:
        raise DataError(
            f"{folder} split '{split}' holds {available} images with captions; calibration needs at least "
            f"{min_samples}: use a larger split"
        )
    rows = _sample_rows(int(images.shape[0]), samples)
    rows = np.array([row for row in rows if by_image[int(row)]], dtype=np.int64)
    chosen = [by_image[int(row)] for row in rows]
    _check_unknown_share(chosen, vocabulary, folder)
    return CalibrationData(
        folder, split, image_input, images, rows, chosen, vocabulary, _max_length(manifest),
        _numpy_dtype(manifest, Component.TEXT_ENCODER, TOKEN_IDS),
        _numpy_dtype(manifest, Component.TEXT_ENCODER, LENGTHS),
    )


def random_sample(
    manifest: Manifest, num_images: int = 8, num_captions: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random graph inputs shaped like the bundle's (used when no calibration data is given).

    Region features are non-negative (as bottom-up-attention features are);
    caption lengths mix 2 .. min(12, max) so padding is exercised.
    """
    rng = np.random.default_rng(seed)
    images = image_inputs.random_images(bundle_traits(manifest).image_input, manifest, num_images, rng)
    longest = max(2, min(12, _max_length(manifest)))
    lengths = np.resize(np.arange(2, longest + 1), num_captions)
    lengths[0] = longest
    vocab_size = int(manifest.dims["vocab_size"])
    tokens = np.zeros((num_captions, longest), dtype=np.int64)
    for row, length in enumerate(lengths):
        tokens[row, 0], tokens[row, length - 1] = manifest.vocab.start_id, manifest.vocab.end_id
        tokens[row, 1 : length - 1] = rng.integers(4, vocab_size, length - 2)
    return (
        images,
        tokens.astype(_numpy_dtype(manifest, Component.TEXT_ENCODER, TOKEN_IDS)),
        lengths.astype(_numpy_dtype(manifest, Component.TEXT_ENCODER, LENGTHS)),
    )


class FeedMaker:
    """Turns (images, tokens, lengths) batches into each graph's feeds, running the fp32 encoders for the scorer."""

    def __init__(self, bundle: Path, manifest: Manifest) -> None:
        self.bundle = bundle
        self.manifest = manifest
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.image_input = manifest.graph(Component.IMAGE_ENCODER).inputs[0].name
        self.scorer_inputs = manifest.graph(Component.SCORER).input_names()

    def _session(self, graph: str) -> ort.InferenceSession:
        if graph not in self._sessions:
            path = bundle_file(self.bundle, self.manifest, self.manifest.graph(graph).file)
            self._sessions[graph] = ort_session(path)
        return self._sessions[graph]

    def feeds(self, graph: str, images: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> Feeds:
        if graph == Component.IMAGE_ENCODER:
            return {self.image_input: images}
        text_feeds = {TOKEN_IDS: tokens, LENGTHS: lengths}
        if graph == Component.TEXT_ENCODER:
            return text_feeds
        if graph != Component.SCORER:
            raise ItmrtError(f"unknown graph '{graph}'")
        available = {
            IMAGE_EMBEDDINGS: self._session(Component.IMAGE_ENCODER).run(None, {self.image_input: images})[0],
            CAPTION_EMBEDDINGS: self._session(Component.TEXT_ENCODER).run(None, text_feeds)[0],
            LENGTHS: lengths,
        }
        return {name: available[name] for name in self.scorer_inputs}


class StreamingCalibrationReader(CalibrationDataReader):  # type: ignore[misc]
    """ONNX Runtime's calibration reader over a batch stream, with a tqdm progress bar on stderr.

    ``make_stream`` is called again on :meth:`rewind`, so every pass reads the
    data afresh instead of holding it in memory.
    """

    def __init__(
        self, make_stream: Callable[[], Iterator[Feeds]], total: int, label: str, progress: bool = True
    ) -> None:
        self.make_stream = make_stream
        self.total = total
        self.label = label
        self.progress = progress
        self._stream: Iterator[Feeds] | None = None
        self._bar: Any = None
        self.batches_read = 0

    def get_next(self) -> Feeds | None:
        if self._stream is None:
            self._stream = self.make_stream()
            self._bar = tqdm(
                total=self.total, desc=self.label, unit="batch", file=sys.stderr,
                disable=None if self.progress else True, leave=False
            )
        item = next(self._stream, None)
        if item is None:
            self._bar.close()
            return None
        self.batches_read += 1
        self._bar.update(1)
        return item

    def rewind(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._stream = None

    def __len__(self) -> int:
        return self.total


def calibration_reader(
    data: CalibrationData, feeds: FeedMaker, graph: str, batch_size: int = DEFAULT_BATCH, progress: bool = True
) -> StreamingCalibrationReader:
    """A reader that streams ``graph``'s inputs for the sampled calibration data."""
    total = data.num_batches(batch_size)

    def stream() -> Iterator[Feeds]:
        for images, tokens, lengths in data.paired_batches(batch_size):
            yield feeds.feeds(graph, images, tokens, lengths)

    return StreamingCalibrationReader(stream, total, f"calibrating {graph}", progress)
