"""Every shard of a sharded gallery searched in this process, one after another, with one runtime.

The reference for the distributed search (:mod:`itmrt.scale.ray_search` asks
each actor the same :meth:`~itmrt.scale.shard.OpenShard.search` and merges the
same way), and the way to use a sharded gallery on one machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from itmrt.limits import MAX_COPY_MB, check_real
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.scale.budget import merge_budget, pool_budget, score_picked, shard_estimates
from itmrt.scale.layout import ShardedGallery, shard_bytes
from itmrt.scale.region_search import ProbeCache, share_centroids
from itmrt.scale.shard import (
    OpenShard,
    SearchRequest,
    SearchResult,
    check_captions,
    check_region_options,
    check_request,
    merge_answers,
)


class LocalShards:
    """A sharded gallery's shards, opened in this process for ``runtime`` (a Runtime of the gallery's bundle).

    ``copy_mb``: when the shards' files take at most this many MB, they are copied into memory as they are
    verified (``in_memory`` is then True: nothing done to the files later reaches the answers); otherwise each
    search reads the embeddings it needs from their files by position (:mod:`itmrt.scale.positional`: a
    truncated file is an error, never SIGBUS), and each shard's file is checked before and after it is searched
    (:mod:`itmrt.scale.file_guard`). ``positional=False`` memory-maps them instead (for measurements).
    """

    def __init__(self, runtime: Any, gallery: ShardedGallery, verify: bool = True, gpu_index: bool = False,
                 copy_mb: float = 0.0, positional: bool = True) -> None:
        check_copy_mb(copy_mb)
        gallery.check_bundle(runtime.bundle)
        self.runtime, self.gallery = runtime, gallery
        self.bytes = shard_bytes(gallery)
        self.in_memory = copy_mb > 0 and self.bytes <= copy_mb * (1 << 20)
        self.shards = open_every_shard(gallery, verify, gpu_index, self.in_memory, positional)
        share_centroids([shard.regions for shard in self.shards if shard.regions is not None])

    def files_changed(self) -> str | None:
        """Why a file a shard reads while searching is no longer the one opened (the first found), or None."""
        return next((reason for reason in map(OpenShard.files_changed, self.shards) if reason is not None), None)

    def __len__(self) -> int:
        return len(self.gallery)

    def search(self, captions: CaptionEmbeddings, request: SearchRequest,
               progress: Callable[[int], None] | None = None) -> SearchResult:
        """Every shard's answer to ``request``, merged; ``progress(1)`` after each shard."""
        check_request(request)
        check_region_options(request, self.gallery)
        check_captions(captions, self.runtime, self.gallery)
        if request.budget is not None:
            return self._search_budget(captions, request)
        answers = []
        probes = ProbeCache()  # the shards of one build share their centroids: one probe per caption
        for shard in self.shards:
            answers.append(shard.search(self.runtime, captions, request, probes))
            if progress is not None:
                progress(1)
        return merge_answers(answers, request, len(captions))

    def _search_budget(self, captions: CaptionEmbeddings, request: SearchRequest) -> SearchResult:
        """Images for captions with a ``budget`` (:mod:`itmrt.scale.budget`): every shard's best by the region
        index's estimate, the gallery's ``budget`` best of those, each scored exactly in its shard, the best
        ``k``."""
        started = time.perf_counter()
        probes = ProbeCache()
        picks = pool_budget([shard_estimates(shard, self.runtime, captions, request, probes)
                             for shard in self.shards], request)
        middle = time.perf_counter()
        t2i, pairs = merge_budget([score_picked(shard, self.runtime, captions, picks) for shard in self.shards],
                                  request)
        done = time.perf_counter()
        return SearchResult(t2i, None, None, pairs, {}, {"candidates": middle - started, "rerank": done - middle})

    def warmup(self, shortlist: int | None = None) -> float:
        """Warm the runtime up, then search every shard once as a query will (full scoring or ``shortlist``):
        that pages their files in and sizes the scorer's buffers."""
        started = time.perf_counter()
        self.runtime.warmup()
        self.search(self.runtime.encode_captions(["warm up"]), SearchRequest(k=1, shortlist=shortlist))
        return time.perf_counter() - started

    def close(self) -> None:
        """Let go of the shards' files (the runtime is the caller's)."""
        for shard in self.shards:
            shard.close()


def check_copy_mb(copy_mb: object) -> float:
    """``copy_mb``: a finite number of MB from 0 (0: never copy)."""
    return check_real(copy_mb, 0.0, MAX_COPY_MB, "copy_mb (--copy-shards-mb)")  # type: ignore[arg-type]


def open_every_shard(gallery: ShardedGallery, verify: bool = True, gpu_index: bool = False, in_memory: bool = False,
                     positional: bool = True) -> list[OpenShard]:
    """Every shard of ``gallery`` opened (:meth:`OpenShard.open`), on one thread per core: verifying a shard is
    mostly hashing its files, which releases the interpreter lock (a 1M-image compact gallery: 9.4 GB, 6.9 of
    the 11.0 s its opening took on one core). The first failure in shard order is raised, after the shards that
    did open are closed."""
    workers = min(len(gallery.shards), os.cpu_count() or 1)
    if workers <= 1:
        return [OpenShard.open(gallery, record, verify, gpu_index, in_memory, positional) for record in gallery.shards]
    with ThreadPoolExecutor(workers, thread_name_prefix="itmrt-open") as pool:
        futures = [pool.submit(OpenShard.open, gallery, record, verify, gpu_index, in_memory, positional)
                   for record in gallery.shards]
        wait(futures)
    failure = next((error for error in (future.exception() for future in futures) if error is not None), None)
    if failure is not None:
        for future in futures:
            if future.exception() is None:
                future.result().close()
        raise failure
    return [future.result() for future in futures]
