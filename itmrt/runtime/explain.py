"""Why NAAF scored an image and a caption as it did: the score taken apart word by word.

NAAF's test-time score (docs/models.md section 2) is a mean over the caption's
words of three terms: ``S = (1/m) sum_i (neg_i + f_i + rel_i)``. This module
computes the terms in numpy (float64) from the bundle's own encoder outputs and
the constants its manifest froze (threshold, lambda, intra-caption factor), and
reports per word:

- its best-region similarity ``max_j s_ij`` and which region that is;
- the threshold ``t`` and whether the negative branch fired (``q_i < 0``, the
  propagated decision) - a word the image does not hold;
- its three contributions to the score, each already divided by m so that
  the contributions of all words add up to the score: ``negative`` (``r_i/m``
  when the branch fired, else 0; never positive), ``aggregated`` (``f_i/m``,
  positive branch from the attended region features) and ``relevance``
  (``rel_i/m``, positive branch from the relevance weights).

:func:`explain` also runs the bundle's scorer on the same pair and returns its
score beside the sum, so every explanation carries its own check. Only numpy
and the runtime (ONNX Runtime) are used: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from itmrt.errors import DataError, ItmrtError
from itmrt.text.vocab import Vocabulary, tokenize_caption

if TYPE_CHECKING:
    from itmrt.runtime.api import Runtime
    from itmrt.runtime.gallery import Gallery

LEAKY_SLOPE = 0.1
NORM_EPS = 1e-8


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, max-shifted."""
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def propagated_decision(tokens: np.ndarray, row_max: np.ndarray, intra_factor: float) -> np.ndarray:
    """Step 3's ``q = W r`` with ``W = softmax_l(intra_factor * u_i . u_l)``: ``row_max`` -> q, both ``[..., m]``.

    ``tokens`` ``[m, d]`` are the caption's real tokens.
    """
    weights = softmax_rows(intra_factor * (tokens @ tokens.T))  # [m, m]
    return np.einsum("il,...l->...i", weights, row_max)


@dataclass
class NaafTerms:
    """Per-word terms of NAAF's score for one caption against N images (arrays ``[N, m]`` unless noted)."""

    similarities: np.ndarray  # s_ij, [N, m, n]
    row_max: np.ndarray  # r_i = max_j s_ij - t
    decision: np.ndarray  # q_i, the propagated decision
    fired: np.ndarray  # bool: the negative branch took this word (q_i < 0, and the branch is on)
    negative: np.ndarray  # neg_i
    aggregated: np.ndarray  # f_i
    relevance: np.ndarray  # rel_i

    @property
    def scores(self) -> np.ndarray:
        """``[N]``: the mean over words of ``neg + f + rel``."""
        return (self.negative + self.aggregated + self.relevance).mean(axis=-1)


def naaf_word_terms(
    tokens: np.ndarray,
    regions: np.ndarray,
    threshold: float,
    lambda_softmax: float,
    intra_factor: float,
    negative_branch: bool = True,
) -> NaafTerms:
    """docs/models.md section 2, step by step, for one caption's real tokens ``[m, d]`` and images ``[N, n, d]``.

    Arithmetic in float64, the released definitions literally (raw ``exp``,
    ``p / (sum p + 1e-8)``, explicit ``vhat``): an explanation, not a fast path.
    ``negative_branch=False`` is the paper's ablation: every ``neg_i`` is 0.
    """
    u = np.asarray(tokens, dtype=np.float64)
    v = np.asarray(regions, dtype=np.float64)
    if u.ndim != 2 or v.ndim != 3 or u.shape[1] != v.shape[2]:
        raise DataError(f"tokens {u.shape} and regions {v.shape} do not fit: expected [m, d] and [N, n, d]")
    sims = np.einsum("md,Nnd->Nmn", u, v)  # step 1
    shifted = sims - threshold  # step 2
    row_max = shifted.max(axis=-1)  # step 3
    decision = propagated_decision(u, row_max, intra_factor)
    fired = (decision < 0) & negative_branch
    negative = np.where(fired, row_max, 0.0)
    # Step 4: attention over the regions above the threshold only.
    raw = np.where(shifted > 0, np.exp(lambda_softmax * np.where(shifted > 0, shifted, 0.0)), 0.0)
    weights = raw / (raw.sum(axis=-1, keepdims=True) + NORM_EPS)
    attended = np.einsum("Nmn,Nnd->Nmd", weights, v)  # vhat_i
    aggregated = np.einsum("md,Nmd->Nm", u, attended) / np.maximum(np.linalg.norm(attended, axis=-1), NORM_EPS)
    # Step 5: relevance, LeakyReLU normalised over the caption's words for each region.
    clipped = np.where(sims > 0, sims, LEAKY_SLOPE * sims)
    normalised = clipped / (np.sqrt((clipped**2).sum(axis=1, keepdims=True)) + NORM_EPS)
    relevance = (softmax_rows(lambda_softmax * normalised) * sims).sum(axis=-1)
    return NaafTerms(sims, row_max, decision, fired, negative, aggregated, relevance)


@dataclass
class WordExplanation:
    """One word of a caption against one image; the three contributions are already divided by m."""

    word: str
    best_region: int
    best_similarity: float
    decision: float  # q_i: the negative branch fires below 0
    negative_fired: bool
    negative: float
    aggregated: float
    relevance: float

    @property
    def total(self) -> float:
        return self.negative + self.aggregated + self.relevance


@dataclass
class Explanation:
    """NAAF's score of one image and one caption, word by word."""

    image: int
    caption: str
    threshold: float
    negative_branch: bool
    words: list[WordExplanation]
    similarities: np.ndarray  # [m, n]: word x region
    scorer_score: float | None  # what the bundle's scorer returns for this pair (None: not run)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The sum of every word's contributions: NAAF's score of the pair."""
        return float(sum(word.total for word in self.words))

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image, "caption": self.caption, "threshold": self.threshold,
            "negative_branch": self.negative_branch, "score": self.score, "scorer_score": self.scorer_score,
            "words": [{**vars(word), "total": word.total} for word in self.words], **self.details,
        }

    def table(self) -> str:
        """A fixed-width table: one row per word, then the sums."""
        header = (f"{'word':<12} {'region':>6} {'best sim':>9} {'- thres':>8} {'q':>8} {'neg?':>5} "
                  f"{'negative':>9} {'aggreg.':>9} {'relev.':>9} {'total':>9}")
        lines = [header]
        for w in self.words:
            lines.append(
                f"{w.word[:12]:<12} {w.best_region:>6d} {w.best_similarity:>9.4f} "
                f"{w.best_similarity - self.threshold:>+8.4f} "
                f"{w.decision:>+8.4f} {'yes' if w.negative_fired else 'no':>5} "
                f"{w.negative:>+9.5f} {w.aggregated:>+9.5f} {w.relevance:>+9.5f} {w.total:>+9.5f}"
            )
        sums = [sum(getattr(w, name) for w in self.words) for name in ("negative", "aggregated", "relevance")]
        lines.append(f"{'sum':<12} {'':>6} {'':>9} {'':>8} {'':>8} {'':>5} "
                     f"{sums[0]:>+9.5f} {sums[1]:>+9.5f} {sums[2]:>+9.5f} {self.score:>+9.5f}")
        return "\n".join(lines)


def naaf_constants(runtime: Runtime) -> tuple[float, float, float]:
    """The threshold, lambda and intra-caption factor the bundle's manifest froze (float32 values)."""
    manifest = runtime.bundle.manifest
    if runtime.bundle.family != "naaf":
        raise ItmrtError(
            f"explain takes NAAF's score apart word by word; {runtime.bundle.path} holds a "
            f"{runtime.bundle.family} model"
        )
    constants = (manifest.threshold, manifest.lambda_softmax, manifest.intra_factor)
    if any(constant is None for constant in constants):
        raise ItmrtError(f"the manifest of {runtime.bundle.path} lacks NAAF's frozen constants; "
                         "export the bundle again")
    threshold, lambda_softmax, intra_factor = (float(np.float32(constant.value)) for constant in constants if constant)
    return threshold, lambda_softmax, intra_factor


def explain(
    runtime: Runtime,
    images: np.ndarray | Gallery,
    image: int,
    caption: str,
    *,
    negative_branch: bool = True,
    encoded: bool | None = None,
) -> Explanation:
    """Explain the score of image ``image`` of ``images`` for ``caption``.

    ``images``: a gallery, image embeddings ``[N, n, d]`` (from
    ``runtime.encode_images``) or region features ``[N, n, img_dim]``, told
    apart by the last axis unless ``encoded`` says which. Only the chosen image
    is encoded. ``negative_branch=False`` explains the paper's ablation; the
    scorer's score is then still the full model's.
    """
    from itmrt.runtime.gallery import Gallery

    if not caption.strip():
        raise ItmrtError("the caption to explain is empty; give at least one word")
    threshold, lambda_softmax, intra_factor = naaf_constants(runtime)
    regions = _one_image(runtime, images, image, encoded)
    captions = runtime.encode_captions([caption])
    tokens = captions.vectors[: int(captions.lengths[0])]
    terms = naaf_word_terms(tokens, regions[None], threshold, lambda_softmax, intra_factor, negative_branch)
    scorer_score = float(runtime.score(regions[None], captions)[0, 0])
    m = len(tokens)
    words = word_labels(runtime.vocab, caption, m)
    sims = terms.similarities[0]
    best = sims.argmax(axis=1)
    explained = [
        WordExplanation(
            word=words[i], best_region=int(best[i]), best_similarity=float(sims[i, best[i]]),
            decision=float(terms.decision[0, i]), negative_fired=bool(terms.fired[0, i]),
            negative=float(terms.negative[0, i] / m), aggregated=float(terms.aggregated[0, i] / m),
            relevance=float(terms.relevance[0, i] / m),
        )
        for i in range(m)
    ]
    source = "gallery" if isinstance(images, Gallery) else "array"
    return Explanation(image, caption, threshold, negative_branch, explained, sims, scorer_score,
                       {"lambda_softmax": lambda_softmax, "intra_factor": intra_factor, "images": source})


def word_labels(vocab: Vocabulary, caption: str, length: int) -> list[str]:
    """The ``length`` tokens the text encoder saw, as words: ``<start>``, the caption's words, ``<end>``.

    A word outside the vocabulary is shown as itself with ``(<unk>)`` (the encoder saw ``<unk>``); a
    caption cut at the token limit loses its last words, not its ``<end>``.
    """
    words = [word if word in vocab else f"{word} (<unk>)" for word in tokenize_caption(caption)]
    return ["<start>", *words[: max(0, length - 2)], "<end>"]


def _one_image(runtime: Runtime, images: np.ndarray | Gallery, image: int, encoded: bool | None) -> np.ndarray:
    """Region embeddings ``[n, d]`` of one image, encoding it when ``images`` holds features."""
    from itmrt.runtime.gallery import Gallery

    if isinstance(images, Gallery):
        images.check_bundle(runtime.bundle)
        array, encoded = images.embeddings, True
    else:
        array = images
    count = int(array.shape[0])
    if not 0 <= image < count:
        raise DataError(f"--image {image} is out of range: there are {count} images (0..{count - 1})")
    embed_size = int(runtime.bundle.manifest.dims["embed_size"])
    if encoded is None:
        encoded = array.ndim == 3 and array.shape[2] == embed_size and array.shape[2] != runtime.image_input_shape[-1]
    if encoded:
        if array.ndim != 3 or array.shape[2] != embed_size:
            raise DataError(f"image embeddings of shape {tuple(array.shape)} do not fit this bundle (d = {embed_size})")
        return np.asarray(array[image], dtype=np.float32)
    return runtime.encode_images(np.asarray(array[image : image + 1]), source=f"image {image}")[0]
