"""A sharded gallery searched by Ray actors: each holds a runtime and its shards; queries fan out, answers merge.

The driver (``itmrt infer`` / ``itmrt serve``) keeps a runtime of its own to
tokenise and encode captions once; the encoded captions go into Ray's object
store once and every actor searches its shards with them
(:meth:`itmrt.scale.shard.OpenShard.search`: full scoring, or the shard's
FAISS shortlist and a rerank) and returns its shards' top-k. The driver merges
them with :func:`itmrt.scale.shard.merge_answers`, exactly as one process
searching the shards in turn (:class:`itmrt.scale.local.LocalShards`) does. A
search with a budget (:mod:`itmrt.scale.budget`) takes two rounds: every
actor's estimates, the pool chosen by the driver, every actor's exact scores
of the pooled images it holds.

Each actor declares its resources (``cpus``, ``gpus``; Ray places it where
they are free, spread over the nodes) and runs its runtime on that many
threads. Every node must see the bundle and the gallery at the paths the
gallery records (a shared file system, or the same copy on each node) and
have the same itmrt installed.

An answer is never partial. An actor that dies (its process or node lost, or
``ray.kill``) is started again and asked again, ``retries`` times per search;
after that the search fails with an error naming the shards it held. A search
past ``timeout_s`` fails naming the shards that did not answer.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from itmrt.errors import GalleryChanged, ItmrtError, first_line
from itmrt.limits import MAX_COUNT, MAX_SECONDS, check_count, check_real
from itmrt.optional import require
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.scale.budget import Picked, merge_budget, pool_budget, score_picked, shard_estimates
from itmrt.scale.layout import ShardedGallery, ShardRecord
from itmrt.scale.region_search import ProbeCache, share_centroids
from itmrt.scale.shard import (
    OpenShard,
    SearchRequest,
    SearchResult,
    ShardAnswer,
    check_captions,
    check_region_options,
    check_request,
    merge_answers,
)

_LOST_ERRORS = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError")
"""Ray's exceptions for a worker (or what it held) that is gone, as against an error raised inside it."""
ADDRESS_HELP = ("local: start a Ray instance for this command on this machine; auto: the running cluster "
                "(RAY_ADDRESS or the latest `ray start`); or a cluster address (HOST:PORT, ray://HOST:PORT)")


def ray_module() -> Any:
    return require("ray", "distributed search on Ray")


@dataclass(frozen=True)
class RayOptions:
    """Where and how the shards' actors run."""

    address: str = "local"  # see ADDRESS_HELP
    workers: int | None = None  # actors; None: one per shard (more shards than actors: contiguous groups)
    cpus: float = 1.0  # CPUs each actor declares (its runtime's threads, rounded up)
    gpus: float = 0.0  # GPUs each actor declares (> 0: its runtime on CUDA, its flat/IVF index on the GPU)
    retries: int = 1  # restarts of a lost actor within one search
    timeout_s: float = 600.0  # for the actors to start, and for each search

    def check(self) -> RayOptions:
        """Each field's type and range (a string or NaN failed in a comparison, or reached Ray)."""
        if not isinstance(self.address, str) or not self.address.strip():
            raise ItmrtError(f"--ray needs an address: {ADDRESS_HELP}")
        for flag, value, low in (("--ray-workers", self.workers, 1), ("--ray-retries", self.retries, 0)):
            if value is not None:
                check_count(value, low, MAX_COUNT, flag)
        _check_number(self.cpus, MAX_COUNT, "--ray-cpus", low_open=True)
        _check_number(self.gpus, MAX_COUNT, "--ray-gpus")
        _check_number(self.timeout_s, MAX_SECONDS, "--ray-timeout-s", low_open=True)
        return self


def _check_number(value: Any, high: float, flag: str, low_open: bool = False) -> None:
    """A number from 0 to ``high``; NumPy's numbers taken as numbers."""
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value
    check_real(number, 0.0, high, flag, low_open)


class ShardWorker:
    """What each Ray actor runs: a runtime of the bundle and some shards of the gallery (see the module)."""

    def __init__(self, gallery: ShardedGallery, names: list[str], load_options: dict[str, Any],
                 verify: bool = True, gpu_index: bool = False) -> None:
        from itmrt.runtime.api import load

        self.runtime = load(gallery.bundle_path, **load_options)
        gallery.check_bundle(self.runtime.bundle)
        threads = int(load_options.get("threads") or 0)
        self.shards = [OpenShard.open(gallery, record, verify, gpu_index)
                       for record in gallery.shards if record.name in names]
        share_centroids([shard.regions for shard in self.shards if shard.regions is not None])
        if threads and any(shard.index is not None for shard in self.shards):
            require("faiss", "the FAISS shortlist index").omp_set_num_threads(threads)

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "shards": [shard.record.name for shard in self.shards],
                "scorer": self.runtime.scorer_kind}

    def warmup(self, shortlist: int | None = None) -> float:
        started = time.perf_counter()
        self.runtime.warmup()
        self.search(self.runtime.encode_captions(["warm up"]), SearchRequest(k=1, shortlist=shortlist))
        return time.perf_counter() - started

    def search(self, captions: CaptionEmbeddings, request: SearchRequest) -> list[ShardAnswer]:
        probes = ProbeCache()  # as LocalShards: one probe per caption for the shards sharing centroids
        return [shard.search(self.runtime, captions, request, probes) for shard in self.shards]

    def estimates(self, captions: CaptionEmbeddings, request: SearchRequest) -> list[tuple[np.ndarray, np.ndarray]]:
        """A search with a budget, step 1 in each of this actor's shards (:mod:`itmrt.scale.budget`)."""
        probes = ProbeCache()
        return [shard_estimates(shard, self.runtime, captions, request, probes) for shard in self.shards]

    def score_picked(self, captions: CaptionEmbeddings, picks: list[np.ndarray]) -> list[list[Picked]]:
        """A search with a budget, step 3 in each of this actor's shards."""
        return [score_picked(shard, self.runtime, captions, picks) for shard in self.shards]


class RayConnection:
    """This process's link to a Ray cluster: made here (and ended by :meth:`close`), or one that was already made."""

    def __init__(self, address: str) -> None:
        ray = self.ray = ray_module()
        self.owned = not ray.is_initialized()
        if not self.owned:
            return  # the embedding application (or a test) connected already: use its connection
        settings: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        try:
            if address == "local":
                ray.init(address="local", **settings)
            else:
                ray.init(address=address, **settings)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError...: one line for the user
            raise ItmrtError(f"cannot connect to Ray at {address!r} ({first_line(exc)}); start a cluster with "
                             "`ray start --head`, or pass --ray local") from None

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False


def worker_groups(shards: list[ShardRecord], workers: int | None) -> list[list[ShardRecord]]:
    """Shards in contiguous groups, one per actor (as even as the counts allow)."""
    count = max(1, min(workers or len(shards), len(shards)))
    size, extra = divmod(len(shards), count)
    groups, start = [], 0
    for number in range(count):
        end = start + size + (1 if number < extra else 0)
        groups.append(shards[start:end])
        start = end
    return groups


def describe_group(group: list[ShardRecord]) -> str:
    names = ", ".join(shard.name for shard in group)
    last = group[-1].first + group[-1].images - 1
    return f"shard{'s' if len(group) > 1 else ''} {names} (images {group[0].first}..{last})"


class RayShards:
    """A sharded gallery's shards on Ray actors (see the module docstring); ``runtime`` encodes the captions."""

    def __init__(self, runtime: Any, gallery: ShardedGallery, options: RayOptions,
                 load_options: dict[str, Any] | None = None, verify: bool = True) -> None:
        self.options = options.check()
        gallery.check_bundle(runtime.bundle)
        self.runtime, self.gallery = runtime, gallery
        self.groups = worker_groups(gallery.shards, options.workers)
        self.load_options = _worker_load_options(load_options or {}, options)
        self.verify = verify
        self.actors: list[Any] = []
        self.connection = RayConnection(options.address)
        self.ray = self.connection.ray
        try:
            self._check_resources()
            actor_class = self.ray.remote(ShardWorker)
            self._actor_class = actor_class
            self.actors = [self._start(group) for group in self.groups]
            self.workers = self._wait_started(list(range(len(self.groups))))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.gallery)

    # -- actors -----------------------------------------------------------------------

    def _check_resources(self) -> None:
        total = self.ray.cluster_resources()
        for resource, each in (("CPU", self.options.cpus), ("GPU", self.options.gpus)):
            needed, held = each * len(self.groups), float(total.get(resource, 0.0))
            if needed > held + 1e-9:
                flag = "--ray-cpus" if resource == "CPU" else "--ray-gpus"
                raise ItmrtError(
                    f"{len(self.groups)} Ray workers x {each:g} {resource} need {needed:g} {resource}s; the cluster "
                    f"has {held:g}: lower {flag} (e.g. {held / len(self.groups):.2g}) or --ray-workers"
                )

    def _start(self, group: list[ShardRecord]) -> Any:
        options = {"num_cpus": self.options.cpus, "num_gpus": self.options.gpus, "scheduling_strategy": "SPREAD",
                   "max_restarts": 0}
        return self._actor_class.options(**options).remote(
            self.gallery, [shard.name for shard in group], self.load_options, self.verify, self.options.gpus > 0)

    def _wait_started(self, numbers: list[int]) -> list[dict[str, Any]]:
        """Each actor's description once it has loaded its shards; one-line errors naming the shards otherwise."""
        described: dict[int, dict[str, Any]] = {}
        for number, ok, value in self._outcomes({self.actors[n].describe.remote(): n for n in numbers}, "start"):
            if not ok:
                raise ItmrtError(f"the Ray worker for {describe_group(self.groups[number])} did not start ({value})")
            described[number] = value
        return [described[n] for n in numbers]

    def _outcomes(self, calls: dict[Any, int], what: str) -> list[tuple[int, bool, Any]]:
        """``(worker number, True, value)`` for each call (ref -> worker number) that returned, ``(number, False,
        reason)`` for each whose worker died; an error raised inside a worker, or a call past the timeout, is a
        one-line :class:`ItmrtError` naming the worker's shards."""
        ray, errors = self.ray, self.ray.exceptions
        lost = tuple(getattr(errors, name) for name in _LOST_ERRORS if hasattr(errors, name))
        deadline = time.monotonic() + self.options.timeout_s
        outcomes, pending = [], dict(calls)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = "; ".join(describe_group(self.groups[n]) for n in sorted(pending.values()))
                raise ItmrtError(f"Ray workers did not {what} within {self.options.timeout_s:g}s: {late}; "
                                 "raise --ray-timeout-s or check the cluster (`ray status`)")
            number = pending.pop(ready[0])
            try:
                outcomes.append((number, True, ray.get(ready[0])))
            except lost as exc:
                outcomes.append((number, False, first_line(exc)))
            except errors.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, GalleryChanged):  # the service's "not ready", as for shards in this process
                    raise GalleryChanged(first_line(cause)) from None
                reason = first_line(cause) if isinstance(cause, ItmrtError) else first_line(exc)
                raise ItmrtError(f"{describe_group(self.groups[number])}: {reason}") from None
        return outcomes

    def _restart(self, number: int) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.ray.kill(self.actors[number])
        self.actors[number] = self._start(self.groups[number])
        self.workers[number] = self._wait_started([number])[0]

    # -- searching ----------------------------------------------------------------------

    def search(self, captions: CaptionEmbeddings, request: SearchRequest,
               progress: Callable[[int], None] | None = None) -> SearchResult:
        """Every shard's answer to ``request`` from its actor, merged; ``progress(n)`` as n more shards answer."""
        check_request(request)
        check_region_options(request, self.gallery)
        check_captions(captions, self.runtime, self.gallery)
        captions_ref = self.ray.put(captions)
        if request.budget is not None:
            return self._search_budget(captions_ref, request)
        answered = self._every_actor(lambda actor: actor.search.remote(captions_ref, request), progress)
        return merge_answers([answer for answers in answered for answer in answers], request, len(captions))

    def _search_budget(self, captions_ref: Any, request: SearchRequest) -> SearchResult:
        """:mod:`itmrt.scale.budget` with its shard steps on the actors: two rounds of calls, the pool chosen
        here between them."""
        started = time.perf_counter()
        found = self._every_actor(lambda actor: actor.estimates.remote(captions_ref, request))
        picks = pool_budget([part for parts in found for part in parts], request)
        middle = time.perf_counter()
        picks_ref = self.ray.put(picks)
        scored = self._every_actor(lambda actor: actor.score_picked.remote(captions_ref, picks_ref))
        t2i, pairs = merge_budget([part for parts in scored for part in parts], request)
        done = time.perf_counter()
        return SearchResult(t2i, None, None, pairs, {}, {"candidates": middle - started, "rerank": done - middle})

    def _every_actor(self, ask: Callable[[Any], Any], progress: Callable[[int], None] | None = None) -> list[Any]:
        """Each actor's value of ``ask(actor)`` (a remote call), in actor order; an actor that dies is started
        again and asked again, up to ``retries`` times, then the search fails naming its shards (never a partial
        answer). ``progress(n)`` as an actor's value of ``n`` shards arrives."""
        values: dict[int, Any] = {}
        restarts = dict.fromkeys(range(len(self.actors)), 0)
        todo = list(range(len(self.actors)))
        while todo:
            calls = {ask(self.actors[n]): n for n in todo}
            todo = []
            for number, ok, value in self._outcomes(calls, "answer"):
                if ok:
                    values[number] = value
                    if progress is not None:
                        progress(len(value))
                    continue
                if restarts[number] >= self.options.retries:
                    count = restarts[number]
                    again = f" after {count} restart{'s' * (count > 1)}" if count else ""
                    raise ItmrtError(f"{describe_group(self.groups[number])} lost: its Ray worker died{again} "
                                     f"({value}); no answer is given without every shard")
                restarts[number] += 1
                self._restart(number)
                todo.append(number)
        return [values[number] for number in range(len(self.actors))]

    def warmup(self, shortlist: int | None = None) -> float:
        """Warm the driver's runtime and every actor (in parallel); the seconds it took."""
        started = time.perf_counter()
        self.runtime.warmup()
        for number, ok, reason in self._outcomes(
                {actor.warmup.remote(shortlist): n for n, actor in enumerate(self.actors)}, "warm up"):
            if not ok:
                raise ItmrtError(f"the Ray worker for {describe_group(self.groups[number])} died warming up ({reason})")
        return time.perf_counter() - started

    def close(self) -> None:
        """End the actors, and the Ray connection when this object made it."""
        for actor in self.actors:
            with contextlib.suppress(Exception):  # the cluster may be gone already
                self.ray.kill(actor)
        self.actors = []
        self.connection.close()


def _worker_load_options(load_options: dict[str, Any], options: RayOptions) -> dict[str, Any]:
    """What each actor's runtime is loaded with: threads from its declared CPUs unless given; the CPU provider
    for an actor that declares no GPU."""
    settings = dict(load_options)
    if not settings.get("threads"):
        settings["threads"] = max(1, math.ceil(options.cpus))
    if options.gpus == 0 and not settings.get("providers"):
        settings["providers"] = ["cpu"]
    settings.pop("warn", None)
    return settings
