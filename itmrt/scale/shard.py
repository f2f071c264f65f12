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

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.gallery import Gallery
from itmrt.runtime.shortlist import (
    caption_global_vectors,
    check_shortlist,
    rerank_image_to_text,
    rerank_text_to_image,
    top_candidates,
)
from itmrt.runtime.tiled import StreamingTopK, TopK
from itmrt.scale.file_guard import FileGuard, folder_states
from itmrt.scale.index import ShortlistIndex
from itmrt.scale.layout import (
    INDEX_FILE,
    ShardedGallery,
    ShardRecord,
    index_record,
    mapped_files,
    member,
    read_shard_gallery,
    shard_vectors,
)
from itmrt.scale.region_search import RegionIndex, ScoreEstimate, load_region_index, rerank_candidates

DIRECTIONS = ("t2i", "i2t")


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

    def check(self) -> SearchRequest:
        if self.k < 1:
            raise ItmrtError(f"--top-k must be at least 1, not {self.k}")
        if self.shortlist is not None:
            check_shortlist(self.shortlist, self.k)
            if self.keep_scores:
                raise ItmrtError("a shortlist scores only candidate pairs, not the full matrix; "
                                 "drop --shortlist or --scores-out")
        if self.nprobe is not None and self.nprobe < 1:
            raise ItmrtError(f"--nprobe must be at least 1, not {self.nprobe}")
        if self.exact_pass is not None and self.exact_pass < 0:
            raise ItmrtError(f"--exact-pass must be at least 0 (0: none), not {self.exact_pass}")
        if self.union is not None and self.union < 0:
            raise ItmrtError(f"--union must be at least 0 (0: none), not {self.union}")
        if not self.directions or any(d not in DIRECTIONS for d in self.directions):
            raise ItmrtError(f"directions must be among {', '.join(DIRECTIONS)}, not {self.directions!r}")
        return self


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
             gpu_index: bool = False, in_memory: bool = False) -> OpenShard:
        """``in_memory``: the embeddings, global vectors and region index copied into this process's memory (only
        compact storage's files stay mapped); otherwise they are memory-mapped and checked before each search."""
        before = folder_states(member(sharded.path, record.name))  # ahead of verification
        gallery = read_shard_gallery(sharded, record, verify, in_memory)
        vectors = shard_vectors(gallery, verify)
        if in_memory and vectors is not None:
            vectors = np.array(vectors)
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
            regions = load_region_index(gallery.path, region_entry, verify)
            if regions.images != len(gallery):
                raise ItmrtError(f"{gallery.path}: its region index holds {regions.images} images, not "
                                 f"{len(gallery)}; re-index it")
            if in_memory:
                regions.centroids, regions.rows_of, regions.codes = (
                    np.array(regions.centroids), np.array(regions.rows_of), np.array(regions.codes))
        guard = FileGuard(f"shard {record.name}", mapped_files(gallery, in_memory), before)
        return cls(record, gallery, vectors, index, regions, guard if len(guard) else None)

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

    def search(self, runtime: Any, captions: CaptionEmbeddings, request: SearchRequest) -> ShardAnswer:
        """This shard's answer to ``request`` (``runtime``: an :class:`itmrt.runtime.Runtime` of the bundle)."""
        started = time.perf_counter()
        if self.guard is not None:  # nothing is read from a file that changed since it was opened
            self.guard.check()
        answer = ShardAnswer(self.record.name, self.record.first, self.record.images)
        if request.shortlist is not None and captions.token_level and self.regions is not None:
            self._search_regions(runtime, captions, request, answer)
        elif request.shortlist is None or not captions.token_level:
            result = runtime.rank(self.gallery, captions, top_k=request.k, keep_scores=request.keep_scores)
            answer.t2i = result.t2i if "t2i" in request.directions else None
            answer.i2t = result.i2t if "i2t" in request.directions else None
            answer.scores, answer.pairs = result.scores, len(self.gallery) * len(captions)
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
        if answer.t2i is not None:
            answer.t2i.indices = np.where(answer.t2i.indices >= 0, answer.t2i.indices + self.record.first, -1)
        answer.seconds = time.perf_counter() - started
        return answer


    def _search_regions(self, runtime: Any, captions: CaptionEmbeddings, request: SearchRequest,
                        answer: ShardAnswer) -> None:
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
                candidates = self.regions.image_candidates(captions, estimate, nprobe, keep + union, threads)
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
