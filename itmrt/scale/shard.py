"""Searching one shard with a runtime: full scoring, or its shortlist (FAISS) reranked by the cross-attention scorer.

A shard answers with its own top-k per caption, in gallery rows (the shard's
first row added), and, for ``itmrt infer``, its images' top-k captions and
their score rows. Whatever searches the shards - one process in turn
(:mod:`itmrt.scale.local`) or Ray actors (:mod:`itmrt.scale.ray_search`) - calls
:meth:`OpenShard.search` and merges the answers with :func:`merge_answers`.

With a shortlist of K, each shard reranks its own K best candidates, so S
shards rerank S x K images per caption: a superset of the K best of the whole
gallery, never fewer. With full scoring, the merged top-k equals the top-k of
one gallery holding every image.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.errors import GalleryChanged, ItmrtError
from itmrt.limits import MAX_COUNT, check_flag, check_top_k, is_integer
from itmrt.runtime.compact_regions import CompactRegions
from itmrt.runtime.encoders import CaptionEmbeddings, check_caption_embeddings
from itmrt.runtime.gallery import Gallery
from itmrt.runtime.options import check_directions
from itmrt.runtime.shortlist import (
    caption_global_vectors,
    check_shortlist,
    rerank_image_to_text,
    rerank_text_to_image,
    top_candidates,
)
from itmrt.runtime.tiled import StreamingTopK, TopK
from itmrt.scale import positional
from itmrt.scale.file_guard import FileGuard, folder_states
from itmrt.scale.index import ShortlistIndex
from itmrt.scale.layout import (
    INDEX_FILE,
    ShardedGallery,
    ShardRecord,
    index_record,
    member,
    read_shard_gallery,
    shard_vectors,
)
from itmrt.scale.positional import PositionalRows
from itmrt.scale.region_load import load_region_index
from itmrt.scale.region_search import (
    ProbeCache,
    RegionIndex,
    ScoreEstimate,
    rerank_candidates,
)

REGION_OPTIONS = {"nprobe": "--nprobe", "exact_pass": "--exact-pass", "union": "--union", "refine": "--refine",
                  "prefilter": "--prefilter", "budget": "--budget", "rescore": "--rescore"}
"""A :class:`SearchRequest`'s fields that choose how a region index is searched, and their flags."""


@dataclass(frozen=True)
class SearchRequest:
    """What every shard is asked: top ``k``, full scoring or a shortlist of K per shard, which directions."""

    k: int = 10
    shortlist: int | None = None
    directions: tuple[str, ...] = ("t2i",)
    keep_scores: bool = False  # the shard's full images x captions score rows (full scoring only)
    nprobe: int | None = None  # region index: centroids probed per caption token (None: each shard's recorded)
    exact_pass: int | None = None  # region index: images scored exactly (at least K; None: each shard's default)
    union: int | None = None  # region index: global-vector candidates added per shard (None: each shard's default)
    refine: int | None = None  # region index: images per shard re-estimated from their centroids (None: default_refine)
    prefilter: int | None = None  # region index: probed images per shard estimated (None: recorded; 0: all)
    budget: int | None = None  # region index: images reranked over all shards together (None: K per shard)
    rescore: int | None = None  # region index: images per shard re-estimated from stored regions (None: default)

    def check(self) -> SearchRequest:
        check_top_k(self.k)
        self._check_counts()
        # "no" was truthy: a shortlist's request was told to drop --scores-out it never gave
        check_flag(self.keep_scores, "keep_scores")
        check_directions(self.directions)  # ("t2i", "t2i") searched every shard twice; 5 failed as not iterable
        if self.shortlist is not None:
            check_shortlist(self.shortlist, self.k)
            if self.keep_scores:
                raise ItmrtError("a shortlist scores only candidate pairs, not the full matrix; "
                                 "drop --shortlist or --scores-out")
        if self.nprobe is not None and self.nprobe < 1:
            raise ItmrtError(f"--nprobe must be at least 1, not {self.nprobe}")
        if self.exact_pass is not None and self.exact_pass < 0:
            raise ItmrtError(f"--exact-pass must be at least 0 (0: none), not {self.exact_pass}")
        for flag, value in (("--refine", self.refine), ("--prefilter", self.prefilter), ("--rescore", self.rescore)):
            if value is not None and value < 0:
                raise ItmrtError(f"{flag} must be at least 0, not {value}")
        if self.budget is not None:
            if self.budget < self.k:
                raise ItmrtError(f"--budget ({self.budget}) must be at least --top-k ({self.k})")
            if self.shortlist is None or tuple(self.directions) != ("t2i",):
                raise ItmrtError("--budget applies to a region-index search of images for captions (--shortlist, "
                                 "text to image only: `itmrt infer --direction t2i`)")
        if self.union is not None and self.union < 0:
            raise ItmrtError(f"--union must be at least 0 (0: none), not {self.union}")
        return self

    def _check_counts(self) -> None:
        """The region index's counts are integers (a float, a string or NaN failed deep inside numpy, or was
        silently taken as a count); they, k and the shortlist at most :data:`MAX_COUNT`, as the CLI's flags."""
        for name, flag in REGION_OPTIONS.items():
            value = getattr(self, name)
            if value is not None and not is_integer(value):
                raise ItmrtError(f"{flag} must be an integer (or None: the gallery's default), not {value!r}")
        for name, flag in {"k": "--top-k", "shortlist": "--shortlist", **REGION_OPTIONS}.items():
            value = getattr(self, name)
            if is_integer(value) and value > MAX_COUNT:
                raise ItmrtError(f"{flag} must be at most {MAX_COUNT} (as on the command line), not {value}: "
                                 "lower it")


def check_request(request: object) -> SearchRequest:
    """``request`` a :class:`SearchRequest`, checked (None or a dict failed as a missing attribute)."""
    if not isinstance(request, SearchRequest):
        raise ItmrtError(f"the request must be an itmrt.scale.SearchRequest (e.g. SearchRequest(k=10)), not "
                         f"{type(request).__name__}")
    return request.check()


@dataclass
class ShardAnswer:
    """One shard's part of an answer; image indices are gallery rows."""

    name: str
    first: int
    images: int
    t2i: TopK | None = None  # per caption: the shard's best images
    i2t: TopK | None = None  # per image of the shard: its best captions
    scores: np.ndarray | None = None  # [images, captions]
    pairs: int = 0  # cross-attention pairs scored
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # region index: candidates / rerank seconds


@dataclass
class SearchResult:
    """The merged answer of every shard: as :class:`itmrt.runtime.tiled.ScoreResult` for one gallery."""

    t2i: TopK | None
    i2t: TopK | None
    scores: np.ndarray | None
    pairs: int
    shard_seconds: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # region index stages, summed over shards


class OpenShard:
    """A shard opened for search: its gallery (memory-mapped, or copied into memory), global vectors and FAISS
    index, or its region index; ``guard`` checks the files still mapped before each search
    (:mod:`itmrt.scale.file_guard`)."""

    def __init__(self, record: ShardRecord, gallery: Gallery, vectors: np.ndarray | None,
                 index: ShortlistIndex | None, regions: RegionIndex | None = None,
                 guard: FileGuard | None = None) -> None:
        self.record, self.gallery, self.vectors, self.index = record, gallery, vectors, index
        self.regions, self.guard = regions, guard

    @classmethod
    def open(cls, sharded: ShardedGallery, record: ShardRecord, verify: bool = True,
             gpu_index: bool = False, in_memory: bool = False, positional: bool = True) -> OpenShard:
        """``in_memory``: the embeddings copied into this process's memory as they are verified; otherwise they
        are read from their file by position as each search needs them (:mod:`itmrt.scale.positional`; a
        truncated file is then an error, never SIGBUS) and the file is checked before and after each search.
        Global vectors, the region index and compact storage's centroids and codes are read into memory either
        way (a small part of the embeddings); compact storage's packed residuals are read like dense embeddings
        (by position, the rows a search decodes, unless ``in_memory``). ``positional=False`` memory-maps the
        dense embeddings instead (what a measurement compares against; a truncation during a search then ends
        the process) and copies the residuals."""
        before = folder_states(member(sharded.path, record.name))  # ahead of verification
        # Every file but the dense embeddings and the packed residuals is copied by positional reads and the copy
        # verified: never mapped.
        by_position = None if in_memory or not positional else \
            (lambda path: PositionalRows(path, f"shard {record.name}", "compact residuals"))
        gallery = read_shard_gallery(sharded, record, verify, in_memory, compact_in_memory=True,
                                     residual_rows=by_position)
        vectors = shard_vectors(gallery, verify, in_memory=True)
        entry = index_record(gallery)
        index = None
        if entry is not None:
            index = ShortlistIndex.load(member(gallery.path, entry.get("file", INDEX_FILE)), entry, gpu_index)
        regions = None
        region_entry = gallery.manifest.region_index
        if region_entry is not None:
            if region_entry.built_from != gallery.manifest.embeddings.sha256 and \
                    gallery.manifest.embeddings.stored == "dense":
                raise ItmrtError(f"{gallery.path}: its region index was not built from its embeddings; re-index it")
            regions = load_region_index(gallery.path, region_entry, verify, in_memory=True)
            regions.shards = len(sharded.shards)
            if regions.images != len(gallery):
                raise ItmrtError(f"{gallery.path}: its region index holds {regions.images} images, not "
                                 f"{len(gallery)}; re-index it")
        gallery, guarded = read_embeddings_by_position(gallery, record, in_memory, positional)
        rows = read_by_position(gallery)
        held = {guarded[0]: rows.fd} if rows is not None and rows.fd is not None else None
        guard = FileGuard(f"shard {record.name}", guarded, before, held)
        return cls(record, gallery, vectors, index, regions, guard if len(guard) else None)

    def close(self) -> None:
        """Let go of the file read by position (nothing to do for the others)."""
        rows = read_by_position(self.gallery)
        if rows is not None:
            rows.close()

    def files_changed(self) -> str | None:
        """Why a mapped file of this shard is no longer the one opened, or None."""
        return self.guard.changed() if self.guard is not None else None

    def candidates(self, caption_vectors: np.ndarray, shortlist: int) -> np.ndarray:
        """Each caption's ``shortlist`` best rows of this shard by global score (its index, else numpy)."""
        if self.index is not None:
            return self.index.candidates(caption_vectors, shortlist)
        if self.vectors is None:
            raise ItmrtError(f"{self.record.describe()} has no global vectors to shortlist with; re-index it")
        return top_candidates(caption_vectors, self.vectors, shortlist)

    def search(self, runtime: Any, captions: CaptionEmbeddings, request: SearchRequest,
               probes: ProbeCache | None = None) -> ShardAnswer:
        """This shard's answer to ``request`` (``runtime``: an :class:`itmrt.runtime.Runtime` of the bundle);
        ``probes``: the captions' region-index probes, shared with the other shards searched for the same
        request (:class:`itmrt.scale.region_search.ProbeCache`)."""
        with forgetting_constants_on_change(runtime):
            return self._search(runtime, captions, request, probes)

    def _search(self, runtime: Any, captions: CaptionEmbeddings, request: SearchRequest,
                probes: ProbeCache | None) -> ShardAnswer:
        started = time.perf_counter()
        if self.guard is not None:  # nothing is read from a file that changed since it was opened
            self.guard.check()
        answer = ShardAnswer(self.record.name, self.record.first, self.record.images)
        if request.shortlist is not None and captions.token_level and self.regions is not None:
            self._search_regions(runtime, captions, request, answer, probes)
        elif request.shortlist is None or not captions.token_level:
            self._search_all(runtime, captions, request, answer)
        else:
            vectors = caption_global_vectors(captions)
            embeddings = self.gallery.embeddings
            if "t2i" in request.directions:
                candidates = self.candidates(vectors, request.shortlist)
                answer.t2i = rerank_text_to_image(runtime.score, embeddings, captions, candidates, request.k)
                answer.pairs += candidates.size
            if "i2t" in request.directions:
                if self.vectors is None:
                    raise ItmrtError(f"{self.record.describe()} has no global vectors to shortlist with; re-index it")
                candidates = top_candidates(np.asarray(self.vectors), vectors, request.shortlist)
                answer.i2t = rerank_image_to_text(runtime.score, embeddings, captions, candidates, request.k)
                answer.pairs += candidates.size
        if self.guard is not None:  # a file rewritten in place while it was read: its answer is not given
            self.guard.check()
        if answer.t2i is not None:
            answer.t2i.indices = np.where(answer.t2i.indices >= 0, answer.t2i.indices + self.record.first, -1)
        answer.seconds = time.perf_counter() - started
        return answer

    def _search_all(self, runtime: Any, captions: CaptionEmbeddings, request: SearchRequest,
                    answer: ShardAnswer) -> None:
        """Full scoring: the whole shard at once where its embeddings are in memory (or mapped), else block by
        block as they are read (each block's top-k merged; rows offset by the block's first)."""
        answer.pairs = len(self.gallery) * len(captions)
        embeddings = self.gallery.embeddings
        if not isinstance(embeddings, PositionalRows):
            result = runtime.rank(self.gallery, captions, top_k=request.k, keep_scores=request.keep_scores)
            answer.t2i = result.t2i if "t2i" in request.directions else None
            answer.i2t = result.i2t if "i2t" in request.directions else None
            answer.scores = result.scores
            return
        scorer = getattr(runtime, "one_caption", None)
        if scorer is not None and scorer.applies(captions):
            scorer.expect_scan(math.prod(embeddings.shape), embeddings.dtype)
        best = StreamingTopK(len(captions), min(request.k, len(embeddings)))
        i2t: list[TopK] = []
        scores: list[np.ndarray] = []
        for first, block in embeddings.blocks(positional.BLOCK_BYTES):
            # a gallery of the block: the one-caption scorer caches its per-image constants under this name
            name = f"{embeddings.name}:{first}+{len(block)}"
            part = replace(self.gallery, embeddings=block, path=self.gallery.path / name)
            result = runtime.rank(part, captions, top_k=request.k, keep_scores=request.keep_scores)
            if "t2i" in request.directions and result.t2i is not None:
                best.update(slice(None), result.t2i.scores, result.t2i.indices + first)
            if "i2t" in request.directions and result.i2t is not None:
                i2t.append(result.i2t)
            if result.scores is not None:
                scores.append(result.scores)
        answer.t2i = best.result() if "t2i" in request.directions else None
        if i2t:
            answer.i2t = TopK(np.concatenate([p.indices for p in i2t]), np.concatenate([p.scores for p in i2t]))
        answer.scores = np.concatenate(scores) if request.keep_scores and scores else None

    def _search_regions(self, runtime: Any, captions: CaptionEmbeddings, request: SearchRequest,
                        answer: ShardAnswer, probes: ProbeCache | None = None) -> None:
        """Candidates from the region index (with the global vectors' best where the shard adds them), reranked
        exactly (:mod:`itmrt.scale.region_search`)."""
        assert self.regions is not None and request.shortlist is not None
        estimate = score_estimate(runtime)
        nprobe = request.nprobe if request.nprobe is not None else self.regions.nprobe
        embeddings = self.gallery.embeddings
        stages = answer.stages = {"candidates": 0.0, "rerank": 0.0}
        threads = int(runtime.options.threads or 0)
        for direction in request.directions:
            started = time.perf_counter()
            if direction == "t2i":
                keep = max(request.shortlist, self.regions.default_exact_pass(request.exact_pass))
                union = self.regions.default_union(request.union) if self.vectors is not None else 0
                candidates = self.regions.image_candidates(
                    captions, estimate, nprobe, keep + union, threads, embeddings,
                    self.regions.default_rescore(request.rescore, embeddings), probes=probes, refine=request.refine,
                    prefilter=self.regions.default_prefilter(request.prefilter))
                if union:
                    found = self.candidates(caption_global_vectors(captions), union)
                    candidates = union_candidates(candidates, keep, found)
            else:
                candidates = self.regions.caption_candidates(captions, estimate, nprobe, request.shortlist, threads)
            middle = time.perf_counter()
            result = rerank_candidates(runtime, embeddings, captions, candidates, request.k, direction, self.gallery)
            stages["candidates"] += middle - started
            stages["rerank"] += time.perf_counter() - middle
            setattr(answer, direction, result)
            answer.pairs += candidates.size


@contextlib.contextmanager
def forgetting_constants_on_change(runtime: Any) -> Iterator[None]:
    """Around a shard's reads: where a file changed under them (:class:`GalleryChanged`), the one-caption
    scorer's cached constants are dropped (they may hold what the file held during the change) and the error
    goes on."""
    try:
        yield
    except GalleryChanged:
        one_caption = getattr(runtime, "one_caption", None)
        if one_caption is not None:
            one_caption.forget_constants()
        raise


def check_captions(captions: object, runtime: Any, gallery: ShardedGallery) -> None:
    """Captions a sharded search takes: well formed (:func:`check_caption_embeddings`), of the bundle's kind (token
    embeddings or one vector per caption) and the gallery's embedding size, at least one: one line before any shard
    is read (a set made by hand failed inside ONNX Runtime, numpy, or the shortlist's assertions)."""
    checked = check_caption_embeddings(captions)
    if not len(checked):  # a region shortlist answered nothing without a word; the other paths refused it
        raise ItmrtError("no captions to search: encode at least one caption (shards.runtime.encode_captions)")
    token_level = bool(runtime.traits.token_level)
    if checked.token_level != token_level:
        want = "token embeddings with offsets" if token_level else "one vector per caption, no offsets"
        raise ItmrtError(f"the captions are not of the kind this bundle scores ({want}): encode them with the "
                         "gallery's runtime (shards.runtime.encode_captions)")
    width = (gallery.manifest.get("item_shape") or [None])[-1]
    if width is not None and checked.vectors.shape[1] != width:
        raise ItmrtError(f"caption embeddings of size {checked.vectors.shape[1]} against the gallery's {width}: "
                         "encode them with the gallery's runtime (shards.runtime.encode_captions)")


def check_region_options(request: SearchRequest, gallery: ShardedGallery) -> None:
    """A request's region-index options only on a gallery built with one: on another (a FAISS or numpy shortlist
    of global vectors) they were silently ignored, and ``itmrt audit`` reported them as used."""
    given = [flag for name, flag in REGION_OPTIONS.items() if getattr(request, name) is not None]
    kind = (gallery.manifest.get("shortlist_index") or {}).get("kind")
    if given and kind is not None and kind != "regions":
        raise ItmrtError(f"{', '.join(given)} {'searches' if len(given) == 1 else 'search'} a region index; the "
                         f"shards of {gallery.path} shortlist by global vectors (--shortlist-index {kind}): drop "
                         f"{'it' if len(given) == 1 else 'them'}, or index the images with --shortlist-index regions")


def require_shortlist(regions: dict[str, int], shortlist: int | None) -> None:
    """The command-line rule for the region-index flags (``regions``: those given): they choose how a shortlist
    search runs, so without ``--shortlist`` (every image scored) they would be silently ignored."""
    if regions and shortlist is None:
        raise ItmrtError("the region-index flags choose how --shortlist K searches; add --shortlist (without it "
                         "every image is scored)")


def read_embeddings_by_position(gallery: Gallery, record: ShardRecord, in_memory: bool,
                                positional: bool = True) -> tuple[Gallery, list[Path]]:
    """``gallery`` with its embeddings as the shard's searches read them, and the files those searches read
    (checked before and after each search): in memory, nothing; compact storage, its residuals when they are
    read by position; otherwise the dense embeddings read by position (``positional``) or through their memory map."""
    embeddings = gallery.embeddings
    if isinstance(embeddings, CompactRegions):  # centroids and codes in memory; residuals perhaps by position
        residuals = read_by_position(gallery)
        return gallery, [] if residuals is None else [member(gallery.path, residuals.name)]
    if in_memory:
        return gallery, []
    path = member(gallery.path, gallery.manifest.embeddings.file)
    if not positional:
        return gallery, [path]
    rows: Any = PositionalRows(path, f"shard {record.name}")
    if rows.shape != tuple(embeddings.shape) or rows.dtype != embeddings.dtype:
        rows.close()
        raise GalleryChanged(f"shard {record.name}: {path.name} changed while it was opened; nothing is read from "
                             "it - swap in a good version or restart the service")
    return replace(gallery, embeddings=rows), [path]


def read_by_position(gallery: Gallery) -> PositionalRows | None:
    """The file a shard reads by position: its dense embeddings, or its compact storage's packed residuals."""
    embeddings = gallery.embeddings
    rows = embeddings.residuals if isinstance(embeddings, CompactRegions) else embeddings
    return rows if isinstance(rows, PositionalRows) else None


def union_candidates(ranked: np.ndarray, keep: int, extra: np.ndarray) -> np.ndarray:
    """Per query, the first ``keep`` of ``ranked [Q, R]`` (distinct rows, best first), then the rows of ``extra``
    not among them, then more of ``ranked`` in its order: ``[Q, R]`` distinct rows each."""
    out = np.empty_like(ranked)
    width = ranked.shape[1]
    for query, row in enumerate(ranked):
        first = row[:keep]
        added = extra[query][~np.isin(extra[query], first)]
        chosen = np.concatenate([first, added])
        rest = row[keep:][~np.isin(row[keep:], chosen)]
        out[query] = np.concatenate([chosen, rest])[:width]
    return out


_ESTIMATES: dict[tuple[str, str], ScoreEstimate] = {}


def score_estimate(runtime: Any) -> ScoreEstimate:
    """The runtime's bundle's score estimate (read once per bundle and process)."""
    key = (str(runtime.bundle.path), runtime.bundle.manifest_sha256)
    if key not in _ESTIMATES:
        _ESTIMATES[key] = ScoreEstimate.from_bundle(runtime.bundle)
    return _ESTIMATES[key]


def merge_answers(answers: list[ShardAnswer], request: SearchRequest, captions: int) -> SearchResult:
    """The whole gallery's answer from every shard's (in any order): each caption's top-k over all shards,
    ties by the lower gallery row as one gallery orders them; per-image results and scores in row order."""
    answers = sorted(answers, key=lambda answer: answer.first)
    t2i = None
    if "t2i" in request.directions:
        parts = [answer.t2i for answer in answers if answer.t2i is not None]
        best = StreamingTopK(captions, min(request.k, sum(part.indices.shape[1] for part in parts)))
        for part in parts:
            best.update(slice(None), part.scores, part.indices)
        t2i = best.result()
    i2t = None
    if "i2t" in request.directions:
        parts = [answer.i2t for answer in answers if answer.i2t is not None]
        i2t = TopK(np.concatenate([p.indices for p in parts]), np.concatenate([p.scores for p in parts]))
    scores = None
    if request.keep_scores:
        scores = np.concatenate([answer.scores for answer in answers if answer.scores is not None])
    stages: dict[str, float] = {}
    for answer in answers:
        for stage, seconds in answer.stages.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return SearchResult(t2i, i2t, scores, sum(answer.pairs for answer in answers),
                        {answer.name: round(answer.seconds, 4) for answer in answers}, stages)
