"""NAAF's point measured: do words the image does not hold lower the match?

The synthetic data (:mod:`itmrt.synthetic.region_features`) comes in confusable pairs:
image B holds image A's objects plus one extra object X. A caption of B names
X, which A lacks: against image A it has exactly one *mismatched word*. NAAF's
negative branch exists to let such a word lower the score; SCAN-style attention
keeps only aligned evidence, so B's caption fits A almost as well as A's own.

Three comparisons per pair, read from a split's ``{split}_meta.json`` and
judged on any ``images x captions`` score matrix (so the PyTorch reference,
the torch-free runtime at every precision and SCAN are measured alike):

- ``own_caption`` (mismatched word, image query): for image A, each of its own
  captions against each caption of B - A's own should score higher;
- ``own_image`` (mismatched word, caption query): for each caption of B, image
  B against image A - B should score higher;
- ``negated`` (linguistic negation, a stated limitation): for each caption of
  A that says "no X", image A against image B - A should score higher, but
  NAAF does not model the word "no": its negative branch sees the word X,
  which B holds, so it has nothing to penalise B with.

The mismatched-word comparisons use only captions without any negation, so
the word "no" never takes part in them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.documents import parse_json
from itmrt.errors import DataError, first_line

COMPARISONS = ("own_caption", "own_image", "negated")
LABELS = {
    "own_caption": "image A: own caption > B's",
    "own_image": "B's caption: image B > A",
    "negated": "A's 'no X' caption: A > B",
}
DESCRIPTIONS = {
    "own_caption": "image A: own caption above B's (B's names X, absent from A)",
    "own_image": "B's caption: image B above A (A lacks the X it names)",
    "negated": "A's caption saying 'no X': image A above B (negation; not NAAF's mechanism)",
}


@dataclass
class Comparison:
    """Pairs of score-matrix entries where the first should score higher: ``scores[right] > scores[wrong]``."""

    name: str
    right: tuple[np.ndarray, np.ndarray]  # (image indices, caption indices)
    wrong: tuple[np.ndarray, np.ndarray]
    shape: tuple[int, int]  # (images, captions) of the split the indices point into

    def __len__(self) -> int:
        return int(self.right[0].shape[0])

    def margins(self, scores: np.ndarray) -> np.ndarray:
        """``score(right) - score(wrong)`` per comparison (float64)."""
        matrix = np.asarray(scores, dtype=np.float64)
        if matrix.shape != self.shape:
            raise DataError(f"the score matrix has shape {matrix.shape} but the split's meta file describes "
                            f"{self.shape[0]} images x {self.shape[1]} captions; score that split")
        return matrix[self.right] - matrix[self.wrong]


def read_meta(data_dir: str | Path, split: str) -> dict[str, Any]:
    """A split's ``{split}_meta.json`` (written by the synthetic generator); a one-line error otherwise."""
    path = Path(data_dir) / f"{split}_meta.json"
    try:
        meta = parse_json(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; mismatched-word comparisons need the synthetic data's "
                        "meta file (itmrt.synthetic.region_features.make_synthetic_dataset writes it)") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or first_line(exc)}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, NaN; nesting
        raise DataError(f"cannot read {path} as JSON ({type(exc).__name__}); regenerate the data") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("images"), list) and isinstance(meta.get("captions"), list)):
        raise DataError(f"{path} lacks the 'images' and 'captions' lists of the synthetic generator's meta file")
    return meta


def comparisons(meta: dict[str, Any]) -> dict[str, Comparison]:
    """The three comparisons of a split, keyed by :data:`COMPARISONS`; a meta file of another layout (entries
    of the wrong type, indices outside the split) is a one-line :class:`DataError`."""
    try:
        result = _comparisons(meta)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise DataError(f"the split's meta file does not have the synthetic generator's layout "
                        f"({type(exc).__name__}: {first_line(exc)}); regenerate the data") from None
    images, captions = len(meta["images"]), len(meta["captions"])
    for comparison in result.values():
        for rows, cols in (comparison.right, comparison.wrong):
            if len(rows) and (rows.min() < 0 or rows.max() >= images or cols.min() < 0 or cols.max() >= captions):
                raise DataError(f"the split's meta file names an image or caption outside its {images} images and "
                                f"{captions} captions; regenerate the data")
    return result


def _comparisons(meta: dict[str, Any]) -> dict[str, Comparison]:
    images, captions = meta["images"], meta["captions"]
    by_image: dict[int, list[int]] = {}
    for index, caption in enumerate(captions):
        by_image.setdefault(int(caption["image"]), []).append(index)
    pairs = [(a, int(image["partner"])) for a, image in enumerate(images) if image.get("extra") is not None]
    if not pairs:
        raise DataError("this split has no confusable pairs (pair_fraction was 0); nothing to compare")
    found: dict[str, list[tuple[int, int, int, int]]] = {name: [] for name in COMPARISONS}
    for a, b in pairs:
        clean_a = [c for c in by_image.get(a, []) if not captions[c]["negated"]]
        clean_b = [c for c in by_image.get(b, []) if not captions[c]["negated"]]
        found["own_caption"] += [(a, own, a, other) for own in clean_a for other in clean_b]
        found["own_image"] += [(b, c, a, c) for c in clean_b]
        found["negated"] += [(a, c, b, c) for c in by_image.get(a, []) if captions[c].get("confuser") == b]
    result = {}
    for name, rows in found.items():
        table = np.array(rows, dtype=np.int64).reshape(-1, 4)
        result[name] = Comparison(name, (table[:, 0], table[:, 1]), (table[:, 2], table[:, 3]),
                                  (len(images), len(captions)))
    return result


def accuracy(scores: np.ndarray, found: dict[str, Comparison]) -> dict[str, dict[str, float]]:
    """Per comparison: ``accuracy`` (% with the right entry strictly higher), ``median_margin``, ``count``."""
    table = {}
    for name, comparison in found.items():
        margins = comparison.margins(scores)
        table[name] = {
            "accuracy": float(100.0 * np.mean(margins > 0)) if len(margins) else float("nan"),
            "median_margin": float(np.median(margins)) if len(margins) else float("nan"),
            "count": len(comparison),
        }
    return table


def flips(reference: np.ndarray, scores: np.ndarray, found: dict[str, Comparison]) -> dict[str, int]:
    """Per comparison: how many come out the other way round in ``scores`` than in ``reference``."""
    return {name: int(np.count_nonzero((c.margins(reference) > 0) != (c.margins(scores) > 0)))
            for name, c in found.items()}


def format_accuracy(table: dict[str, dict[str, float]]) -> str:
    """The :func:`accuracy` table as text, one line per comparison."""
    lines = [f"{'comparison':<78} {'right %':>8} {'median margin':>14} {'count':>6}"]
    for name, row in table.items():
        lines.append(f"{DESCRIPTIONS[name]:<78} {row['accuracy']:>8.1f} {row['median_margin']:>+14.4f} "
                     f"{row['count']:>6d}")
    return "\n".join(lines)
