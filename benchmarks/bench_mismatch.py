"""NAAF's point, measured: does a word the image does not hold lower the match?

    python benchmarks/bench_mismatch.py [--naaf CKPT --scan CKPT --data DIR] [--work DIR] [--json OUT]

On the synthetic data's confusable pairs (image B = image A's objects plus one
extra object X; see :mod:`itmrt.metrics.mismatched_words`), for each row below: rsum of
the test split, and how often

- ``own caption``: image A scores its own caption above a caption of B (which
  names X, absent from A), with the median margin;
- ``own image``: a caption of B scores image B above image A, median margin;
- ``'no X'``: a caption of A that says "no X" scores A above B (linguistic
  negation: a stated limitation, NAAF does not model the word "no").

Rows: NAAF (PyTorch reference); NAAF with the negative branch switched off at
test time (the paper's ablation: same weights and threshold); NAAF scored with
its training threshold ``thres`` instead of ``thres_safe`` (what the branch
does where it can fire); SCAN trained the same way; and the deployed NAAF
bundle at fp32, fp16 and int8 - made with the real pipeline (``itmrt export``,
``itmrt calibrate``, ``itmrt build --precision fp16|int8``) and scored by the
torch-free runtime - twice: as exported (``thres_safe`` frozen) and exported
with ``--threshold`` set to ``thres``, so that the quantised graphs are also
checked where the negative branch fires. ``flips`` counts mismatched-word
comparisons (both kinds) and 'no X' comparisons that come out the other way
round than in the row's PyTorch reference (NAAF, or NAAF at ``thres``). A
second table reads the deployed scorer graphs' own negative-branch decision
(``q < 0``) on the word X, against A and against B, with flips against the
same bundle's fp32 graph.

Defaults: the shipped small models and the recipe's synthetic data
(``itmrt.train.recipes.make_region_data``), made in ``--work`` (a temporary
folder unless given). The ONNX Runtime CPU provider runs float16 graphs partly
in float32, so the fp16 row is what this CPU deploys, not a GPU's float16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from itmrt.metrics.mismatched_words import COMPARISONS, accuracy, comparisons, flips, read_meta  # noqa: E402
from itmrt.metrics.recall import recall_table  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")


THRES_ROW = "NAAF, test threshold = thres"


def reference_rows(naaf: Path, scan: Path, data: Path, split: str) -> tuple[dict[str, np.ndarray], float]:
    """Score matrices of the PyTorch reference (NAAF, its two test-time variants, SCAN) and NAAF's ``thres``."""
    import torch

    from itmrt.data.precomp import PrecompSplit
    from itmrt.families.checkpoints import load_checkpoint
    from itmrt.families.matcher import CrossAttentionMatcher
    from itmrt.families.naaf.model import NAAFScorer
    from itmrt.models.evaluate import evaluate_split, load_vocabulary_for

    test = PrecompSplit.open(data, split)
    rows: dict[str, np.ndarray] = {}
    model = load_checkpoint(naaf).eval()
    if not isinstance(model, CrossAttentionMatcher) or not isinstance(model.scorer, NAAFScorer):
        raise SystemExit(f"{naaf} is not a NAAF checkpoint")
    vocab = load_vocabulary_for(model, data / "vocab.json")
    rows["NAAF"] = evaluate_split(model, vocab, test)[1]
    model.use_negative_branch(False)
    rows["NAAF, negative branch off"] = evaluate_split(model, vocab, test)[1]
    model.use_negative_branch(True)
    thres = float(model.opt["thres"])
    with torch.no_grad():
        model.scorer.threshold.fill_(thres)
    rows[THRES_ROW] = evaluate_split(model, vocab, test)[1]
    scan_model = load_checkpoint(scan).eval()
    rows["SCAN"] = evaluate_split(scan_model, load_vocabulary_for(scan_model, data / "vocab.json"), test)[1]
    return rows, thres


def itmrt(*args: str | Path) -> None:
    """Run one itmrt command as a user would; its output goes to stderr, a failure stops the benchmark."""
    command = [sys.executable, "-m", "itmrt", *(str(a) for a in args)]
    done = subprocess.run(command, check=False, stdout=sys.stderr, stderr=sys.stderr, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")


def deploy(naaf: Path, data: Path, bundle: Path, threshold: float | None = None) -> Path:
    """The bundle and its FP16 / INT8 graphs, made as docs/precision-and-engines.md does it (``threshold``:
    export's override)."""
    override = [] if threshold is None else ["--threshold", repr(threshold)]
    itmrt("export", naaf, "--vocab", data / "vocab.json", "--out", bundle, "--overwrite", *override)  # only a bundle
    itmrt("calibrate", bundle, "--data", data, "--samples", "64", "--min-samples", "32")
    itmrt("build", bundle, "--precision", "fp16")
    itmrt("build", bundle, "--precision", "int8")
    return bundle


def deployed_rows(bundle: Path, data: Path, split: str, label: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Score matrices of the torch-free runtime per precision, and its graphs' decisions on the word X."""
    from itmrt.data.precomp import PrecompSplit
    from itmrt.reports.mismatch import mismatched_word_decisions
    from itmrt.runtime import load

    test = PrecompSplit.open(data, split)
    meta = read_meta(data, split)
    own_image = comparisons(meta)["own_image"]
    rows: dict[str, np.ndarray] = {}
    decisions: dict[str, Any] = {}
    for precision in PRECISIONS:
        runtime = load(bundle, precision=precision, warn=lambda _m: None)
        images = runtime.encode_images(np.asarray(test.images))
        rows[f"{label} ort:{precision}"] = runtime.score(images, runtime.encode_captions(list(test.captions)))
        decisions[f"{label} ort:{precision}"] = mismatched_word_decisions(runtime, test.images, meta, own_image)
    return rows, decisions


def table(
    rows: dict[str, np.ndarray], found: dict[str, Any], references: dict[str, str]
) -> tuple[list[dict[str, Any]], str]:
    """One record per row and the printed table; flips against the row's reference (default: the first row)."""
    first = next(iter(rows))
    header = (f"{'model':<36} {'rsum':>6}  {'own caption % (margin)':>23}  {'own image % (margin)':>21}  "
              f"{chr(39) + 'no X' + chr(39) + ' %':>8}  {'flips: mismatched / no X':>24}")
    records, lines = [], [header]
    for name, scores in rows.items():
        acc = accuracy(scores, found)
        against = references.get(name, first)
        changed = flips(rows[against], scores, found)
        record = {"model": name, "rsum": recall_table(scores)["rsum"], "accuracy": acc, "flips": changed,
                  "flips_against": against}
        records.append(record)
        mismatched = changed["own_caption"] + changed["own_image"]
        lines.append(
            f"{name:<36} {record['rsum']:>6.1f}  {acc['own_caption']['accuracy']:>13.1f} "
            f"({acc['own_caption']['median_margin']:+.3f})"
            f"  {acc['own_image']['accuracy']:>11.1f} ({acc['own_image']['median_margin']:+.3f})  "
            f"{acc['negated']['accuracy']:>8.1f}  {mismatched:>17d} / {changed['negated']:<4d}"
        )
    counts = {name: len(found[name]) for name in COMPARISONS}
    lines.append(f"comparisons: own caption {counts['own_caption']}, own image {counts['own_image']}, "
                 f"'no X' {counts['negated']}")
    return records, "\n".join(lines)


def decision_table(decisions: dict[str, Any]) -> str:
    """Per deployed variant; flips against the fp32 graph of the same bundle."""
    header = (f"{'deployed':<30} {'X fires vs A (lacks X) %':>25} {'X fires vs B (holds X) %':>25} "
              f"{'flips vs fp32 (A / B)':>22}  {'X vs A: best sim - t, median / min':>35}")
    lines = [header]
    for name, found in decisions.items():
        summary, changed = found.summary(), found.flips(decisions[fp32_of(name)])
        lines.append(f"{name:<30} {summary['x_fired_on_lacking_image_%']:>25.1f} "
                     f"{summary['x_fired_on_holding_image_%']:>25.1f} "
                     f"{changed['x_on_lacking']:>14d} / {changed['x_on_holding']:<5d}  "
                     f"{summary['x_margin_on_lacking_image_median']:>+26.4f} / "
                     f"{summary['x_margin_on_lacking_image_min']:+.4f}")
    lines.append(f"({next(iter(decisions.values())).summary()['count']} captions of B, each against A and B)")
    return "\n".join(lines)


def fp32_of(name: str) -> str:
    """The fp32 variant's row name of a deployed row ("... ort:int8" -> "... ort:fp32")."""
    return name.rsplit("ort:", 1)[0] + "ort:fp32"


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from itmrt.demo import shipped_model
    from itmrt.train.recipes import SHIPPED_FILES, make_region_data

    naaf = args.naaf or shipped_model(SHIPPED_FILES["naaf"])
    scan = args.scan or shipped_model(SHIPPED_FILES["scan"])
    if naaf is None or scan is None:
        raise SystemExit("no shipped models in itmrt/assets: pass --naaf and --scan")
    data = args.data or work / "data"
    if args.data is None and not (data / "vocab.json").is_file():
        make_region_data(data)
    started = time.perf_counter()
    rows, thres = reference_rows(Path(naaf), Path(scan), Path(data), args.split)
    references: dict[str, str] = {}
    decisions: dict[str, Any] = {}
    if not args.no_deployed:
        for label, threshold, reference in (("NAAF", None, "NAAF"), ("NAAF at thres", thres, THRES_ROW)):
            folder = work / ("bundle" if threshold is None else "bundle_thres")
            bundle = deploy(Path(naaf), Path(data), folder, threshold)
            deployed, found_decisions = deployed_rows(bundle, Path(data), args.split, label)
            rows.update(deployed)
            decisions.update(found_decisions)
            references.update({name: reference for name in deployed})
    found = comparisons(read_meta(data, args.split))
    records, text = table(rows, found, references)
    print(f"\nNAAF's point on {data} ({args.split}): {Path(naaf).name} vs {Path(scan).name}; thres = {thres:.4f}")
    print(text)
    if decisions:
        print("\nthe deployed scorer graphs' negative-branch decision on the mismatched word X")
        print(decision_table(decisions))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return {"data": str(data), "split": args.split, "naaf": str(naaf), "scan": str(scan), "rows": records,
            "thres": thres,
            "decisions": {name: {**d.summary(), "flips_vs_fp32": d.flips(decisions[fp32_of(name)])}
                          for name, d in decisions.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--naaf", type=Path, help="NAAF checkpoint (default: the shipped small model)")
    parser.add_argument("--scan", type=Path, help="SCAN checkpoint (default: the shipped small model)")
    parser.add_argument("--data", type=Path, help="synthetic data folder (default: the recipe's, made in --work)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--work", type=Path, help="folder for the data and the bundle (default: a temporary one)")
    parser.add_argument("--no-deployed", action="store_true", help="PyTorch rows only (no bundle, no FP16/INT8)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="itmrt-mismatch-") as work:
            result = run(args, Path(work))
    if args.json is not None:
        from itmrt.publish import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
