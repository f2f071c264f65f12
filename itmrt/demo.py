"""``itmrt demo``: the whole pipeline on built-in data, offline, in a few minutes on a CPU.

1. synthetic test data (region features + captions with negations), re-created
   from the seed the shipped model was trained with;
2. the small trained NAAF shipped in ``itmrt/assets/`` (trained here quickly
   when it is missing), evaluated with the PyTorch reference;
3. export to an ONNX bundle (threshold frozen, TensorRT op check, parity);
4. precision variants (FP16, calibrated INT8) measured with ONNX Runtime, and
   TensorRT engines where TensorRT is installed;
5. retrieval through the torch-free runtime, compared with the reference, and a
   short latency summary; a few example queries with what the images hold.

Everything lands in one folder (``itmrt-demo/`` by default) that the user can
inspect afterwards and the next demo run replaces.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from itmrt.errors import ItmrtError

DEMO_MARKER = ".itmrt-demo"
DEMO_TEST_IMAGES = 100
SHIPPED_NAAF = "naaf_small.pth.tar"

Log = Callable[[str], None]


@dataclass
class DemoResult:
    folder: Path
    recall: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> recall table
    parity: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> error figures
    latency: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _prepare_folder(folder: Path) -> None:
    if folder.exists():
        if not (folder / DEMO_MARKER).exists():
            raise ItmrtError(f"{folder} exists and was not made by itmrt demo; pass another --out or remove it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / DEMO_MARKER).write_text("made by itmrt demo; the next demo run replaces this folder\n")


def shipped_model(name: str) -> Path | None:
    """Path of a model shipped in ``itmrt/assets/``, or None when this install has none."""
    try:
        path = Path(str(resources.files("itmrt") / "assets" / name))
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return path if path.is_file() else None


def run_demo(out: str | Path = "itmrt-demo", log: Log = print, progress: Any = None) -> DemoResult:
    """Run the demo into ``out``; returns the figures it printed."""

    from itmrt.data.metrics import recall_table
    from itmrt.data.precomp import PrecompSplit
    from itmrt.data.synthetic import make_synthetic_dataset
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.families.checkpoints import load_checkpoint
    from itmrt.models.evaluate import evaluate_split
    from itmrt.runtime import load
    from itmrt.text.vocab import Vocabulary
    from itmrt.train.recipes import SMALL_REGION_DATA

    folder = Path(out)
    _prepare_folder(folder)
    result = DemoResult(folder)
    started = time.perf_counter()

    log("1/5 synthetic test data (region features, captions that name absent objects)")
    data_dir = folder / "data"
    make_synthetic_dataset(data_dir, {"test": DEMO_TEST_IMAGES, "dev": 50}, seed=SMALL_REGION_DATA["seed"],
                           img_dim=SMALL_REGION_DATA["img_dim"])
    split = PrecompSplit.open(data_dir, "test")
    vocab_path = data_dir / "vocab.json"
    log(f"  {split.num_images} images x {split.num_regions} regions x {split.img_dim}, {split.num_captions} captions")

    log("2/5 the small trained NAAF, PyTorch reference")
    checkpoint = shipped_model(SHIPPED_NAAF)
    if checkpoint is None:
        checkpoint = _train_quick_naaf(folder, log)
        result.notes.append("no shipped model in this install: trained a quick one (lower recall than the shipped one)")
    model = load_checkpoint(checkpoint).eval()
    options: dict[str, Any] = dict(getattr(model, "opt", {}))
    torch_started = time.perf_counter()
    vocab = Vocabulary.from_json(vocab_path)
    table, reference_scores = evaluate_split(model, vocab, split)
    torch_seconds = time.perf_counter() - torch_started
    result.recall["torch"] = table
    log(f"  {checkpoint.name}: thres_safe {options.get('thres_safe', 0.0):.4f}, rsum {table['rsum']:.1f} "
        f"({torch_seconds:.1f} s)")

    log("3/5 export to an ONNX bundle")
    bundle = folder / "bundle"
    export_bundle(checkpoint, vocab_path, bundle, ExportOptions(), log=lambda message: log(f"  {message}"))

    log("4/5 precision variants")
    precisions = ["fp32"] + _build_precisions(bundle, data_dir, log, result)

    log("5/5 retrieval with the torch-free runtime (ONNX Runtime, CPU)")
    for precision in precisions:
        runtime = load(bundle, precision=precision, warn=lambda message: None)
        # Warm-up: the first call compiles the fused CPU scorer (numba) and sizes ORT's buffers.
        runtime.rank(runtime.encode_images(split.images[:2]), runtime.encode_captions(split.captions[:2]), top_k=1)
        t0 = time.perf_counter()
        image_emb = runtime.encode_images(split.images)
        t1 = time.perf_counter()
        caption_emb = runtime.encode_captions(split.captions)
        t2 = time.perf_counter()
        ranked = runtime.rank(image_emb, caption_emb, top_k=10, keep_scores=True)
        t3 = time.perf_counter()
        assert ranked.scores is not None
        scores = ranked.scores
        table = recall_table(scores)
        result.recall[f"ort:{precision}"] = table
        top1_ref = np.argmax(reference_scores, axis=0)
        errors = np.abs(scores - reference_scores)
        pairs = int(scores.size)
        result.parity[f"ort:{precision}"] = {
            "max_abs_error": float(errors.max()),
            # NAAF's masks are discontinuous at the threshold: a similarity within float rounding of it
            # can land on either side in two implementations, so a few pairs may differ by more.
            "pairs_over_1e-5": int(np.count_nonzero(errors > 1e-5)),
            "t2i_top1_agreement": float(np.mean(np.argmax(scores, axis=0) == top1_ref)),
            "rsum_change": table["rsum"] - result.recall["torch"]["rsum"],
            "pairs": pairs,
        }
        if precision == "fp32":
            result.latency = {
                "encode_images_s": t1 - t0, "encode_captions_s": t2 - t1, "score_s": t3 - t2,
                "pairs_per_s": pairs / (t3 - t2), "captions_per_s": split.num_captions / (t3 - t1),
                "scorer": runtime.scorer_kind,
            }
            _show_examples(runtime, image_emb[:50], split, data_dir, log)
    _print_summary(result, split, log)
    log(f"demo finished in {time.perf_counter() - started:.0f} s; everything is in {folder}/")
    (folder / "demo_summary.json").write_text(json.dumps(
        {"recall": result.recall, "parity": result.parity, "latency": result.latency, "notes": result.notes}, indent=2))
    return result


def _train_quick_naaf(folder: Path, log: Log) -> Path:
    from itmrt.train.recipes import make_region_data
    from itmrt.train.trainer import TrainConfig, train

    data = make_region_data(folder / "train-data")
    config = TrainConfig(family="naaf", data_dir=str(data), out_dir=str(folder / "train-run"), epochs=2,
                         embed_size=128, word_dim=64)
    return train(config, log=lambda message: log(f"  {message}")).best_checkpoint


def _build_precisions(bundle: Path, data_dir: Path, log: Log, result: DemoResult) -> list[str]:
    """FP16 and calibrated INT8 graphs (and engines where TensorRT exists); returns the precisions built."""
    from itmrt.calibration.precision_graphs import PrecisionOptions
    from itmrt.calibration.build import build_bundle

    built = []
    for precision in ("fp16", "int8"):
        options = PrecisionOptions(calib_data=data_dir, split="dev", progress=False)
        outcome = build_bundle(bundle, precision, options, log=lambda message: log(f"  {message}"))
        built.append(precision)
        if not outcome.engines_built and outcome.no_engine_reason and precision == "fp16":
            result.notes.append(f"no TensorRT engine was built: {outcome.no_engine_reason}")
    return built


def _show_examples(runtime: Any, image_emb: np.ndarray, split: Any, data_dir: Path, log: Log) -> None:
    meta_path = data_dir / "test_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    negations = [c for c in split.captions if " no " in f" {c} "]
    queries = list(dict.fromkeys(negations[:2] + split.captions[:1]))
    hits = runtime.search_text_to_image(queries, image_emb, k=3)
    log(f"  example queries (text -> image, top 3 of the first {len(image_emb)} images):")
    for q, (indices, scores) in enumerate(zip(hits.indices, hits.scores)):
        log(f"    \"{queries[q]}\"")
        for index, score in zip(indices, scores):
            holds = _objects_of(meta, int(index))
            log(f"      image {int(index):3d}  score {score:.3f}" + (f"  holds: {holds}" if holds else ""))


def _objects_of(meta: Any, image: int) -> str:
    if not isinstance(meta, dict):
        return ""
    images = meta.get("images")
    if not isinstance(images, list) or image >= len(images):
        return ""
    entry = images[image]
    objects = entry.get("objects") if isinstance(entry, dict) else None
    if not objects:
        return ""
    return ", ".join(f"{o.get('colour', '')} {o.get('noun', '')}".strip() if isinstance(o, dict) else str(o)
                     for o in objects)


def _print_summary(result: DemoResult, split: Any, log: Log) -> None:
    log("")
    log("recall (synthetic test split)          R@1/5/10 i2t           R@1/5/10 t2i        rsum")
    for variant, table in result.recall.items():
        log(f"  {variant:<34} {table['i2t_r1']:5.1f} {table['i2t_r5']:5.1f} {table['i2t_r10']:5.1f}   "
            f"{table['t2i_r1']:5.1f} {table['t2i_r5']:5.1f} {table['t2i_r10']:5.1f}   {table['rsum']:6.1f}")
    pairs = next(iter(result.parity.values()), {}).get("pairs", 0)
    log(f"parity against the PyTorch reference   max |score error|   pairs > 1e-5 (of {pairs})   t2i top-1 agreement   rsum change")
    for variant, figures in result.parity.items():
        log(f"  {variant:<34} {figures['max_abs_error']:12.2e}   {figures['pairs_over_1e-5']:>19d}"
            f"   {100 * figures['t2i_top1_agreement']:18.1f}%   {figures['rsum_change']:+10.2f}")
    lat = result.latency
    if lat:
        log(f"latency (ort:fp32, CPU, {lat['scorer']} scorer): encode {split.num_images} images {lat['encode_images_s'] * 1e3:.0f} ms, "
            f"{split.num_captions} captions {lat['encode_captions_s'] * 1e3:.0f} ms, "
            f"score {lat['score_s'] * 1e3:.0f} ms ({lat['pairs_per_s']:,.0f} pairs/s)")
    for note in result.notes:
        log(f"note: {note}")
