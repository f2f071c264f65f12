"""Cold start: ``itmrt infer`` as a user runs it, a fresh process each time, against the released evaluation.

    python benchmarks/bench_cold_start.py [--runs 3] [--work /tmp/itmrt-cold-start]

Data: a NAAF at the released sizes (region features 36 x 2048, d = 1024,
word_dim 300, bi-GRU, Flickr30K's released vocabulary; random weights) exported
with ``itmrt export``, random region features and captions of 8 to 20 tokens
(``bench_flickr_size.prepare_bundle`` / ``write_inputs``; made once per --work).

Every timed run is a new process. ``itmrt infer --timings`` says where its time
went (start-up, import, load = bundle + sessions, kernels = the fused scorer's
numba kernels compiled or loaded from the cache, encoding, scoring, writing);
the total is the child's wall time measured from here. numba's cache is a
fresh folder of this benchmark (``NUMBA_CACHE_DIR``): the first run compiles
the kernels, every later run loads them. So is the record of files found as
listed (``ITMRT_VERIFIED_CACHE``, :mod:`itmrt.file_states`): (a) is measured
with the records of the earlier runs, and again with none (every file hashed,
as the first command after the files changed).

(a) time to first answer: one caption against a 1000-image gallery made by
    ``itmrt index`` (``itmrt infer GALLERY --captions one.txt``);
(b) 200 images x 1000 captions from region features, paired run by run with
    the released evaluation in its own fresh process (this script's
    ``released`` mode): the PyTorch reference encoders (the released model's
    modules) and the authors' one-caption-at-a-time test loop
    (``bench_scorer.released_loop_scores``), writing the score matrix;
(c) warm: in one process, the fused scorer and the released loop on the
    released side's embeddings, interleaved (best of --warm-rounds each);
    then the agreement of the two score matrices of (b): largest difference,
    and how many pairs differ by more than 1e-4 and have a similarity at
    NAAF's threshold (``itmrt.reports.agreement.threshold_ties``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flickr_size import prepare_bundle, write_inputs  # noqa: E402
from bench_scorer import released_loop_scores  # noqa: E402

STAGES = ("startup", "import", "load", "kernels", "encode_images", "encode_captions", "score", "write")


def released_evaluation(args: argparse.Namespace) -> None:
    """The released evaluation of ``--images`` x ``--captions``, timed by stage like ``itmrt infer --timings``."""
    from itmrt.timings import StageTimer, process_age

    timer = StageTimer()
    timer.add("startup", process_age() or 0.0)
    with timer.stage("import"):
        import torch

        from itmrt.data.precomp import read_captions
        from itmrt.families.checkpoints import load_checkpoint
        from itmrt.models.evaluate import encode_captions, encode_images
        from itmrt.text.vocab import Vocabulary
    with timer.stage("load"):
        model = load_checkpoint(args.checkpoint).eval()
        vocab = Vocabulary.from_json(args.vocab)
    with timer.stage("encode_images"), torch.no_grad():
        regions = encode_images(model, np.load(args.images, mmap_mode="r")).numpy()
    with timer.stage("encode_captions"):
        encoded = encode_captions(model, vocab, read_captions(args.captions))
        tokens = [encoded.embeddings[k, : int(m)].numpy() for k, m in enumerate(encoded.lengths)]
    scorer = model.scorer
    with timer.stage("score"):
        scores = released_loop_scores(regions, tokens, float(scorer.threshold), float(scorer.lambda_softmax),
                                      float(scorer.intra_factor))
    with timer.stage("write"):
        np.save(args.scores_out, scores)
    if args.embeddings_out:
        np.savez(args.embeddings_out, regions=regions, lengths=encoded.lengths.numpy(),
                 tokens=np.concatenate(tokens), threshold=float(scorer.threshold), lam=float(scorer.lambda_softmax),
                 intra=float(scorer.intra_factor))
    print("timings: " + json.dumps({**timer.as_dict(), "total": round(process_age() or 0.0, 3)}), file=sys.stderr)


def timed_run(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``command`` in a fresh process; its ``timings:`` line plus ``wall``, the time measured from outside."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in reversed(done.stderr.splitlines()) if x.startswith("timings: "))
    return {**json.loads(line[len("timings: "):]), "wall": wall}


def with_other(run: dict[str, float]) -> dict[str, float]:
    """``other``: the wall time no stage accounts for (reading the captions, the interpreter's exit)."""
    return {**run, "other": run["wall"] - sum(run.get(key, 0.0) for key in STAGES)}


def median_row(runs: list[dict[str, float]]) -> dict[str, float]:
    runs = [with_other(run) for run in runs]
    keys = [key for key in (*STAGES, "other", "wall") if any(key in run for run in runs)]
    return {key: statistics.median(run.get(key, 0.0) for run in runs) for key in keys}


def print_table(rows: list[tuple[str, dict[str, float]]]) -> None:
    keys = [key for key in (*STAGES, "other", "wall") if any(key in row for _, row in rows)]
    names = {"encode_images": "enc_images", "encode_captions": "enc_captions"}
    print(f"{'':46s}" + "".join(f"{names.get(key, key):>13s}" for key in keys))
    for name, row in rows:
        print(f"{name:46s}" + "".join(f"{row[key]:13.2f}" if key in row else f"{'-':>13s}" for key in keys))


def warm_and_agreement(bundle: Path, work: Path, rounds: int) -> None:
    """(c): warm scoring of the fused scorer against the released loop, and the two matrices' agreement."""
    from itmrt.reports.agreement import threshold_ties
    from itmrt.runtime import load
    from itmrt.runtime.encoders import CaptionEmbeddings

    saved = np.load(work / "released_embeddings.npz")
    regions, lengths, flat = saved["regions"], saved["lengths"].astype(np.int32), saved["tokens"]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = [flat[offsets[k] : offsets[k + 1]] for k in range(len(lengths))]
    runtime = load(bundle)
    runtime.warmup()
    captions = CaptionEmbeddings(flat, lengths, offsets)
    constants = (float(saved["threshold"]), float(saved["lam"]), float(saved["intra"]))
    best = {"fused": float("inf"), "released loop": float("inf")}
    for _ in range(rounds):
        started = time.perf_counter()
        runtime.rank(regions, captions, top_k=10, keep_scores=True)
        best["fused"] = min(best["fused"], time.perf_counter() - started)
        started = time.perf_counter()
        released_loop_scores(regions, tokens, *constants)
        best["released loop"] = min(best["released loop"], time.perf_counter() - started)
    pairs = regions.shape[0] * len(lengths)
    print(f"(c) warm scoring, {regions.shape[0]} x {len(lengths)} in one process ({runtime.scorer_kind} scorer), "
          f"best of {rounds}: fused {pairs / best['fused']:.0f} pairs/s, released loop "
          f"{pairs / best['released loop']:.0f} pairs/s: {best['released loop'] / best['fused']:.1f}x")
    ours, reference = np.load(work / "scores_itmrt.npy"), np.load(work / "scores_released.npy")
    difference = np.abs(ours.astype(np.float64) - reference)
    ties = threshold_ties(reference, ours, tokens, regions, constants[0], band=1e-4)
    print(f"agreement of (b)'s matrices: max |itmrt - released| {difference.max():.2e}; pairs over 1e-4: "
          f"{int((difference > 1e-4).sum())} of {difference.size}; pairs with a similarity within 1e-4 of the "
          f"threshold {constants[0]:.3g} (ties): {ties['tie_pairs']}; largest difference of the other pairs "
          f"{ties['max_abs_off_threshold']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh-process runs of each command (interleaved)")
    parser.add_argument("--warm-rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "itmrt-cold-start")
    args = parser.parse_args()
    print(f"load average (1, 5, 15 min) at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    bundle, checkpoint, words = prepare_bundle(args.work)
    gallery_images, one_caption = write_inputs(args.work, words, 1000, 1)
    images, captions = write_inputs(args.work, words, 200, 1000)
    itmrt = [sys.executable, "-m", "itmrt"]
    cache = tempfile.TemporaryDirectory(prefix="numba-cache-")
    records = tempfile.TemporaryDirectory(prefix="itmrt-verified-")
    env = {**os.environ, "NUMBA_CACHE_DIR": cache.name, "ITMRT_VERIFIED_CACHE": records.name}
    hashing = {**env, "ITMRT_VERIFIED_CACHE": "off"}  # every file hashed, as the first command after a change
    gallery = args.work / "gallery_1000"
    infer_a = [*itmrt, "infer", str(gallery), "--captions", str(one_caption), "--out", str(args.work / "a.jsonl"),
               "--top-k", "10", "--timings", "--no-progress", "--overwrite"]
    if not gallery.exists():  # --no-warmup: the kernels stay uncompiled for the first timed run
        subprocess.run([*itmrt, "index", str(bundle), "--images", str(gallery_images), "--out", str(gallery),
                        "--no-warmup"], env=env, check=True, capture_output=True)
    first = timed_run(infer_a, env)
    infer_b = [*itmrt, "infer", str(bundle), "--images", str(images), "--captions", str(captions),
               "--out", str(args.work / "b.jsonl"), "--scores-out", str(args.work / "scores_itmrt.npy"),
               "--top-k", "10", "--timings", "--no-progress", "--overwrite"]
    released = [sys.executable, __file__, "released", "--checkpoint", str(checkpoint),
                "--vocab", str(args.work / "vocab.json"), "--images", str(images), "--captions", str(captions),
                "--scores-out", str(args.work / "scores_released.npy"),
                "--embeddings-out", str(args.work / "released_embeddings.npz")]
    runs: dict[str, list[dict[str, float]]] = {"a": [], "a_hashed": [], "b": [], "released": []}
    for _ in range(args.runs):
        runs["a"].append(timed_run(infer_a, env))
        runs["a_hashed"].append(timed_run(infer_a, hashing))
        runs["b"].append(timed_run(infer_b, env))
        runs["released"].append(timed_run(released, env))
    cache.cleanup()
    records.cleanup()
    print(f"cold start, fresh processes, median of {args.runs} (seconds; 'wall' measured from outside); "
          f"cpu cores {os.cpu_count()}")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print_table([("(a) first run: kernels compiled (empty cache)", with_other(first)),
                 ("(a) 1 caption x 1000-image gallery", median_row(runs["a"])),
                 ("(a) the same, every file hashed (no records)", median_row(runs["a_hashed"])),
                 ("(b) itmrt infer, 200 images x 1000 captions", median_row(runs["b"])),
                 ("(b) released evaluation, same data", median_row(runs["released"]))])
    ratios = [r["wall"] / b["wall"] for r, b in zip(runs["released"], runs["b"])]
    print(f"(b) released evaluation / itmrt infer, end to end, pair by pair: {', '.join(f'{x:.2f}' for x in ratios)} "
          f"(median {statistics.median(ratios):.2f}x)")
    warm_and_agreement(bundle, args.work, args.warm_rounds)


def parse_released(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="the released evaluation, timed by stage")
    for name in ("--checkpoint", "--vocab", "--images", "--captions", "--scores-out"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--embeddings-out", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["released"]:
        released_evaluation(parse_released(sys.argv[2:]))
    else:
        main()
