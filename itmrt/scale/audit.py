"""Recall a user can check on their own queries: a sample of captions searched exhaustively and through the index.

:func:`audit` encodes a sample of the user's captions, searches the sharded
gallery once with full scoring (the reference) and once through its index
(the region index, or the global shortlist), and reports recall@k (the share
of exhaustive scoring's top k the index finds), top-1 agreement and each
stage's time per caption. :func:`audit_markdown` renders it as a table
(``itmrt audit`` prints it and writes both).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.limits import MAX_COUNT, MAX_SEED, check_count, check_top_k
from itmrt.scale.index import python_number
from itmrt.scale.shard import SearchRequest

DEFAULT_SHORTLIST = 100
"""K per shard when neither the request nor the gallery's region index names one."""


def recorded_candidates(shards: Any) -> int:
    """The K the gallery's region index records (its first shard's), else :data:`DEFAULT_SHORTLIST`."""
    local = getattr(shards, "shards", None)
    if local:
        regions = getattr(local[0], "regions", None)
        if regions is not None:
            return int(regions.candidates)
    return DEFAULT_SHORTLIST


def sample_captions(captions: list[str], sample: int, seed: int = 0) -> list[int]:
    """``sample`` caption numbers drawn without replacement (all of them, in order, when there are no more).

    A float, a string or a bool ``sample``, a negative ``seed`` (given on the command line too) failed inside
    NumPy; a string of captions was sampled letter by letter."""
    check_count(sample, 1, MAX_COUNT, "--sample")
    check_count(seed, 0, MAX_SEED, "--seed")
    if not isinstance(captions, (list, tuple)) or not all(isinstance(caption, str) for caption in captions):
        raise ItmrtError(f"the captions to audit must be a list of strings (read_captions reads a file of them), "
                         f"not {type(captions).__name__}")
    if not captions:
        raise ItmrtError("no captions to audit")
    if sample >= len(captions):
        return list(range(len(captions)))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(len(captions), size=sample, replace=False))


def audit(shards: Any, captions: list[str], sample: int, k: int = 10, shortlist: int | None = None,
          nprobe: int | None = None, seed: int = 0, exact_pass: int | None = None,
          union: int | None = None, refine: int | None = None, prefilter: int | None = None,
          budget: int | None = None, rescore: int | None = None) -> dict[str, Any]:
    """Exhaustive scoring against the gallery's index on a sample of ``captions`` (see the module); ``refine``,
    ``prefilter``, ``budget``, ``rescore``: the region index's search options of :class:`SearchRequest`."""
    # A shortlist given smaller than k is refused as infer and serve refuse it (it was raised to k without a
    # word, so the report measured another K than asked); the default is raised to k.
    check_top_k(k)  # before it is compared with the recorded K
    shortlist = shortlist if shortlist is not None else max(recorded_candidates(shards), k)
    # NumPy integers are taken; the report holds Python's (json.dumps refuses an np.int64)
    k, shortlist, nprobe, exact_pass, union, refine, prefilter, budget, rescore = map(
        python_number, (k, shortlist, nprobe, exact_pass, union, refine, prefilter, budget, rescore))
    request = SearchRequest(k=k, shortlist=shortlist, nprobe=nprobe, exact_pass=exact_pass,
                            union=union, refine=refine, prefilter=prefilter, budget=budget,
                            rescore=rescore).check()
    chosen = sample_captions(captions, sample, seed)
    started = time.perf_counter()
    encoded = shards.runtime.encode_captions([captions[i] for i in chosen])
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    exact = shards.search(encoded, SearchRequest(k=k))
    exhaustive_s = time.perf_counter() - started
    started = time.perf_counter()
    indexed = shards.search(encoded, request)
    index_s = time.perf_counter() - started
    want, got = exact.t2i.indices, indexed.t2i.indices
    per_caption = [len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, int((a >= 0).sum())) for a, b in zip(want, got)]
    count = len(chosen)
    stages = {"encode_captions": encode_s, "exhaustive": exhaustive_s, "index": index_s,
              **{f"index_{name}": seconds for name, seconds in indexed.stage_seconds.items()}}
    return {
        "images": len(shards), "shards": len(shards.gallery.shards), "captions_sampled": count, "k": k,
        "shortlist_per_shard": request.shortlist, "nprobe": nprobe if nprobe is not None else "recorded",
        "exact_pass": exact_pass if exact_pass is not None else "recorded",
        "union": union if union is not None else "recorded",
        **{name: value if value is not None else "recorded"
           for name, value in (("refine", refine), ("prefilter", prefilter), ("budget", budget),
                               ("rescore", rescore))},
        "index": "regions" if indexed.stage_seconds else "global shortlist",
        f"recall_at_{k}": round(float(np.mean(per_caption)), 4),
        "top1_agreement": round(float(np.mean(want[:, 0] == got[:, 0])), 4),
        "worst_captions": [{"caption": captions[chosen[i]], "recall": round(per_caption[i], 3)}
                           for i in np.argsort(per_caption, kind="stable")[:5] if per_caption[i] < 1],
        "ms_per_caption": {name: round(1000 * seconds / count, 2) for name, seconds in stages.items()},
        "pairs_scored": {"exhaustive": exact.pairs, "index": indexed.pairs},
    }


def audit_markdown(report: dict[str, Any]) -> str:
    k = report["k"]
    lines = [
        f"# Index audit: {report['images']:,} images in {report['shards']} shards, "
        f"{report['captions_sampled']} captions",
        "",
        f"| index | K per shard | nprobe | exact pass | recall@{k} vs exhaustive | top-1 agreement |",
        "|---|---|---|---|---|---|",
        f"| {report['index']} | {report['shortlist_per_shard']} | {report['nprobe']} | {report['exact_pass']} | "
        f"{report[f'recall_at_{k}']} | {report['top1_agreement']} |",
        "",
        "| stage | ms per caption |",
        "|---|---|",
        *[f"| {name} | {ms} |" for name, ms in report["ms_per_caption"].items()],
    ]
    if report["worst_captions"]:
        lines += ["", "Captions whose top results the index missed most:", ""]
        lines += [f"- recall {row['recall']}: {row['caption']}" for row in report["worst_captions"]]
    return "\n".join(lines) + "\n"
