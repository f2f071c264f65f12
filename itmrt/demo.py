"""``itmrt demo``: the whole pipeline on built-in data, offline, in a few minutes on a CPU.

Stages, one function each:

1. :func:`make_demo_data` - a synthetic test split (region features and
   captions) re-created from the seed the shipped models were trained with; its
   images come in confusable pairs (B = A's objects plus one extra object X);
2. :func:`score_reference` - the small trained NAAF shipped in
   ``itmrt/assets/`` (trained here quickly when it is missing) and the SCAN
   trained the same way, scored with the PyTorch reference;
3. :func:`export_stage` - export to an ONNX bundle (threshold frozen, TensorRT
   op check, parity);
4. :func:`build_precisions` - FP16 and calibrated INT8 graphs for ONNX Runtime,
   and TensorRT engines where TensorRT is installed;
5. :func:`retrieve` - retrieval through the torch-free runtime at every
   precision, compared with the reference, and a short latency summary;
6. :func:`show_mismatched_words` - NAAF's point: captions that name an object
   one image of a pair lacks, ranked by NAAF and by SCAN side by side, and the
   mismatched-word accuracies of both over the split.

Everything lands in one folder (``itmrt-demo/`` by default) that the user can
inspect afterwards and the next demo run replaces.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.errors import ItmrtError
from itmrt.publish import atomic_write_text

DEMO_MARKER = ".itmrt-demo"
DEMO_TEST_IMAGES = 100
SHIPPED_NAAF = "naaf_small.pth.tar"
SHIPPED_SCAN = "scan_small.pth.tar"
EXAMPLE_GALLERY = 50  # the example queries rank the split's first 50 images
EXAMPLES = 2

Log = Callable[[str], None]


@dataclass
class DemoResult:
    folder: Path
    recall: dict[str, dict[str, float]] = field(default_factory=dict)  # NAAF variant -> recall table
    baseline_recall: dict[str, dict[str, float]] = field(default_factory=dict)  # "torch scan" -> recall table
    parity: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> error figures
    latency: dict[str, Any] = field(default_factory=dict)
    mismatch: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # model -> comparison -> figures
    examples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class DemoData:
    """The demo's test split and what its images hold."""

    folder: Path
    split: Any  # itmrt.data.precomp.PrecompSplit
    meta: dict[str, Any]

    @property
    def vocab(self) -> Path:
        return self.folder / "vocab.json"


@dataclass
class ReferenceScores:
    """The PyTorch reference's score matrices (images x captions) of the models the demo compares."""

    checkpoint: Path
    naaf: np.ndarray
    scan: np.ndarray | None  # None when this install ships no SCAN


def _prepare_folder(folder: Path) -> None:
    if folder.exists():
        if not (folder / DEMO_MARKER).exists():
            raise ItmrtError(f"{folder} exists and was not made by itmrt demo; pass another --out or remove it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_text(folder / DEMO_MARKER, "made by itmrt demo; the next demo run replaces this folder\n")


def shipped_model(name: str) -> Path | None:
    """Path of a model shipped in ``itmrt/assets/``, or None when this install has none."""
    try:
        path = Path(str(resources.files("itmrt") / "assets" / name))
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return path if path.is_file() else None


def run_demo(out: str | Path = "itmrt-demo", log: Log = print, progress: Any = None) -> DemoResult:
    """Run the demo into ``out``; returns the figures it printed."""
    from itmrt.publish import atomic_write_text

    folder = Path(out)
    _prepare_folder(folder)
    result = DemoResult(folder)
    started = time.perf_counter()
    log("1/6 synthetic test data: region features and captions; images in pairs, B = A's objects + one more")
    data = make_demo_data(folder / "data", log)
    log("2/6 the small trained NAAF and SCAN, PyTorch reference")
    reference = score_reference(folder, data, result, log)
    log("3/6 export NAAF to an ONNX bundle")
    bundle = export_stage(reference.checkpoint, data, folder / "bundle", log)
    log("4/6 precision variants")
    precisions = ["fp32"] + build_precisions(bundle, data.folder, log, result)
    log("5/6 retrieval with the torch-free runtime (ONNX Runtime, CPU)")
    deployed = retrieve(bundle, precisions, data, reference.naaf, result, log)
    log("6/6 NAAF's point: a word the image does not hold lowers the match")
    show_mismatched_words(data, deployed, reference, result, log)
    _print_summary(result, data.split, log)
    log(f"demo finished in {time.perf_counter() - started:.0f} s; everything is in {folder}/")
    summary = {"recall": result.recall, "baseline_recall": result.baseline_recall, "parity": result.parity,
               "latency": result.latency,
               "mismatched_words": result.mismatch, "examples": result.examples, "notes": result.notes}
    atomic_write_text(folder / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    return result


def make_demo_data(folder: Path, log: Log) -> DemoData:
    """The test split (and dev and train splits, for calibration), drawn like the shipped models' training data."""
    from itmrt.data.precomp import PrecompSplit
    from itmrt.metrics.mismatched_words import read_meta
    from itmrt.train.recipes import make_sample_data

    # train too: `itmrt calibrate` and `build` sample --split train by default, so every command runs on this folder
    make_sample_data(folder, DEMO_TEST_IMAGES)
    split = PrecompSplit.open(folder, "test")
    log(f"  {split.num_images} images x {split.num_regions} regions x {split.img_dim}, {split.num_captions} captions")
    return DemoData(folder, split, read_meta(folder, "test"))


def score_reference(folder: Path, data: DemoData, result: DemoResult, log: Log) -> ReferenceScores:
    """NAAF (and SCAN, where shipped) on the test split with the PyTorch reference."""
    from itmrt.families.checkpoints import load_checkpoint
    from itmrt.models.evaluate import evaluate_split
    from itmrt.text.vocab import Vocabulary

    checkpoint = shipped_model(SHIPPED_NAAF)
    if checkpoint is None:
        checkpoint = _train_quick_naaf(folder, log)
        result.notes.append("no shipped model in this install: trained a quick one (lower recall than the shipped one)")
    vocab = Vocabulary.from_json(data.vocab)
    scores: dict[str, np.ndarray] = {}
    # (model, checkpoint, the recall table it fills and its row there)
    rows = (
        ("naaf", checkpoint, result.recall, "torch"),
        ("scan", shipped_model(SHIPPED_SCAN), result.baseline_recall, "torch scan"),
    )
    for name, path, recall, row in rows:
        if path is None:
            result.notes.append("no shipped SCAN in this install: the NAAF-SCAN comparison is left out")
            continue
        model = load_checkpoint(path).eval()
        timer = time.perf_counter()
        recall[row], scores[name] = evaluate_split(model, vocab, data.split)
        options: dict[str, Any] = dict(getattr(model, "opt", {}))
        extra = f"thres_safe {options['thres_safe']:.4f}, " if "thres_safe" in options else ""
        log(f"  {path.name}: {extra}rsum {recall[row]['rsum']:.1f} ({time.perf_counter() - timer:.1f} s)")
    return ReferenceScores(checkpoint, scores["naaf"], scores.get("scan"))


def _train_quick_naaf(folder: Path, log: Log) -> Path:
    from itmrt.train.recipes import make_region_data
    from itmrt.train.trainer import TrainConfig, train

    data = make_region_data(folder / "train-data")
    config = TrainConfig(family="naaf", data_dir=str(data), out_dir=str(folder / "train-run"), epochs=2,
                         embed_size=128, word_dim=64)
    return train(config, log=lambda message: log(f"  {message}")).best_checkpoint


def export_stage(checkpoint: Path, data: DemoData, bundle: Path, log: Log) -> Path:
    from itmrt.export.bundle import ExportOptions, export_bundle

    export_bundle(checkpoint, data.vocab, bundle, ExportOptions(), log=lambda message: log(f"  {message}"))
    return bundle


def build_precisions(bundle: Path, data_dir: Path, log: Log, result: DemoResult) -> list[str]:
    """FP16 and calibrated INT8 graphs (and engines where TensorRT exists); returns the precisions built."""
    from itmrt.build.orchestration import build_bundle
    from itmrt.precision.precision_graphs import PrecisionOptions

    built = []
    for precision in ("fp16", "int8"):
        options = PrecisionOptions(calib_data=data_dir, split="dev", progress=False)
        outcome = build_bundle(bundle, precision, options, log=lambda message: log(f"  {message}"))
        built.append(precision)
        if not outcome.engines_built and outcome.no_engine_reason and precision == "fp16":
            result.notes.append(f"no TensorRT engine was built: {outcome.no_engine_reason}")
    return built


def retrieve(bundle: Path, precisions: list[str], data: DemoData, reference: np.ndarray, result: DemoResult,
             log: Log) -> np.ndarray:
    """Score the split at every precision with the runtime; returns the fp32 score matrix."""
    from itmrt.metrics.recall import recall_table
    from itmrt.runtime import load

    split = data.split
    fp32_scores = reference
    for precision in precisions:
        runtime = load(bundle, precision=precision, warn=lambda message: None)
        runtime.warmup()  # the first call compiles the fused CPU scorer (numba) and sizes ORT's buffers
        t0 = time.perf_counter()
        image_emb = runtime.encode_images(split.images)
        t1 = time.perf_counter()
        caption_emb = runtime.encode_captions(split.captions)
        t2 = time.perf_counter()
        ranked = runtime.rank(image_emb, caption_emb, top_k=10, keep_scores=True)
        t3 = time.perf_counter()
        assert ranked.scores is not None
        scores = ranked.scores
        table = result.recall[f"ort:{precision}"] = recall_table(scores)
        result.parity[f"ort:{precision}"] = _parity(scores, reference, table["rsum"] - result.recall["torch"]["rsum"])
        if precision == "fp32":
            fp32_scores = scores
            result.latency = {
                "encode_images_s": t1 - t0, "encode_captions_s": t2 - t1, "score_s": t3 - t2,
                "pairs_per_s": scores.size / (t3 - t2), "captions_per_s": split.num_captions / (t3 - t1),
                "scorer": runtime.scorer_kind,
            }
    log(f"  {', '.join(precisions)}: {split.num_images} images x {split.num_captions} captions each")
    return fp32_scores


def _parity(scores: np.ndarray, reference: np.ndarray, rsum_change: float) -> dict[str, float]:
    errors = np.abs(scores - reference)
    return {
        "max_abs_error": float(errors.max()),
        # NAAF's masks are discontinuous at the threshold: a similarity within float rounding of it
        # can land on either side in two implementations, so a few pairs may differ by more.
        "pairs_over_1e-5": int(np.count_nonzero(errors > 1e-5)),
        "t2i_top1_agreement": float(np.mean(np.argmax(scores, axis=0) == np.argmax(reference, axis=0))),
        "rsum_change": float(rsum_change),
        "pairs": int(scores.size),
    }


def show_mismatched_words(data: DemoData, naaf: np.ndarray, reference: ReferenceScores, result: DemoResult,
                          log: Log) -> None:
    """Example queries naming an object one image of a pair lacks, and the accuracies over the split."""
    from itmrt.metrics.mismatched_words import accuracy, comparisons

    found = comparisons(data.meta)
    models = {"NAAF (bundle, fp32)": naaf}
    if reference.scan is not None:
        models["SCAN (PyTorch)"] = reference.scan
    result.mismatch = {name: accuracy(scores, found) for name, scores in models.items()}
    log(f"  images come in pairs A and B: B holds A's objects plus one more, X. For each of the first {EXAMPLES} "
        f"pairs, B's first caption (it names X) ranked against the first {EXAMPLE_GALLERY} images:")
    for example in _pick_examples(data, found["own_image"], models):
        result.examples.append(example)
        _log_example(example, log)
    if not result.examples:
        return
    log(f"  take the score apart word by word: itmrt explain {result.folder / 'bundle'} "
        f"--images {data.folder / 'test_ims.npy'} "
        f"--image {result.examples[0]['lacking']} --caption \"{result.examples[0]['caption']}\"")


def _pick_examples(data: DemoData, own_image: Any, models: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The first caption of image B in each of the split's first :data:`EXAMPLES` pairs - by rule, not by hand."""
    chosen: list[int] = []
    for k in range(len(own_image)):
        pair = int(own_image.wrong[0][k])
        if len(chosen) < EXAMPLES and all(int(own_image.wrong[0][j]) != pair for j in chosen):
            chosen.append(k)
    examples = []
    for k in chosen:
        holding, caption, lacking = int(own_image.right[0][k]), int(own_image.right[1][k]), int(own_image.wrong[0][k])
        ranks = {name: [int(i) for i in np.argsort(-scores[:EXAMPLE_GALLERY, caption], kind="stable")[:3]]
                 for name, scores in models.items()}
        examples.append({"caption": data.meta["captions"][caption]["text"], "caption_index": caption,
                         "holding": holding, "lacking": lacking, "missing": data.meta["images"][lacking]["extra"],
                         "top3": ranks, "scores": {name: {"holding": float(s[holding, caption]),
                                                          "lacking": float(s[lacking, caption])}
                                                   for name, s in models.items()}})
    return examples


def _log_example(example: dict[str, Any], log: Log) -> None:
    log(f"  \"{example['caption']}\" - image {example['holding']} holds all of it; image {example['lacking']} "
        f"holds the same but no {example['missing']}")
    names = list(example["top3"])
    log("    " + "".join(f"{name + ', top 3':<44}" for name in names))
    for rank in range(3):
        cells = []
        for name in names:
            image = example["top3"][name][rank]
            mark = " <- lacks " + example["missing"] if image == example["lacking"] else ""
            cells.append(f"{rank + 1}. image {image:3d}{mark}")
        log("    " + "".join(f"{cell:<44}" for cell in cells))
    for name in names:
        figures = example["scores"][name]
        log(f"    {name}: score with image {example['holding']} {figures['holding']:.3f}, "
            f"with image {example['lacking']} {figures['lacking']:.3f}")


def _parity_verdict(parity: dict[str, dict[str, float]]) -> str:
    """One line: each variant against `itmrt parity`'s default tolerances for its precision (rsum change, top-1)."""
    from itmrt.reports.parity_report import DEFAULT_TOLERANCES

    verdicts, limits = [], []
    for variant, figures in parity.items():
        precision = variant.split(":")[-1]
        tolerance = DEFAULT_TOLERANCES[precision]
        passed = (abs(figures["rsum_change"]) <= tolerance["rsum_abs_delta"]
                  and figures["t2i_top1_agreement"] >= tolerance["top1_agreement_min"])
        verdicts.append(f"{variant} {'pass' if passed else 'FAIL'}")
        limits.append(f"{precision} |rsum change| <= {tolerance['rsum_abs_delta']:g}, "
                      f"top-1 >= {100 * tolerance['top1_agreement_min']:g}%")
    return (f"  verdict: {', '.join(verdicts)} (against `itmrt parity`'s default tolerances: {'; '.join(limits)}; "
            "`itmrt parity` also judges the score error and NAAF's decision flips)")


def _print_summary(result: DemoResult, split: Any, log: Log) -> None:
    from itmrt.metrics.mismatched_words import LABELS

    log("")
    log("recall (synthetic test split)          R@1/5/10 i2t           R@1/5/10 t2i        rsum")
    for variant, table in {**result.recall, **result.baseline_recall}.items():
        log(f"  {variant:<34} {table['i2t_r1']:5.1f} {table['i2t_r5']:5.1f} {table['i2t_r10']:5.1f}   "
            f"{table['t2i_r1']:5.1f} {table['t2i_r5']:5.1f} {table['t2i_r10']:5.1f}   {table['rsum']:6.1f}")
    if result.mismatch:
        names = "".join(f"{name:>24}" for name in result.mismatch)
        log(f"mismatched words: % right (median margin){names}   count")
        for key in ("own_caption", "own_image", "negated"):
            cells = [f"{t[key]['accuracy']:5.1f} ({t[key]['median_margin']:+.3f})" for t in result.mismatch.values()]
            count = next(iter(result.mismatch.values()))[key]["count"]
            log(f"  {LABELS[key]:<39}" + "".join(f"{cell:>24}" for cell in cells) + f"{count:>8d}")
        log("  (B's captions name an object X that image A lacks; the last row is linguistic negation, which NAAF "
            "does not model: both near chance, 50%)")
    pairs = next(iter(result.parity.values()), {}).get("pairs", 0)
    log(f"parity against the PyTorch reference   max |score error|   pairs > 1e-5 (of {pairs})   "
        "t2i top-1 agreement   rsum change")
    for variant, figures in result.parity.items():
        log(f"  {variant:<34} {figures['max_abs_error']:12.2e}   {figures['pairs_over_1e-5']:>19d}"
            f"   {100 * figures['t2i_top1_agreement']:18.1f}%   {figures['rsum_change']:+10.2f}")
    if result.parity:
        log(_parity_verdict(result.parity))
    lat = result.latency
    if lat:
        log(f"latency (ort:fp32, CPU, {lat['scorer']} scorer): encode {split.num_images} images "
            f"{lat['encode_images_s'] * 1e3:.0f} ms, "
            f"{split.num_captions} captions {lat['encode_captions_s'] * 1e3:.0f} ms, "
            f"score {lat['score_s'] * 1e3:.0f} ms ({lat['pairs_per_s']:,.0f} pairs/s)")
    for note in result.notes:
        log(f"note: {note}")
