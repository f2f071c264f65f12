"""Fair shares of the one scoring worker: the queue's order, what a batch costs, and how long a request would wait.

:class:`FairQueue` orders work units (:class:`~itmrt.serve.batcher.Job`: a
whole small request, or one part of a large one) over callers by fair
queueing: a unit's start tag is the later of the queue's virtual time and its
caller's previous finish tag, its finish tag that plus its captions (its
cost), and units leave in finish-tag order. A caller with a backlog has ever
later tags, so a caller with nothing queued goes ahead of it after at most the
unit being scored; among callers arriving together the cheap unit goes first.
This is self-clocked fair queueing with equal weights (deficit round robin
gives the same shares; the tags also give a light caller the next turn instead
of the end of a round). As deficit round robin resets the deficit of a queue
that empties, a caller with nothing queued starts afresh: shares are between
callers that have work waiting, and a closed-loop client of one-caption
requests (idle between them) is never counted as heavy for its rate.

:class:`BatchCost` learns what a batch of ``n`` captions takes on this
machine and this gallery (a fixed part and a part per caption, as two running
averages), so :meth:`FairQueue.ahead` (captions that would be scored before a
new unit) becomes an expected wait in seconds: the batcher refuses a request
at once (429) when that wait passes its bound or its deadline, instead of
letting it wait.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any


class FairQueue:
    """Fair queueing of jobs (anything with ``captions`` and ``caller``) over callers, each costing its captions.

    ``len(queue)`` counts units; :attr:`requests` the requests that have not started (a request split in parts
    counts once, until its first part leaves); :meth:`queued_by` a caller's captions waiting.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, float, Any]] = []
        self._finish: dict[str, float] = {}
        self._queued: dict[str, int] = {}
        self._order = itertools.count()
        self.virtual_time = 0.0
        self.requests = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, job: Any, first: bool = True) -> None:
        """Queue ``job``; ``first``: it starts a request (what :attr:`requests` counts). A caller with nothing
        queued starts afresh at the virtual time: what it was served before is forgotten (as deficit round
        robin resets an emptied queue's deficit), so a closed-loop caller of small requests - idle between
        them - goes next, whatever its rate, and does not queue behind the backlogs of callers still waiting."""
        previous = self._finish.get(job.caller, 0.0) if self._queued.get(job.caller) else 0.0
        start = max(self.virtual_time, previous)
        self._finish[job.caller] = finish = start + len(job.captions)
        heapq.heappush(self._heap, (finish, next(self._order), start, (job, first)))
        self._queued[job.caller] = self._queued.get(job.caller, 0) + len(job.captions)
        self.requests += first
        if len(self._finish) > 4 * len(self._heap) + 1024:  # forget callers with nothing queued
            self._finish = {key: tag for key, tag in self._finish.items() if tag > self.virtual_time}

    def peek(self) -> Any:
        return self._heap[0][3][0]

    def pop(self) -> Any:
        _finish, _order, start, (job, first) = heapq.heappop(self._heap)
        self.virtual_time = max(self.virtual_time, start)
        left = self._queued[job.caller] - len(job.captions)
        if left:
            self._queued[job.caller] = left
        else:
            del self._queued[job.caller]
        self.requests -= first
        return job

    def queued_by(self, caller: str) -> int:
        """Captions ``caller`` has waiting."""
        return self._queued.get(caller, 0)

    def ahead(self, caller: str, captions: int) -> int:
        """Captions that would be scored before a unit of ``captions`` that ``caller`` queued now."""
        previous = self._finish.get(caller, 0.0) if self._queued.get(caller) else 0.0
        finish = max(self.virtual_time, previous) + captions
        return sum(len(entry[3][0].captions) for entry in self._heap if entry[0] <= finish)


class BatchCost:
    """Seconds a batch of ``n`` captions takes: ``fixed + n * per_caption``, each a running average.

    Batches of one caption measure ``fixed + per_caption``; larger ones the slope from there. Until a batch
    has been measured the estimate is 0 (nothing is refused for a wait nobody has measured)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.one: float | None = None  # a one-caption batch
        self.slope: float | None = None  # each caption more

    def observe(self, captions: int, seconds: float) -> None:
        if captions <= 1:
            self.one = seconds if self.one is None else self.one + self.weight * (seconds - self.one)
        elif self.one is not None:
            slope = max(0.0, (seconds - self.one) / (captions - 1))
            self.slope = slope if self.slope is None else self.slope + self.weight * (slope - self.slope)
        else:  # no one-caption batch yet: count the whole batch per caption (an overestimate of small batches)
            self.one = seconds / captions

    def seconds(self, captions: int, batches: int = 1) -> float:
        """Expected seconds for ``captions`` scored in ``batches`` batches."""
        if self.one is None or captions <= 0:
            return 0.0
        slope = self.slope if self.slope is not None else self.one
        return batches * self.one + max(0, captions - batches) * slope

    def queue_seconds(self, captions: int, batch_captions: int) -> float:
        """Expected seconds to score ``captions`` queued ahead, in batches of at most ``batch_captions``."""
        return self.seconds(captions, math.ceil(captions / max(1, batch_captions)))
