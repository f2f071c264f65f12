"""``itmrt parity``: every deployed variant against an FP32 reference on the same inputs.

The reference is the PyTorch model of the bundle's source checkpoint
(``against="torch"``; needs torch) or the bundle's own FP32 graphs on ONNX
Runtime (``against="ort:fp32"``; torch-free). Captions are tokenised once
(the bundle's vocabulary and token limit) and every model gets the same ids
and the same region features, so differences come from the graphs alone.

Per variant the report holds:

- ``tensors``: errors of each graph fed the reference's inputs - image
  encoder (region embeddings), text encoder (token embeddings), scorer graph
  (fed the *reference's* embeddings) - and ``end_to_end`` (the variant's own
  encoders and ``Runtime.rank``, the score matrix a user gets);
- ``decisions`` (NAAF): branch-decision flip rates from the variant's own
  token and region embeddings (:func:`itmrt.reports.agreement.naaf_decision_flips`);
- ``retrieval``: top-1 / top-10 agreement and Spearman's rho per query;
  ``recall`` and ``recall_delta`` (variant minus reference);
- ``checks`` against ``tolerances`` (defaults per precision, overridable), and ``passed``.

Score matrices are saved next to the report (``scores_reference.npy``,
``scores_<backend>-<precision>.npy``) so every retrieval number can be recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.bundle.folder import BundleInfo, read_bundle
from itmrt.bundle.names import IMAGES, MAX_LENGTH, REGION_FEATURES, BackendName, Component, Precision
from itmrt.bundle.tolerances import DEFAULT_DEPLOYMENT_TOLERANCES, TOLERANCE_KEYS, bundle_tolerances
from itmrt.bundle.traits import bundle_traits
from itmrt.data.image_inputs import check_pixel_size
from itmrt.data.images import ImageCaptionSplit, preprocess_images
from itmrt.data.precomp import PrecompSplit
from itmrt.errors import ItmrtError, first_line
from itmrt.metrics.recall import identity_recall_table, recall_table
from itmrt.optional import torch_side
from itmrt.publish import atomic_save_float32_npy, atomic_write_text
from itmrt.reports import agreement
from itmrt.reports.comparator import Comparison, check
from itmrt.reports.runtime_variants import Variant, graph_files, open_variant, parse_variant
from itmrt.runtime.encoders import CaptionEmbeddings, tokenize
from itmrt.runtime.tiled import score_tiled
from itmrt.text.vocab import Vocabulary

BarFactory = Callable[[str, int], Callable[[int], None]]

DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    precision: limits.as_dict() for precision, limits in DEFAULT_DEPLOYMENT_TOLERANCES.items()
}
"""The limits of a bundle that records none of its own (exported before families gave theirs)."""
RECALL_DELTA_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
REFERENCE_FILE = "scores_reference.npy"


@dataclass
class ParityOptions:
    split: str = "test"
    against: str = "torch"
    variants: Sequence[Variant] = field(default_factory=lambda: [Variant(BackendName.ORT, Precision.FP32)])
    max_images: int | None = None
    decision_images: int = 100  # images (and their captions) the NAAF decision flips are counted on
    tolerances: dict[str, float] = field(default_factory=dict)  # overrides, for every precision
    checkpoint: Path | None = None  # override of the manifest's source checkpoint path
    threads: int = 0
    batch_size: int = 128
    top_k: int = 10
    scorer: str | None = None  # the runtime's scorer for rank(): auto / graph / fused (None: its default)
    reference_providers: list[str] | None = None  # ONNX Runtime providers of an ort:* reference (None: default)


@dataclass
class ModelOutputs:
    """What one model (the reference or a variant) made of the shared inputs."""

    images: np.ndarray  # [N, n, d] region embeddings
    captions: CaptionEmbeddings
    scores: np.ndarray  # [N, C]


@dataclass
class ParityRun:
    report: dict[str, Any]
    matrices: dict[str, np.ndarray]  # file name -> score matrix


def tolerances_for(precision: str, overrides: dict[str, float] | None = None,
                   base: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """``precision``'s limits from ``base`` (the bundle's, :func:`bundle_tolerances`; default: the defaults),
    with the user's ``overrides`` on top."""
    unknown = set(overrides or {}) - set(TOLERANCE_KEYS)
    if unknown:
        raise ItmrtError(f"unknown tolerance {sorted(unknown)[0]!r}; choose from {', '.join(TOLERANCE_KEYS)}")
    return {**(base or DEFAULT_TOLERANCES)[precision], **(overrides or {})}


def evaluate_checks(entry: dict[str, Any], tolerances: dict[str, float]) -> list[dict[str, Any]]:
    """The pass/fail checks of one variant's measurements against ``tolerances``."""
    end = entry["tensors"]["end_to_end"]
    ties = entry.get("threshold_ties")
    # NAAF: pairs with a similarity at the threshold are judged by the decision flip rates, not the score error.
    worst = end["max_abs"] if not ties else ties["max_abs_off_threshold"]
    label = "end-to-end score max abs error" + (" (pairs off the threshold)" if ties else "")
    checks = [
        check(label, worst if end["nonfinite"] == 0 else float("inf"), tolerances["score_max_abs"], "<="),
        check("rsum delta (absolute)", abs(entry["recall_delta"]["rsum"]), tolerances["rsum_abs_delta"], "<="),
        # A top-1 swap between candidates whose reference scores differ by less than the score tolerance
        # is a tie the tolerance already allows, not a ranking error.
        check(
            "top-1 agreement, tie-tolerant (a candidate within the score tolerance of the best counts as agreeing; "
            "worse direction; the strict figure is the retrieval table's)",
            min(
                agreement.top1_agreement_within(entry["retrieval"][d], tolerances["score_max_abs"])
                for d in agreement.DIRECTIONS
            ),
            tolerances["top1_agreement_min"],
            ">=",
        ),
    ]
    decisions = entry.get("decisions")
    if decisions:
        checks.append(
            check("region decision flip rate", decisions["region_flip_rate"], tolerances["flip_rate_max"], "<=")
        )
        checks.append(check("word decision flip rate", decisions["word_flip_rate"], tolerances["flip_rate_max"], "<="))
    # JSON has no infinity: a non-finite score is recorded as a failed check with value null
    return Comparison(checks=checks).to_json()["checks"]


def apply_tolerances(report: dict[str, Any], overrides: dict[str, float] | None = None) -> dict[str, Any]:
    """Re-judge every measured variant of ``report`` (in place) with the bundle's tolerances plus ``overrides``.

    The bundle's own are the report's ``bundle_tolerances`` (what its family recorded at export); a report
    without them is judged by the defaults."""
    base = report.get("bundle_tolerances") or DEFAULT_TOLERANCES
    for entry in report["variants"]:
        if entry["status"] != "ok":
            continue
        entry["tolerances"] = tolerances_for(entry["precision"], overrides, base)
        entry["checks"] = evaluate_checks(entry, entry["tolerances"])
        entry["passed"] = all(c["passed"] for c in entry["checks"])
    measured = [e for e in report["variants"] if e["status"] == "ok"]
    report["passed"] = bool(measured) and all(e["passed"] for e in measured)
    report["tolerance_overrides"] = dict(overrides or {})
    return report


# -- inputs -------------------------------------------------------------------


@dataclass
class ParityData:
    """The shared inputs: image inputs, captions, and the recall table a score matrix gets on them."""

    features: np.ndarray
    captions: list[str]
    per_image: int  # captions per image (0: the count varies; recall then matches by identity)
    recall: Callable[[np.ndarray], dict[str, float]]


def _open_split(info: BundleInfo, data: Path, options: ParityOptions) -> ParityData:
    image_input = bundle_traits(info.manifest).image_input
    if image_input == IMAGES:
        return _open_image_split(info, data, options)
    if image_input != REGION_FEATURES:
        raise ItmrtError(f"itmrt parity cannot read {image_input} inputs ({info.path})")
    split = PrecompSplit.open(data, options.split)
    count = _image_count(split.num_images, options)
    per = split.captions_per_image
    features = np.ascontiguousarray(split.images[:count], dtype=np.float32)
    return ParityData(features, list(split.captions[: count * per]), per, lambda scores: recall_table(scores, per))


def _image_count(available: int, options: ParityOptions) -> int:
    count = available if options.max_images is None else min(options.max_images, available)
    if count < 1:
        raise ItmrtError(f"--max-images must be at least 1, not {options.max_images}")
    return count


def _open_image_split(info: BundleInfo, data: Path, options: ParityOptions) -> ParityData:
    """A pixel split (CMPM): the first images preprocessed as the model was trained, their captions, identities."""
    split = ImageCaptionSplit.open(data, options.split)
    check_pixel_size(split.images, data, options.split, info.manifest, "pass a split of the model's image size")
    count = _image_count(split.num_images, options)
    keep = np.flatnonzero(split.caption_image < count)
    image_labels = np.asarray(split.image_labels[:count])
    caption_labels = image_labels[np.asarray(split.caption_image)[keep]]
    owners = np.asarray(split.caption_image)[keep]
    per = len(keep) // count if np.array_equal(owners, np.repeat(np.arange(count), max(1, len(keep) // count))) else 0
    features = preprocess_images(np.asarray(split.images[:count]))
    return ParityData(features, [split.captions[int(k)] for k in keep], per,
                      lambda scores: identity_recall_table(scores, image_labels, caption_labels))


def _token_ids(info: BundleInfo, captions: list[str]) -> tuple[list[list[int]], int]:
    """Token ids as the runtime makes them (a caption over the bundle's token limit is cut), and how many were cut."""
    vocab = Vocabulary.from_json(info.vocab_file())
    limits = info.shape_range(MAX_LENGTH)
    full = tokenize(vocab, captions, None)
    if not limits:
        return full, 0
    limit = limits.max
    truncated = sum(1 for ids in full if len(ids) > limit)
    return tokenize(vocab, captions, limit, "truncate", lambda _message: None) if truncated else full, truncated


# -- reference and variants ------------------------------------------------------


TORCH_REFERENCE = "itmrt.families.reference"
"""The module of the PyTorch reference (the torch side), reached by name: this report stays torch-free."""


def torch_reference(
    info: BundleInfo, checkpoint: Path | None, features: np.ndarray, ids: list[list[int]], batch_size: int,
    bar: BarFactory | None = None,
) -> tuple[ModelOutputs, dict[str, Any]]:
    """The PyTorch model of the bundle's source checkpoint on the shared inputs (needs torch)."""
    reference = torch_side(TORCH_REFERENCE, "the PyTorch reference (parity against torch)")
    out = reference.torch_reference(info, checkpoint, features, ids, batch_size, bar)
    return ModelOutputs(out.images, out.captions, out.scores), out.described


def runtime_encoded(
    runtime: Any, features: np.ndarray, ids: list[list[int]], top_k: int, bar: BarFactory | None = None
) -> ModelOutputs:
    images = runtime.image_encoder.encode(features)
    captions = runtime.text_encoder.encode_ids(ids)
    progress = bar(f"{runtime.backend_name}:{runtime.precision}: score", len(ids)) if bar else None
    result = runtime.rank(images, captions, top_k=top_k, keep_scores=True, progress=progress)
    assert result.scores is not None
    return ModelOutputs(images, captions, result.scores)


def _caption_tokens(captions: CaptionEmbeddings, count: int) -> list[np.ndarray]:
    assert captions.offsets is not None
    return [captions.vectors[captions.offsets[k] : captions.offsets[k + 1]] for k in range(count)]


def _frozen_threshold(info: BundleInfo) -> float | None:
    """The similarity threshold the bundle froze (NAAF's); None for families without one."""
    threshold = info.manifest.threshold
    return threshold.value if threshold is not None else None


def _decision_flips(
    info: BundleInfo, ref: ModelOutputs, got: ModelOutputs, images: int, per_image: int
) -> dict[str, Any] | None:
    manifest = info.manifest
    threshold = _frozen_threshold(info)
    if threshold is None:
        return None
    n_img = min(images, ref.images.shape[0])
    n_cap = n_img * per_image
    return agreement.naaf_decision_flips(
        _caption_tokens(ref.captions, n_cap), ref.images[:n_img],
        _caption_tokens(got.captions, n_cap), got.images[:n_img],
        threshold,
        manifest.intra_factor.value if manifest.intra_factor is not None else 5.0,
        bool(manifest.scorer_options.get("propagate", True)),
    )


def _threshold_ties(info: BundleInfo, ref: ModelOutputs, scores: np.ndarray) -> dict[str, Any] | None:
    threshold = _frozen_threshold(info)
    if threshold is None:
        return None
    return agreement.threshold_ties(
        ref.scores, scores, _caption_tokens(ref.captions, ref.scores.shape[1]), ref.images, threshold
    )


def measure_variant(
    info: BundleInfo, runtime: Any, ref: ModelOutputs, features: np.ndarray, ids: list[list[int]], per_image: int,
    options: ParityOptions, ref_recall: dict[str, float], bar: BarFactory | None = None,
    recall_of: Callable[[np.ndarray], dict[str, float]] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """All measurements of one opened variant (no pass/fail yet) and its end-to-end score matrix."""
    got = runtime_encoded(runtime, features, ids, options.top_k, bar)
    # The scorer graph itself (runtime.backends["scorer"]), fed the reference's embeddings: the runtime's
    # rank() may take another path (a fused CPU scorer), which end_to_end measures.
    trt = runtime.backend_name == BackendName.TRT
    fed_reference = score_tiled(
        runtime.backends[Component.SCORER], ref.images, ref.captions, top_k=1, keep_scores=True,
        max_images=runtime.batch_limit if trt else None, max_captions=runtime.caption_limit if trt else None,
    ).scores
    assert fed_reference is not None and got.scores is not None
    tensors = {
        Component.IMAGE_ENCODER.value: agreement.tensor_errors(ref.images, got.images),
        Component.TEXT_ENCODER.value: agreement.tensor_errors(ref.captions.vectors, got.captions.vectors),
        Component.SCORER.value: agreement.tensor_errors(ref.scores, fed_reference),
        "end_to_end": agreement.tensor_errors(ref.scores, got.scores),
    }
    finite = np.nan_to_num(got.scores, nan=-np.inf)
    recall = (recall_of or (lambda scores: recall_table(scores, per_image)))(
        np.where(np.isfinite(finite), finite, -np.inf))
    entry = {
        "tensors": tensors,
        "threshold_ties": _threshold_ties(info, ref, got.scores),
        "decisions": _decision_flips(info, ref, got, options.decision_images, per_image),
        "retrieval": agreement.retrieval_agreement(ref.scores, got.scores, options.top_k),
        "recall": recall,
        "recall_delta": {key: recall[key] - ref_recall[key] for key in RECALL_DELTA_KEYS},
        "graph_files": graph_files(runtime),
    }
    return entry, got.scores


def run_parity(bundle: str | Path, data: str | Path, options: ParityOptions, bar: BarFactory | None = None,
               command: list[str] | None = None) -> ParityRun:
    """Measure every variant of ``options.variants`` against the reference; nothing is written."""
    from itmrt.reports.environment import environment
    from itmrt.reports.schema import header

    info = read_bundle(bundle)
    shared = _open_split(info, Path(data), options)
    features, captions, per_image = shared.features, shared.captions, shared.per_image
    ids, truncated = _token_ids(info, captions)
    started = time.perf_counter()
    if options.against == "torch":
        ref, described = torch_reference(info, options.checkpoint, features, ids, options.batch_size, bar)
    else:
        against = parse_variant(options.against)
        runtime, reason = open_variant(info.path, against, options.threads, options.scorer, options.reference_providers)
        if runtime is None:
            raise ItmrtError(f"cannot open the reference {against.name}: {reason}")
        ref = runtime_encoded(runtime, features, ids, options.top_k, bar)
        described = {"against": against.name, "graph_files": graph_files(runtime),
                     "providers": list(getattr(runtime.backends["scorer"], "providers", []))}
    described["seconds"] = time.perf_counter() - started
    ref_recall = shared.recall(ref.scores)
    matrices = {REFERENCE_FILE: ref.scores}
    entries = []
    for variant in options.variants:
        entry: dict[str, Any] = {"name": variant.name, "backend": variant.backend, "precision": variant.precision}
        started = time.perf_counter()
        runtime, reason = open_variant(info.path, variant, options.threads, options.scorer)
        if runtime is None:
            entry.update(status="not_run", reason=reason)
        else:
            try:
                measured, scores = measure_variant(
                    info, runtime, ref, features, ids, per_image, options, ref_recall, bar, shared.recall
                )
            except ItmrtError as exc:  # e.g. a precision graph whose outputs have the wrong shape
                entry.update(status="failed", reason=first_line(exc))
            else:
                scores_file = f"scores_{variant.file_stem}.npy"
                matrices[scores_file] = scores
                entry.update(status="ok", reason=None, scores_file=scores_file, **measured)
        entry["seconds"] = time.perf_counter() - started
        entries.append(entry)
    report = header("parity", info, command)
    report.update(
        environment=environment(options.threads),
        reference={**described, "scores_file": REFERENCE_FILE, "recall": ref_recall},
        data={
            "path": str(data), "split": options.split, "images": int(len(features)), "captions": len(captions),
            "captions_per_image": per_image, "truncated_captions": truncated,
            "decision_images": min(options.decision_images, len(features)),
        },
        settings={"top_k": options.top_k, "threads": options.threads, "rel_floor": agreement.REL_FLOOR,
                  "scorer": options.scorer or "default"},
        variants=entries,
        bundle_tolerances=bundle_tolerances(info.manifest),
    )
    apply_tolerances(report, options.tolerances)
    return ParityRun(report, matrices)


def write_parity(run: ParityRun, out: str | Path, plots: bool = True) -> Path:
    """``report.json``, ``report.md``, the score matrices and the plots, into folder ``out``."""
    from itmrt.reports.markdown import parity_markdown
    from itmrt.reports.schema import write_json

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, matrix in run.matrices.items():
        atomic_save_float32_npy(folder / name, matrix)
    if plots:
        from itmrt.reports.plots import parity_plots

        run.report["plots"] = parity_plots(run.report, run.matrices, folder)
    write_json(folder / "report.json", run.report)
    atomic_write_text(folder / "report.md", parity_markdown(run.report))
    return folder
