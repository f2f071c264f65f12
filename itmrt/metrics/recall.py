"""Recall@K, median and mean rank for image-text retrieval (the SCAN / NAAF protocol).

The score matrix is ``images x captions`` (N x 5N); caption ``c`` describes image
``c // 5``.

- image-to-text (i2t): each image is a query; its rank is the best (smallest)
  0-based rank among its 5 captions.
- text-to-image (t2i): each caption is a query; its rank is the 0-based rank of
  its image.
- ``R@K`` = 100 * fraction of queries with rank < K (K = 1, 5, 10);
  ``medr = floor(median(rank)) + 1``; ``meanr = mean(rank) + 1``;
  ``rsum`` = the six recalls summed.

Ties (the rule every function here uses)
    **Pessimistic by default**: an item that scores *exactly the same* as the
    query's best ground truth is counted as ranked ahead of it. So the i2t rank is
    the number of non-matching captions scoring >= the image's best matching
    caption, and the t2i rank is the number of other images scoring >= the
    caption's own image. ``ties="optimistic"`` counts only strictly higher scores.

    The released evaluation (``i2t``/``t2i`` in SCAN's and NAAF's evaluation.py)
    ranks with ``np.argsort(scores)[::-1]``, whose order among equal scores is not
    specified by numpy (quicksort/introsort, possibly SIMD), so its result with
    ties depends on the numpy build and on the items' positions. The two rules here
    bracket it: released rank is >= the optimistic rank and <= the pessimistic one,
    and all three agree whenever no other item exactly ties the ground truth's
    score (the usual case for float32 scores of a trained model). Both rules are
    deterministic and do not depend on the order of images or captions. The
    pessimistic rule is the default because it never overstates a deployment's
    recall: reduced precision that collapses distinct scores into ties shows up as
    lost recall instead of being resolved in the model's favour by index order.

MSCOCO reports the mean over five folds of 1000 images ("5-fold 1K", every key,
rsum included, averaged over folds - as NAAF's evaluation prints it; SCAN's
5-fold printout shows 6 x the mean i2t recall under the name rsum, a slip this
module does not reproduce) and the full 5000-image matrix ("5K", plain
:func:`recall_table`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from itmrt.data.precomp import CAPTIONS_PER_IMAGE
from itmrt.errors import DataError

RECALL_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)
TIE_RULES = ("pessimistic", "optimistic")
_BLOCK_ELEMENTS = 1 << 22
"""Comparison masks are built in blocks of about this many elements (bounded memory on 5K x 25K)."""


def _check_scores(scores: np.ndarray, captions_per_image: int) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise DataError(f"score matrix has shape {scores.shape}; expected 2 dimensions (images x captions)")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise DataError(f"score matrix has dtype {scores.dtype}; expected a real number type (float16/32/64)")
    num_images, num_captions = scores.shape
    if num_images == 0 or num_captions != captions_per_image * num_images:
        raise DataError(
            f"score matrix has shape {scores.shape}; expected images x captions with "
            f"{captions_per_image} captions per image (N x {captions_per_image}N, N >= 1)"
        )
    if np.issubdtype(scores.dtype, np.floating):
        bad = int(np.isnan(scores).sum())
        if bad:
            raise DataError(f"score matrix holds {bad} NaN values; the model or engine produced invalid scores")
    return scores


def _check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")


def i2t_ranks(
    scores: np.ndarray, captions_per_image: int = CAPTIONS_PER_IMAGE, ties: str = "pessimistic"
) -> np.ndarray:
    """0-based rank of each image query: best rank among its own captions (int64, length N)."""
    _check_ties(ties)
    scores = _check_scores(scores, captions_per_image)
    num_images, num_captions = scores.shape
    own = scores.reshape(num_images, num_images, captions_per_image)[np.arange(num_images), np.arange(num_images)]
    best = own.max(axis=1)  # best matching caption's score, per image
    ranks = np.empty(num_images, dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // num_captions)
    for start in range(0, num_images, step):
        stop = min(start + step, num_images)
        block = scores[start:stop]
        threshold = best[start:stop, None]
        if ties == "optimistic":
            # Own captions never score above the best own caption, so no correction is needed.
            ranks[start:stop] = (block > threshold).sum(axis=1)
        else:
            at_or_above = (block >= threshold).sum(axis=1)
            own_at_or_above = (own[start:stop] >= threshold).sum(axis=1)
            ranks[start:stop] = at_or_above - own_at_or_above
    return ranks


def t2i_ranks(
    scores: np.ndarray, captions_per_image: int = CAPTIONS_PER_IMAGE, ties: str = "pessimistic"
) -> np.ndarray:
    """0-based rank of each caption query's own image among all images (int64, length 5N)."""
    _check_ties(ties)
    scores = _check_scores(scores, captions_per_image)
    num_images, num_captions = scores.shape
    caption_index = np.arange(num_captions)
    own = scores[caption_index // captions_per_image, caption_index]  # each caption's score with its image
    ranks = np.empty(num_captions, dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // num_images)
    for start in range(0, num_captions, step):
        stop = min(start + step, num_captions)
        block = scores[:, start:stop]
        threshold = own[None, start:stop]
        if ties == "optimistic":
            ranks[start:stop] = (block > threshold).sum(axis=0)
        else:
            ranks[start:stop] = (block >= threshold).sum(axis=0) - 1  # minus the image itself
    return ranks


def _summarise(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    count = len(ranks)
    return {
        f"{prefix}_r1": 100.0 * float(np.count_nonzero(ranks < 1)) / count,
        f"{prefix}_r5": 100.0 * float(np.count_nonzero(ranks < 5)) / count,
        f"{prefix}_r10": 100.0 * float(np.count_nonzero(ranks < 10)) / count,
        f"{prefix}_medr": float(np.floor(np.median(ranks))) + 1.0,
        f"{prefix}_meanr": float(ranks.mean()) + 1.0,
    }


def recall_table(
    scores: np.ndarray, captions_per_image: int = CAPTIONS_PER_IMAGE, ties: str = "pessimistic"
) -> dict[str, float]:
    """R@1/5/10, medr, meanr in both directions and rsum for an images x captions score matrix."""
    table = _summarise(i2t_ranks(scores, captions_per_image, ties), "i2t")
    table.update(_summarise(t2i_ranks(scores, captions_per_image, ties), "t2i"))
    table["rsum"] = sum(table[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {key: table[key] for key in RECALL_KEYS}


def fold_tables(
    scores: np.ndarray,
    fold_size: int = 1000,
    num_folds: int = 5,
    captions_per_image: int = CAPTIONS_PER_IMAGE,
    ties: str = "pessimistic",
) -> list[dict[str, float]]:
    """Recall table of each fold: images ``[k*fold_size, (k+1)*fold_size)`` against their own captions."""
    scores = _check_scores(scores, captions_per_image)
    if fold_size < 1 or num_folds < 1:
        raise ValueError(f"fold_size and num_folds must be >= 1, got {fold_size} and {num_folds}")
    if scores.shape[0] != fold_size * num_folds:
        raise DataError(
            f"score matrix has {scores.shape[0]} images; the {num_folds}-fold protocol needs exactly "
            f"{num_folds} x {fold_size} = {num_folds * fold_size} (MSCOCO 5K test split)"
        )
    tables = []
    for fold in range(num_folds):
        images = slice(fold * fold_size, (fold + 1) * fold_size)
        captions = slice(fold * fold_size * captions_per_image, (fold + 1) * fold_size * captions_per_image)
        tables.append(recall_table(scores[images, captions], captions_per_image, ties))
    return tables


def coco_5fold_1k(
    scores: np.ndarray,
    fold_size: int = 1000,
    captions_per_image: int = CAPTIONS_PER_IMAGE,
    ties: str = "pessimistic",
) -> dict[str, float]:
    """MSCOCO 5-fold 1K: every key (rsum too) averaged over five folds of ``fold_size`` images."""
    tables = fold_tables(scores, fold_size, 5, captions_per_image, ties)
    return {key: float(np.mean([table[key] for table in tables])) for key in RECALL_KEYS}


def format_recall_table(table: Mapping[str, float]) -> str:
    """A fixed-width, human-readable table of a :func:`recall_table` result."""
    missing = [key for key in RECALL_KEYS if key not in table]
    if missing:
        raise ValueError(f"recall table lacks keys {missing}")
    header = f"{'':<13}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'medr':>8}{'meanr':>9}"
    rows = [header]
    for label, prefix in (("image->text", "i2t"), ("text->image", "t2i")):
        rows.append(
            f"{label:<13}"
            f"{table[f'{prefix}_r1']:>7.1f}{table[f'{prefix}_r5']:>7.1f}{table[f'{prefix}_r10']:>7.1f}"
            f"{table[f'{prefix}_medr']:>8.1f}{table[f'{prefix}_meanr']:>9.2f}"
        )
    rows.append(f"{'rsum':<13}{table['rsum']:>7.1f}")
    return "\n".join(rows)


def _first_correct_ranks(scores: np.ndarray, query_labels: np.ndarray, item_labels: np.ndarray) -> np.ndarray:
    """Per query row, the 0-based rank of its best-scoring item with the same label.

    Pessimistic ties (as the caption recall above): a wrong item scoring exactly as
    high as the best correct one counts as ranked ahead of it.
    """
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // max(1, scores.shape[1]))
    for start in range(0, scores.shape[0], step):
        block = np.asarray(scores[start:start + step], dtype=np.float64)
        correct = query_labels[start:start + step, None] == item_labels[None, :]
        best = np.where(correct, block, -np.inf).max(axis=1, keepdims=True)
        ranks[start:start + step] = ((block >= best) & ~correct).sum(axis=1)
    return ranks


def identity_recall_table(scores: np.ndarray, image_labels: np.ndarray, caption_labels: np.ndarray) -> dict[str, float]:
    """R@1/5/10, medr, meanr both ways and rsum for an ``images x captions`` score matrix, matching by identity.

    Image-to-text: an image query is answered correctly at K when one of the top K
    captions has its identity; text-to-image likewise with images. With one image
    per identity and each caption's own image this is the usual protocol; with
    several images per identity it is the person-search protocol (CUHK-PEDES).
    The keys are those of :func:`recall_table`.
    """
    scores = np.asarray(scores)
    image_labels = np.asarray(image_labels)
    caption_labels = np.asarray(caption_labels)
    if scores.ndim != 2 or scores.shape != (len(image_labels), len(caption_labels)):
        raise DataError(
            f"score matrix has shape {scores.shape}; expected images "
            f"x captions = ({len(image_labels)}, {len(caption_labels)})"
        )
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise DataError("score matrix holds NaN values; the model or engine produced invalid scores")
    if not np.isin(caption_labels, image_labels).all() or not np.isin(image_labels, caption_labels).all():
        raise DataError(
            "some identities have captions but no image (or images but no caption); every query needs a match"
        )
    table: dict[str, float] = {}
    for prefix, ranks in (
        ("i2t", _first_correct_ranks(scores, image_labels, caption_labels)),
        ("t2i", _first_correct_ranks(scores.T, caption_labels, image_labels)),
    ):
        count = len(ranks)
        for k in (1, 5, 10):
            table[f"{prefix}_r{k}"] = 100.0 * float(np.count_nonzero(ranks < k)) / count
        table[f"{prefix}_medr"] = float(np.floor(np.median(ranks))) + 1.0
        table[f"{prefix}_meanr"] = float(ranks.mean()) + 1.0
    table["rsum"] = sum(table[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {key: table[key] for key in RECALL_KEYS}
