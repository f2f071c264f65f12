"""What the service's worker asks of a gallery: tokenize, encode several requests at once, top-k images.

:class:`Searcher` is the whole interface between the HTTP layer's batcher and
the model: a searcher over a gallery sharded across machines (Ray actors, each
with its own runtime) implements the same four calls and plugs in without
touching :mod:`itmrt.serve.http_app` or :mod:`itmrt.serve.batcher`.

:class:`RuntimeSearcher` is the one-process searcher over
:class:`itmrt.runtime.Runtime` and a gallery. Its :meth:`~RuntimeSearcher.encode`
keeps a request's answer independent of what it was batched with. NAAF and
SCAN encode each caption over its own length, so captions of any requests
share encoder batches. CMPM's released text encoder (``max_over_padding``)
takes its max over the padded length too, so an embedding depends on how far
its batch is padded; the runtime pads all captions of one call to their
longest, and a request alone is padded to its own longest caption - so
requests are encoded together only with requests whose longest caption has
the same length.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from itmrt.bundle.names import parse_choice
from itmrt.errors import ItmrtError
from itmrt.runtime.encoders import CaptionEmbeddings, tokenize
from itmrt.runtime.options import OnLong
from itmrt.runtime.tiled import TopK

TokenIds = list[list[int]]


class Searcher(Protocol):
    """A text-to-image search over one gallery; one thread makes every call."""

    size: int
    """Images in the gallery."""
    ids: Sequence[str] | None
    """Each image's id (its path for galleries made from image files), or None."""

    def warmup(self) -> float:
        """Run every stage once before the service reports ready; the seconds it took."""
        ...

    def tokenize(self, captions: Sequence[str]) -> TokenIds:
        """Token ids of one request's captions; :class:`ItmrtError` for a caption the model refuses."""
        ...

    def encode(self, requests: Sequence[TokenIds]) -> CaptionEmbeddings:
        """Every caption of ``requests`` in order, each request's rows as that request would get alone."""
        ...

    def top_k(self, captions: CaptionEmbeddings, k: int) -> TopK:
        """Each caption's ``k`` best gallery images, best first (ties: lower index first)."""
        ...


def concatenate(parts: Sequence[CaptionEmbeddings]) -> CaptionEmbeddings:
    """Caption embeddings of ``parts`` one after the other."""
    lengths = np.concatenate([part.lengths for part in parts])
    vectors = np.concatenate([part.vectors for part in parts])
    if parts[0].offsets is None:
        return CaptionEmbeddings(vectors, lengths)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return CaptionEmbeddings(vectors, lengths, offsets)


class RuntimeSearcher:
    """A gallery searched in this process through :class:`itmrt.runtime.Runtime` (see the module docstring)."""

    def __init__(
        self,
        runtime: Any,
        gallery: Any,
        on_long: OnLong | str = OnLong.REFUSE,
        ids: Sequence[str] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.on_long = parse_choice(OnLong, on_long, "--on-long")
        self.runtime, self.gallery, self.warn = runtime, gallery, warn
        self.size = len(gallery)
        # Galleries made from image files name each image by its path.
        self.ids = ids if ids is not None else getattr(gallery, "ids", None)
        # Rows independent of what else is encoded with them: a large request may be split into batches.
        self.splittable = bool(getattr(runtime.text_encoder, "bucket", False))
        embeddings = getattr(getattr(gallery, "manifest", None), "embeddings", None)
        self.version: str | None = embeddings.sha256[:16] if embeddings is not None else None
        """The gallery's version as answers name it: the start of its embeddings' sha256 (None: sharded)."""
        if self.ids is not None and len(self.ids) != self.size:
            raise ItmrtError(f"the gallery has {self.size} images but {len(self.ids)} ids")

    def discard(self) -> None:
        """Free what this version holds, its runtime included: a version that never answered (refused at its
        warm-up) and that shares nothing with the one in use."""
        self.runtime.close()

    def warmup(self) -> float:
        seconds = float(self.runtime.warmup())  # a kernel cache that cannot be written: the runtime warns
        # One real search pages the gallery in and sizes the scorer's buffers for it.
        started = time.perf_counter()
        self.top_k(self.encode([self.tokenize([self.runtime.vocab.sample_caption()])]), 1)
        return seconds + time.perf_counter() - started

    def tokenize(self, captions: Sequence[str]) -> TokenIds:
        limit = self.runtime.max_length
        if self.on_long is OnLong.TRUNCATE:
            return tokenize(self.runtime.vocab, captions, limit, OnLong.TRUNCATE, self.warn)
        ids = tokenize(self.runtime.vocab, captions, None, warn=self.warn)
        for index, tokens in enumerate(ids):
            if limit is not None and len(tokens) > limit:
                raise ItmrtError(
                    f"caption {index} has {len(tokens)} tokens (with <start> and <end>), "
                    f"over this model's limit of {limit}; shorten it"
                )
        return ids

    def encode(self, requests: Sequence[TokenIds]) -> CaptionEmbeddings:
        encoder = self.runtime.text_encoder
        if encoder.bucket:  # embeddings independent of padding: one call for every caption
            return encoder.encode_ids([tokens for request in requests for tokens in request])
        widths = [max(len(tokens) for tokens in request) for request in requests]
        groups: dict[int, list[int]] = {}
        for number, width in enumerate(widths):
            groups.setdefault(width, []).append(number)
        parts, order = [], []
        for members in groups.values():
            parts.append(encoder.encode_ids([tokens for number in members for tokens in requests[number]]))
            order.extend(members)
        merged = concatenate(parts)
        # Back to request order: the rows of request ``order[j]`` follow one another in ``merged``.
        starts = np.cumsum([0] + [len(requests[number]) for number in order])
        where = {number: np.arange(starts[j], starts[j + 1]) for j, number in enumerate(order)}
        return merged.take(np.concatenate([where[number] for number in range(len(requests))]))

    def top_k(self, captions: CaptionEmbeddings, k: int) -> TopK:
        return self.runtime.rank(self.gallery, captions, top_k=k).t2i

    def contents(self) -> set[str]:
        """The sha256 of every embeddings file this searcher answers from."""
        embeddings = getattr(getattr(self.gallery, "manifest", None), "embeddings", None)
        return {embeddings.sha256} if embeddings is not None else set()

    def forget_other_constants(self) -> None:
        """After a swap that kept the runtime: drop the one-caption scorer's cached constants of every gallery
        but this one (each version swapped in would otherwise add its own until the cache's budget is spent)."""
        one_caption = getattr(self.runtime, "one_caption", None)
        if one_caption is not None:
            current = self.contents()
            one_caption.forget_constants(lambda key: len(key) > 1 and key[1] in current)


def open_runtime_searcher(
    bundle: str | Path,
    gallery: str | Path,
    on_long: OnLong | str = OnLong.REFUSE,
    warn: Callable[[str], None] | None = None,
    **load_options: Any,
) -> RuntimeSearcher:
    """Load ``bundle`` (``load_options`` as :func:`itmrt.runtime.load` takes them) and open ``gallery`` for search,
    its embeddings copied into memory as they are verified (nothing done to the file later reaches them)."""
    from itmrt.runtime import load
    from itmrt.runtime.gallery import read_gallery

    opened = read_gallery(gallery, in_memory=True)
    runtime = load(bundle, warn=warn, **load_options)
    opened.check_bundle(runtime.bundle)
    return RuntimeSearcher(runtime, opened, on_long, warn=warn)
