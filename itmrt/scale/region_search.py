"""Searching a shard's region index: probe centroids per caption token, estimate, keep K, rerank exactly.

For one caption with tokens ``u_1..u_m`` and a shard of N images:

1. ``T = U C^T`` (``[m, centroids]``); token ``i`` probes its ``nprobe``
   nearest centroids. The shards of one build store the same centroids, so a
   search computes this once per caption for all of them (:class:`ProbeCache`).
2. Each image's best-region similarity per word is estimated as the largest
   ``T[i, c]`` over the probed centroids its regions hold, and, for an image
   holding none of them, the ``nprobe``-th largest (an unprobed centroid is
   no nearer than that: WARP's imputation of a missing similarity). This is a
   scatter over the probed inverted lists. With a ``prefilter``, only that
   many of the images reached are estimated: those with the largest sum of
   ``T[i, c] - floor_i`` over the probed lists holding them (PLAID prunes its
   candidates by centroid scores the same way before their interaction).
3. That estimate ``s_i`` goes through the family's score in structure
   (:class:`ScoreEstimate`). NAAF: ``r_i = s_i - t`` against the frozen
   threshold ``t``; the negative branch takes ``r_i`` where the propagated
   decision ``q = W r`` (``W`` the caption's intra-word softmax) is negative;
   the aggregated-feature part is ``s_i`` where ``r_i > 0`` (the attended
   vector of a word whose regions pass the threshold is dominated by its best
   region at lambda 20), the relevance part ``s_i``; the mean over words.
   SCAN: each word's attended cosine is estimated by ``s_i`` and aggregated
   with the model's own ``agg_func`` (LogSumExp with its ``lambda_lse``, Mean,
   Max or Sum).
   3b. The ``refine`` best images by that estimate are estimated again with
   every region's own centroid (``s_i = max_j T[i, code_j]`` from the
   shard's codes: no imputation), as PLAID's centroid interaction does.
4. The ``K`` best estimates (ties by the lower row) are reranked with the
   bundle's scorer (:func:`rerank_candidates`).

A shard whose regions fit its centroids poorly stores every region's sign-bit
sketch (:mod:`itmrt.scale.sketches`); there steps 1-3b are one scan of the
sketches instead, giving every image's estimated best-region similarities,
and, where the shard has a fine sketch, the scan's ``refine`` best are
estimated again from it.

With ``nprobe`` = every centroid and ``K`` = every image, step 4 scores every
image exactly: the answer is exhaustive scoring's.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from itmrt.bundle.names import NAAF_INTRA_FACTOR, NAAF_THRESHOLD, SCAN_LAMBDA_LSE, Component, Precision
from itmrt.errors import ItmrtError
from itmrt.limits import usable_cores
from itmrt.optional import compiled_kernels
from itmrt.runtime.compact_regions import CompactRegions
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.fused import call_compiled
from itmrt.runtime.shortlist import rerank_image_to_text, rerank_text_to_image
from itmrt.runtime.tiled import StreamingTopK, TopK
from itmrt.scale.positional import read_rows
from itmrt.scale.regions import (
    DEFAULT_EXACT_PASS,
    DEFAULT_PREFILTER,
    DEFAULT_REFINE,
    DEFAULT_RESCORE,
    DEFAULT_UNION,
    MIN_POOLED_RESCORE_SHARE,
    MIN_REFINE_SHARE,
    MIN_RESCORE_SHARE,
    POOLED_RESCORE,
    POOR_FIT,
    POOR_FIT_EXACT_PASS,
    POOR_FIT_UNION,
    REFINE_BUDGET,
    SKETCH_RESCORE,
    fine_counts,
)
from itmrt.scale.residual_stage import residual_best_similarities
from itmrt.scale.sketches import (
    least_distances,
    least_distances_of_rows,
    pack_signs,
    scan_naaf_estimates,
    similarity_table,
    sketch_kernels,
    sketch_similarities,
)
from itmrt.scale.threads import in_parallel

ESTIMATE_BLOCK_BYTES = 64 << 20
"""Memory for the ``[captions, images]`` estimates of one block of captions (image-to-text candidates)."""
EXACT_BLOCK = 64
"""Images per block of the exact pass."""


@dataclass(frozen=True)
class ScoreEstimate:
    """The family's score structure applied to estimated best-region similarities (see the module)."""

    family: str
    threshold: float = 0.0
    intra_factor: float = 5.0
    agg_func: str = "Mean"
    lambda_lse: float = 6.0

    @classmethod
    def from_bundle(cls, bundle: Any) -> ScoreEstimate:
        """Read the constants the scorer graph records in its metadata (NAAF's frozen threshold, SCAN's
        aggregation)."""
        import onnx

        path = bundle.graph_file(Component.SCORER, Precision.FP32)
        try:
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            if meta.get("family") == "naaf":
                return cls("naaf", float(meta[NAAF_THRESHOLD]), float(meta[NAAF_INTRA_FACTOR]))
            if meta.get("family") == "scan":
                return cls("scan", agg_func=meta.get("agg_func", "LogSumExp"),
                           lambda_lse=float(meta.get(SCAN_LAMBDA_LSE, 6.0)))
        except (OSError, KeyError, ValueError) as exc:
            raise ItmrtError(f"cannot read the scorer's constants from {path} ({exc}); "
                             "export the bundle again") from None
        raise ItmrtError(f"the region index estimates cross-attention scores (NAAF, SCAN); {path} is a "
                         f"{meta.get('family')!r} scorer")

    def scores(self, best: np.ndarray, tokens: np.ndarray,
               product: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """``[N]`` estimated scores from ``best [m, N]`` (per word, per image) and the caption's tokens;
        ``product(a, b) = a b^T`` (default numpy's)."""
        if self.family == "naaf":
            shifted = best - np.float32(self.threshold)
            weights = self.intra_weights(tokens, product)
            decision = product(weights, np.ascontiguousarray(shifted.T)) if product is not None else weights @ shifted
            negative = np.where(decision < 0, shifted, np.float32(0))
            aggregated = np.where(shifted > 0, best, np.float32(0))
            return (negative + aggregated + best).mean(axis=0)
        return self._scan_scores(best)

    def intra_weights(self, tokens: np.ndarray,
                      product: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """``[m, m]`` NAAF's intra-word softmax of a caption's tokens (float32). ``product`` where given: numpy's
        OpenBLAS threads spin after a product and take the core the search's next kernel needs."""
        logits = self.intra_factor * (product(tokens, tokens) if product is not None else tokens @ tokens.T)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)

    def _scan_scores(self, best: np.ndarray) -> np.ndarray:
        """SCAN's aggregation of ``best [m, N]`` over the words."""
        if self.agg_func == "LogSumExp":
            lam = np.float32(self.lambda_lse)
            top = best.max(axis=0)
            return top + np.log(np.exp(lam * (best - top)).sum(axis=0)) / lam
        if self.agg_func == "Max":
            return best.max(axis=0)
        if self.agg_func == "Sum":
            return best.sum(axis=0)
        return best.mean(axis=0)


class RegionIndex:
    """A shard's loaded region index (centroids, codes, inverted lists) and its search defaults."""

    def __init__(self, centroids: np.ndarray, lists: np.ndarray, codes: np.ndarray, record: dict[str, Any]) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        count = len(self.centroids)
        self.offsets = lists[: count + 1].astype(np.int64)
        self.rows_of = lists[count + 1 :]
        self.codes = codes
        self.record = record
        self.images = int(record["rows"])
        params = record["params"]
        self.nprobe, self.candidates = int(params["nprobe"]), int(params["candidates"])
        self.refine = int(params.get("refine", DEFAULT_REFINE))
        self.exact_pass = int(params.get("exact_pass", DEFAULT_EXACT_PASS))
        self.union = int(params.get("union", DEFAULT_UNION))
        self.prefilter = int(params.get("prefilter", DEFAULT_PREFILTER))
        self.fit = float(record.get("fit", 1.0))
        self.poor_fit_below = float(params.get("poor_fit", POOR_FIT))
        self._centroids_key: str | None = None
        self.sketch: RegionSketch | None = None  # set where the shard stores sketches (load_region_index)
        self.shards = 1  # the gallery's shards (set when it is opened): they share the residual stage's default

    @property
    def centroids_key(self) -> str:
        """What identifies the centroids' content (the sha256 of their file as verified when the shard opened,
        else of the array): shards with the same key share one probe per caption (:class:`ProbeCache`)."""
        if self._centroids_key is None:
            self._centroids_key = hashlib.sha256(np.ascontiguousarray(self.centroids).tobytes()).hexdigest()
        return self._centroids_key

    @centroids_key.setter
    def centroids_key(self, key: str) -> None:
        self._centroids_key = key

    @property
    def poor_fit(self) -> bool:
        """Whether the shard's regions fit its centroids too loosely for the centroid estimate alone (its
        recorded mean region-to-centroid cosine below its recorded ``poor_fit``, else :data:`POOR_FIT`)."""
        return self.fit < self.poor_fit_below

    def default_exact_pass(self, asked: int | None) -> int:
        """Images a search scores exactly in this shard (at least K): ``asked``, else the recorded value, else
        :data:`POOR_FIT_EXACT_PASS` on a poorly fitting shard without sketches."""
        if asked is not None:
            return asked
        return self.exact_pass or (POOR_FIT_EXACT_PASS if self.poor_fit and self.sketch is None else 0)

    def default_union(self, asked: int | None) -> int:
        """Global-vector candidates a search adds in this shard (where it stores global vectors): ``asked``, else
        the recorded value, else :data:`POOR_FIT_UNION` on a poorly fitting shard without sketches."""
        if asked is not None:
            return asked
        return self.union or (POOR_FIT_UNION if self.poor_fit and self.sketch is None else 0)

    def default_rescore(self, asked: int | None, stored: Any, pooled: bool = False) -> int:
        """Images a search re-estimates in this shard from its stored regions (step 3c; 0: none): ``asked``, else
        on a shard with sketches :data:`SKETCH_RESCORE` (with a fine sketch :func:`fine_counts`, by the shard's
        size; from exact storage's float embeddings as well),
        else, where its regions are compact storage (the residual stage reads a few bytes a region), this shard's
        share of :data:`DEFAULT_RESCORE` over the gallery's :attr:`shards`, at least :data:`MIN_RESCORE_SHARE`
        (``pooled``, a search with a budget: of :data:`POOLED_RESCORE`, at least :data:`MIN_POOLED_RESCORE_SHARE`);
        else 0 (exact storage would read its float embeddings)."""
        if asked is not None:
            return asked
        if self.sketch is not None:
            return SKETCH_RESCORE if self.sketch.fine is None else fine_counts(self.images)[1]
        per_query, least = (POOLED_RESCORE, MIN_POOLED_RESCORE_SHARE) if pooled else \
            (DEFAULT_RESCORE, MIN_RESCORE_SHARE)
        return self._share(per_query, least) if isinstance(stored, CompactRegions) else 0

    def default_refine(self, asked: int | None) -> int:
        """Images a search refines in this shard from every region's centroid (step 3b), or on a shard with
        sketches from its fine sketch: ``asked``, else the recorded refine, lowered to this shard's share of
        :data:`REFINE_BUDGET` (at least :data:`MIN_REFINE_SHARE`) in a gallery of many shards; with sketches
        :func:`fine_counts`, by the shard's size."""
        if asked is not None:
            return asked
        if self.sketch is not None:
            return fine_counts(self.images)[0]
        return min(self.refine, self._share(REFINE_BUDGET, MIN_REFINE_SHARE))

    def _share(self, per_query: int, least: int) -> int:
        """This shard's even share of ``per_query`` images over the gallery's :attr:`shards`, at least ``least``."""
        return max(least, per_query // max(1, self.shards))

    def default_prefilter(self, asked: int | None) -> int:
        """Probed images a search estimates in this shard (0: every one reached): ``asked``, else the recorded
        value, else :data:`DEFAULT_PREFILTER`."""
        return asked if asked is not None else self.prefilter

    def probe(self, sims: np.ndarray, nprobe: int, prefilter: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps 1-2 of the module for the images the probes reach: ``(hits [U], best [m, U], floor [m])`` -
        the sorted rows of the images holding a probed centroid of some word, each word's estimated best-region
        similarity in them, and each word's imputed similarity (its ``nprobe``-th) for every other image."""
        return self.probe_selected(*select_probes(sims, nprobe), prefilter)

    def probe_selected(self, nearest: np.ndarray, values: np.ndarray, floor: np.ndarray,
                       prefilter: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`probe` from each word's probed centroids ``nearest [m, P]``, their similarities ``values`` and
        the imputed ``floor [m]`` (:func:`select_probes`: shared by the shards holding the same centroids).

        One pass over the probed inverted lists of every word at once (no loop per word or centroid); a row
        in several probed lists of a word keeps the largest of their similarities. ``prefilter``: where more
        images than that are reached, only the ``prefilter`` with the largest sum of ``value - floor`` over
        their probed lists (PLAID's pruning of candidates by centroid scores before their interaction) are
        kept."""
        words, probe = nearest.shape
        starts = self.offsets[nearest].ravel()
        lengths = self.offsets[nearest + 1].ravel() - starts
        ends = np.cumsum(lengths)
        rows = self.rows_of[np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]))]
        word = np.repeat(np.repeat(np.arange(words, dtype=np.int64), probe), lengths)
        found = np.repeat(values.ravel(), lengths)
        if prefilter:
            total = np.bincount(rows, weights=found - floor[word], minlength=self.images)
            reached = np.flatnonzero(total)
            if len(reached) > prefilter:  # ties by the lower row, as every other stage breaks them
                gained = total[reached]
                cut = -np.partition(-gained, prefilter - 1)[prefilter - 1]
                above, at = reached[gained > cut], reached[gained == cut]
                hits = np.sort(np.concatenate([above, at[: prefilter - len(above)]]))
                position = np.full(self.images, -1, dtype=np.int64)
                position[hits] = np.arange(len(hits))
                where = position[rows]
                kept = where >= 0
                return hits, self._scatter(len(hits), word[kept], where[kept], found[kept], floor), floor
        marked = np.zeros(self.images, dtype=bool)
        marked[rows] = True
        hits = np.flatnonzero(marked)
        position = np.empty(self.images, dtype=np.int64)
        position[hits] = np.arange(len(hits))
        return hits, self._scatter(len(hits), word, position[rows], found, floor), floor

    @staticmethod
    def _scatter(count: int, word: np.ndarray, where: np.ndarray, found: np.ndarray, floor: np.ndarray) -> np.ndarray:
        """``[m, count]``: each word's largest ``found`` similarity per image position ``where``, else its
        ``floor``."""
        best = np.repeat(floor[:, None], count, axis=1)
        np.maximum.at(best.reshape(-1), word * count + where, found)
        return best

    def best_similarities(self, tokens: np.ndarray, nprobe: int, sims: np.ndarray | None = None) -> np.ndarray:
        """``[m, N]`` estimated best-region similarity of each token in each image (steps 1-2 of the module)."""
        sims = tokens @ self.centroids.T if sims is None else sims  # [m, C]
        hits, found, floor = self.probe(sims, nprobe)
        best = np.repeat(floor[:, None], self.images, axis=1)
        best[:, hits] = found
        return best

    def probe_scores(self, tokens: np.ndarray, sims: np.ndarray, estimate: ScoreEstimate, nprobe: int,
                     product: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """``[N]`` probe-estimated scores of one caption: the estimate of the images the probes reach, and one
        shared estimate (every word at its imputed similarity) for the others."""
        hits, best, floor = self.probe(sims, nprobe)
        scores = np.full(self.images, estimate.scores(floor[:, None], tokens, product)[0], dtype=np.float32)
        if len(hits):
            scores[hits] = estimate.scores(best, tokens, product)
        return scores

    def estimates(self, captions: CaptionEmbeddings, estimate: ScoreEstimate, nprobe: int,
                  which: np.ndarray | None = None, threads: int = 0) -> np.ndarray:
        """``[Q, N]`` probe-estimated scores of captions ``which`` (default: all) against every image."""
        which = np.arange(len(captions)) if which is None else which
        out = np.empty((len(which), self.images), dtype=np.float32)
        product = token_gemm(threads)
        for row, caption in enumerate(which):
            tokens = caption_tokens(captions, caption)
            out[row] = self.probe_scores(tokens, product(self.centroids, tokens).T, estimate, nprobe, product)
        return out

    def image_candidates(self, captions: CaptionEmbeddings, estimate: ScoreEstimate, nprobe: int,
                         keep: int, threads: int = 0, stored: Any = None, rescore: int = 0,
                         probes: ProbeCache | None = None, refine: int | None = None,
                         prefilter: int = 0, estimates: np.ndarray | None = None) -> np.ndarray:
        """``[Q, K]`` each caption's ``keep`` best images by estimate (best first, ties by the lower row): the
        probe estimate over every image (over the ``prefilter`` best by probed centroid scores where given),
        then the ``refine`` (default: the recorded) best of those estimated again from every region's centroid
        (step 3b), then, with the shard's ``stored`` region embeddings and ``rescore`` > ``keep``, the
        ``rescore`` best of those estimated again from their stored regions (step 3c: compact storage's
        residuals, :func:`stored_best_similarities`). A shard with sketches (:class:`RegionSketch`) starts from
        its sketch estimate of every image instead of the probe, and refines the best of it from its fine sketch
        where it has one (the re-estimate then takes the best of that). ``probes``: the captions' probes
        shared with other shards of the same centroids (computed here otherwise). ``estimates [Q, K]``: filled
        with the kept images' estimates."""
        assert captions.offsets is not None
        k = min(keep, self.images)
        refine = self.default_refine(refine)
        out = np.empty((len(captions), k), dtype=np.int64)
        product = token_gemm(threads)
        probes = probes if probes is not None else ProbeCache(shared=False)
        # with ``estimates`` (a budget) the kept images' estimates are compared with other shards': they are
        # the residual stage's even where every image it re-estimates is kept
        rescoring = stored is not None and (k < rescore or (estimates is not None and 0 < k == rescore))
        workers = threads or usable_cores()  # the sketch scan's and the exact re-estimate's threads
        for caption in range(len(captions)):
            tokens = caption_tokens(captions, caption)
            if self.sketch is not None:  # a scan of every region's sketch instead of the probed lists
                rows, scores = self.sketch.estimated(tokens, estimate, product, workers,
                                                     refine if not rescoring or rescore < refine else 0, k)
            else:
                probe = probes.get(self, captions, caption, nprobe, product)
                rows, scores = self._probed_estimate(probe, estimate, k, refine, prefilter, product)
            if rescoring:
                rows = np.sort(_top_rows(scores, rows, rescore))  # sorted: a forward read of the file
                if isinstance(stored, CompactRegions):  # the residual stage reads the probe's centroid sims
                    probe = probes.get(self, captions, caption, nprobe, product)  # computed once a caption
                    best = stored_best_similarities(probe, stored, rows, product, threads)
                else:
                    best = exact_best_similarities(tokens, stored, rows, product, threads=workers)
                scores = estimate.scores(best, tokens, product)
            if estimates is None:
                out[caption] = _top_rows(scores, rows, k)
                continue
            kept = StreamingTopK(1, min(k, len(rows)))
            kept.update(slice(None), scores[None, :], rows)
            out[caption], estimates[caption] = kept.indices[0], kept.scores[0]
        return out

    def _probed_estimate(self, probe: CaptionProbe, estimate: ScoreEstimate, k: int, refine: int, prefilter: int,
                         product: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)``: the probe estimate of one caption (over the ``prefilter`` best images by probed
        centroid scores where given), then the ``refine`` best of it estimated again from every region's centroid
        (steps 2-3b of the module)."""
        hits, best, floor = self.probe_selected(*probe.probed(), prefilter)
        if prefilter and len(hits) >= max(k, min(refine, self.images)):  # the best are among the kept
            rows, scores = hits, estimate.scores(best, probe.tokens, product)
        else:
            rows = np.arange(self.images)
            scores = np.full(self.images, estimate.scores(floor[:, None], probe.tokens, product)[0],
                             dtype=np.float32)
            if len(hits):
                scores[hits] = estimate.scores(best, probe.tokens, product)
        if k < refine < len(rows):
            rows = _top_rows(scores, rows, refine)
        if k < refine < self.images:
            regions = probe.centroid_sims[np.asarray(self.codes[rows], dtype=np.intp)]  # [R, regions, m]
            scores = estimate.scores(np.ascontiguousarray(regions.max(axis=1).T), probe.tokens, product)
        return rows, scores

    def caption_candidates(self, captions: CaptionEmbeddings, estimate: ScoreEstimate, nprobe: int,
                           keep: int, threads: int = 0) -> np.ndarray:
        """``[N, K]`` each image's ``keep`` best captions by estimate (captions in blocks: bounded memory)."""
        k = min(keep, len(captions))
        best = StreamingTopK(self.images, k)
        block = max(1, ESTIMATE_BLOCK_BYTES // max(1, 4 * self.images))
        for first in range(0, len(captions), block):
            which = np.arange(first, min(first + block, len(captions)))
            best.update(slice(None), self.estimates(captions, estimate, nprobe, which, threads).T, which)
        return best.indices


@dataclass(frozen=True)
class RegionSketch:
    """A shard's sign-bit sketches ``[bits / 64, regions, images]`` and their projection ``[d, bits]``
    (:mod:`itmrt.scale.sketches`)."""

    projection: np.ndarray
    sketches: np.ndarray
    fine: np.ndarray | None = None  # [images, regions, fine / 64]: the projection's later columns' bits
    rows: np.ndarray = field(init=False, repr=False)  # the projection's columns as rows (token_gemm's layout)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", np.ascontiguousarray(self.projection.T))

    @property
    def bits(self) -> int:
        """Bits of a region's scanned sketch (the projection's first columns)."""
        return 64 * int(self.sketches.shape[0])

    @property
    def fine_bits(self) -> int:
        """Bits of a region's fine sketch (0: none)."""
        return 64 * int(self.fine.shape[2]) if self.fine is not None else 0

    def scores(self, tokens: np.ndarray, estimate: ScoreEstimate,
               product: Callable[[np.ndarray, np.ndarray], np.ndarray], threads: int = 1) -> np.ndarray:
        """``[N]`` every image's score estimate from its sketches (the scan's)."""
        return self.estimated(tokens, estimate, product, threads)[1]

    def estimated(self, tokens: np.ndarray, estimate: ScoreEstimate,
                  product: Callable[[np.ndarray, np.ndarray], np.ndarray], threads: int = 1, refine: int = 0,
                  keep: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)``: every image's scan estimate, or, with a fine sketch and ``keep`` < ``refine`` < N,
        the ``refine`` best of it (sorted rows) estimated again from the fine sketch."""
        signs = pack_signs(product(tokens, self.rows))
        # NAAF's intra-caption weights, once for the scan's estimate and the fine sketch's
        weights = np.ascontiguousarray(estimate.intra_weights(tokens, product)) if estimate.family == "naaf" else None
        scores = self._scan_estimates(signs[:, : self.bits // 64], tokens, estimate, product, threads, weights)
        rows = np.arange(len(scores))
        if self.fine is None or not keep < refine < len(rows):
            return rows, scores
        rows = np.sort(_top_rows(scores, rows, refine))  # sorted: a forward read of the fine sketch
        distances = least_distances_of_rows(self.fine, rows, signs[:, self.bits // 64 :], threads)
        return rows, self.estimates(distances, self.fine_bits, tokens, estimate, product, threads, weights)

    def _scan_estimates(self, signs: np.ndarray, tokens: np.ndarray, estimate: ScoreEstimate,
                        product: Callable[[np.ndarray, np.ndarray], np.ndarray], threads: int,
                        weights: np.ndarray | None) -> np.ndarray:
        """``[N]`` every image's estimate from the scan of its sketches: for NAAF (``weights``: its intra-caption
        weights) at 256 bits in one compiled pass with the scan (:func:`itmrt.scale.sketches.scan_naaf_estimates`:
        the least distances never leave the cache; 2 threads waited on memory anyway), else the scan's
        distances, then :meth:`estimates`."""
        if weights is not None:
            fused = scan_naaf_estimates(self.sketches, signs, similarity_table(self.bits), weights,
                                        estimate.threshold, threads)
            if fused is not None:
                return fused
        distances = least_distances(self.sketches, signs, threads)
        return self.estimates(distances, self.bits, tokens, estimate, product, threads, weights)

    @staticmethod
    def estimates(distances: np.ndarray, bits: int, tokens: np.ndarray, estimate: ScoreEstimate,
                  product: Callable[[np.ndarray, np.ndarray], np.ndarray], threads: int = 1,
                  weights: np.ndarray | None = None) -> np.ndarray:
        """``[n]`` score estimates from least distances ``[m, n]`` of ``bits``-bit sketches: for NAAF in one
        compiled pass (:func:`itmrt.scale.sketch_kernels.naaf_estimates`; numpy's passes over ``[m, N]`` took 4.3 ms
        of a 50,000-image shard), otherwise the family's estimate of the similarities they stand for.
        ``weights``: NAAF's intra-caption weights where the caller has them (computed here otherwise)."""
        kernels = sketch_kernels()
        if estimate.family != "naaf" or kernels is None:
            return estimate.scores(sketch_similarities(distances, bits), tokens, product)
        if weights is None:
            weights = np.ascontiguousarray(estimate.intra_weights(tokens, product))
        table, images = similarity_table(bits), distances.shape[1]
        out = np.empty(images, dtype=np.float32)

        def run(first: int, last: int) -> None:
            call_compiled(kernels.naaf_estimates, distances, table, weights, np.float32(estimate.threshold),
                          first, last - first, out)

        in_parallel(run, images, max(1, min(int(threads or 1), images // kernels.BLOCK)))
        return out

    def best_similarities(self, tokens: np.ndarray, threads: int = 1,
                          product: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """``[m, N]`` each word's estimated best-region similarity in every image: the cosine its least Hamming
        distance to the image's regions stands for."""
        return sketch_similarities(self.distances(tokens, threads, product), self.bits)

    def distances(self, tokens: np.ndarray, threads: int = 1,
                  product: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """``[m, N]`` uint16: each word's least Hamming distance to every image's regions (the scan). The words'
        product with the projection runs on ONNX Runtime's GEMM (``product``, default one thread): numpy's threads
        spin after it on the core the scan's second thread needs (the scan of 50,000 images took 18.5 ms on two
        threads after a numpy product, 8.6 ms without)."""
        product = product if product is not None else token_gemm(1)
        signs = pack_signs(product(tokens, self.rows[: self.bits]))
        return least_distances(self.sketches, signs, threads)


@dataclass
class CaptionProbe:
    """One caption against one set of centroids: its tokens, each centroid's similarities to them (``C U^T``)
    and its ``nprobe`` probed centroids, chosen when first asked for (:meth:`probed`): a sketched shard never
    asks (1.6 ms a caption at 8,192 centroids)."""

    tokens: np.ndarray  # [m, d] float32
    centroid_sims: np.ndarray  # [C, m]: one short row per centroid (the refine's and residual stage's gathers)
    nprobe: int
    _probed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def sims(self) -> np.ndarray:
        """``[m, C]``: ``U C^T``, the words' similarities to the centroids (a view of :attr:`centroid_sims`)."""
        return self.centroid_sims.T

    def probed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`select_probes` of :attr:`sims`: ``(nearest [m, P], values [m, P], floor [m])``."""
        if self._probed is None:
            self._probed = select_probes(self.sims, self.nprobe)
        return self._probed


class ProbeCache:
    """The probes of one search's captions, per set of centroids: the shards of one build share their centroids
    (each stores a copy; ``params.centroids_from``), so the token x centroid product and the choice of probed
    centroids (5.7 ms per caption at 8192 x 1024 centroids) are computed once per caption, not once per shard.
    Shards share a probe only when their centroids' content is the same (:attr:`RegionIndex.centroids_key`)."""

    def __init__(self, shared: bool = True) -> None:
        self.shared = shared  # False: one shard's probes only (no hash of its centroids needed)
        self._captions: CaptionEmbeddings | None = None
        self._found: dict[tuple[str, int, int], CaptionProbe] = {}

    def get(self, index: RegionIndex, captions: CaptionEmbeddings, caption: int, nprobe: int,
            product: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> CaptionProbe:
        assert captions.offsets is not None
        if captions is not self._captions:
            self._captions, self._found = captions, {}
        key = (index.centroids_key if self.shared else str(id(index)), nprobe, caption)
        found = self._found.get(key)
        if found is None:
            tokens = caption_tokens(captions, caption)
            # C U^T, not U C^T: the small operand is the one the GEMM packs (8,192 x 1024 centroids: 4.3 against
            # 7.4 ms on one thread, session 15), and [C, m] is the residual stage's layout
            found = self._found[key] = CaptionProbe(tokens, product(index.centroids, tokens), nprobe)
        return found


def caption_tokens(captions: CaptionEmbeddings, caption: int) -> np.ndarray:
    """``[m, d]`` float32: the token embeddings of caption ``caption``."""
    assert captions.offsets is not None
    start, length = int(captions.offsets[caption]), int(captions.lengths[caption])
    return np.asarray(captions.vectors[start : start + length], dtype=np.float32)


def exact_best_similarities(tokens: np.ndarray, embeddings: Any, rows: np.ndarray,
                            product: Callable[[np.ndarray, np.ndarray], np.ndarray],
                            block: int = EXACT_BLOCK, threads: int = 1) -> np.ndarray:
    """``[m, len(rows)]`` each token's largest similarity over each image's regions, from the stored embeddings
    (blocks of images: the float32 copy of a block stays in cache). float16 storage is multiplied as stored by
    the region kernel (:func:`itmrt.runtime.region_kernels.similarities`, where numba and the CPU's half-float
    conversion are there), on ``threads`` threads: numpy's cast to float32 took most of this stage (1,000 images a
    shard: about 100 ms a query, docs/region-index.md)."""
    out = np.empty((len(tokens), len(rows)), dtype=np.float32)
    kernels = _half_kernels() if getattr(embeddings, "dtype", None) == np.float16 else None
    if kernels is not None:
        _half_best_similarities(kernels, tokens, embeddings, rows, out, block, threads)
        return out
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        vectors = np.asarray(embeddings[part], dtype=np.float32)
        sims = product(tokens, vectors.reshape(-1, vectors.shape[-1])).reshape(len(tokens), len(part), -1)
        out[:, start : start + len(part)] = sims.max(axis=2)
    return out


@functools.cache
def _half_kernels() -> Any:
    """:mod:`itmrt.runtime.region_kernels` where numba is installed and the CPU converts half floats, else None."""
    module = compiled_kernels("itmrt.runtime.region_kernels")
    return module if module is not None and module.available() else None


def _half_best_similarities(kernels: Any, tokens: np.ndarray, embeddings: Any, rows: np.ndarray, out: np.ndarray,
                            block: int, threads: int) -> None:
    """:func:`exact_best_similarities` from float16 storage, the rows split evenly over ``threads`` threads."""
    words = kernels.padded_words(tokens)
    depth = tokens.shape[1]

    def run(first: int, last: int) -> None:
        buffer = np.empty((block, *embeddings.shape[1:]), dtype=np.float16)  # one per thread, reused per block
        sims = np.empty((block * embeddings.shape[1], len(tokens)), dtype=np.float32)
        for start in range(first, last, block):
            part = rows[start : min(start + block, last)]
            stored = read_rows(embeddings, part, buffer)
            flat = stored.view(np.uint16).reshape(-1, depth)
            call_compiled(kernels.similarities, flat, words, sims[: len(flat)])
            found = sims[: len(flat)].reshape(len(part), -1, len(tokens)).max(axis=1)
            out[:, start : start + len(part)] = found.T

    in_parallel(run, len(rows), max(1, min(int(threads or 1), -(-len(rows) // block))))


def stored_best_similarities(probe: CaptionProbe, stored: Any, rows: np.ndarray,
                             product: Callable[[np.ndarray, np.ndarray], np.ndarray], threads: int = 0) -> np.ndarray:
    """``[m, len(rows)]`` each word's largest similarity over each image's stored regions (step 3c): for compact
    storage whose dimensions all have 1, 2 or 4 bits, from the residual levels without decoding the vectors
    (:func:`residual_best_similarities`); otherwise from the stored (or decoded) embeddings."""
    if isinstance(stored, CompactRegions) and stored.codec.byte_levels() is not None:
        return residual_best_similarities(probe, stored, rows, product, threads)
    return exact_best_similarities(probe.tokens, stored, rows, product, threads=threads or usable_cores())


def select_probes(sims: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(nearest [m, P], values [m, P], floor [m])``: each word's ``nprobe`` nearest centroids by ``sims [m, C]``,
    their similarities, and the smallest of those (the similarity imputed to an image holding none of them)."""
    words, count = sims.shape
    probe = max(1, min(nprobe, count))
    nearest = np.argpartition(-sims, probe - 1, axis=1)[:, :probe] if probe < count else \
        np.broadcast_to(np.arange(count), (words, count))
    values = np.take_along_axis(sims, nearest, axis=1)
    return nearest, values, values.min(axis=1)


@functools.lru_cache(maxsize=8)
def token_gemm(threads: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``a [m, d] @ b [C, d]^T`` on ONNX Runtime's MLAS with ``threads`` threads (0: its default). numpy's
    OpenBLAS threads a product this small over every core and, on a busy machine, waits far longer for them
    than the product takes (measured 60 ms against 2 ms on one thread)."""
    from itmrt.runtime.fused import _gemm_session

    session = _gemm_session(threads)

    def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {"a": np.ascontiguousarray(a, dtype=np.float32),
                                             "b": np.ascontiguousarray(b, dtype=np.float32)})[0])

    return product


def _top_rows(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` of ``rows`` with the highest ``scores`` (best first, ties by the lower row): what
    :class:`StreamingTopK` keeps, without its merge with held entries (a search calls this three times a shard:
    0.23 ms a call through it, 60 calls a query at 1M images)."""
    k = min(k, len(rows))
    if not np.isfinite(scores).all():  # StreamingTopK says what is wrong
        best = StreamingTopK(1, k)
        best.update(slice(None), scores[None, :], rows)
        return best.indices[0]
    chosen = np.arange(len(rows))
    if 0 < k < len(rows):  # every score at least the k-th largest (ties included), then sort only those
        chosen = np.flatnonzero(scores >= np.partition(scores, len(scores) - k)[len(scores) - k])
    order = np.lexsort((rows[chosen], -scores[chosen]))[:k]
    return np.asarray(rows[chosen[order]], dtype=np.int64)


def rerank_candidates(runtime: Any, embeddings: Any, captions: CaptionEmbeddings, candidates: np.ndarray,
                      k: int, direction: str = "t2i", gallery: Any = None) -> TopK:
    """The exact rerank of a shard's candidates with the bundle's scorer: ``candidates [Q, K]`` images per
    caption (``t2i``) or captions per image (``i2t``) -> each query's best ``k``.

    The one place the region index calls a scorer. With ``gallery`` (the shard's
    :class:`itmrt.runtime.gallery.Gallery`) a few captions' candidates are scored by the one-caption scorer by
    their rows (``Runtime.score_images(gallery, captions, rows=...)``): their per-image constants are read from
    the gallery's cache, computed once per gallery content, instead of being recomputed per query (a Gram matrix
    per candidate: about a third of a 100-candidate rerank); otherwise ``runtime.score`` scores the candidates'
    embeddings (decoded first under compact storage).
    """
    if direction != "t2i":
        return rerank_image_to_text(runtime.score, embeddings, captions, candidates, k)
    score_rows = runtime.rows_scorer(gallery) if gallery is not None else None
    return rerank_text_to_image(runtime.score, embeddings, captions, candidates, k, score_rows)


def share_centroids(indexes: list[RegionIndex]) -> None:
    """Indexes whose centroids have the same content keep one array of them (a build's shards each store a
    copy: 20 x 32 MB at 1M images)."""
    first: dict[str, np.ndarray] = {}
    for index in indexes:
        index.centroids = first.setdefault(index.centroids_key, index.centroids)
