"""FP32 vs FP16 vs INT8 graphs of one bundle in ONNX Runtime on this CPU: accuracy and speed, one run.

    python benchmarks/bench_precision.py [--bundle B --data D] [--out results.json]

Without ``--bundle`` it exports a demo-size NAAF (region features 36 x 2048,
embeddings 1024) with *random* weights on a synthetic dataset: its recall is
near chance, so the rsum change says little; pass a trained bundle and its
data for meaningful accuracy. Reported per precision: rsum and its change,
max abs score error against FP32, the share of NAAF (word, image) branch
decisions that flip, and per-graph latency ratios against FP32 (plus the
scorer's similarity product alone). FP16 accuracy is measured with float16
rounding emulated (ORT's CPU provider would otherwise compute most float16
ops in float32); FP16 *speed* on a CPU is not representative of a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from itmrt.bundle.manifest import Manifest  # noqa: E402
from itmrt.bundle.names import PRECISIONS  # noqa: E402
from itmrt.metrics.recall import recall_table  # noqa: E402
from itmrt.precision.calib_data import (  # noqa: E402
    FeedMaker,
    StreamingCalibrationReader,
    open_calibration_data,
    ort_session,
)
from itmrt.precision.fp16 import emulation_session  # noqa: E402
from itmrt.precision.int8 import quantize_graph  # noqa: E402
from itmrt.precision.precision_graphs import PrecisionOptions, calibrate, make_fp16  # noqa: E402


def demo_bundle(work: Path) -> tuple[Path, Path]:
    import torch

    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.families.released import matcher_from_opt, save_released_checkpoint
    from itmrt.synthetic.region_features import make_synthetic_dataset
    from itmrt.text.vocab import Vocabulary

    data = make_synthetic_dataset(work / "data", {"train": 64, "test": 100}, seed=0, img_dim=2048, num_regions=36)
    vocabulary = Vocabulary.from_json(data / "vocab.json")
    torch.manual_seed(0)
    opt = {"vocab_size": len(vocabulary), "img_dim": 2048, "embed_size": 1024, "word_dim": 300, "thres_safe": 0.01}
    save_released_checkpoint(work / "naaf.pth.tar", matcher_from_opt(opt, "naaf"))
    bundle = work / "bundle"
    export_bundle(work / "naaf.pth.tar", data / "vocab.json", bundle, ExportOptions(max_batch=128, max_length=40))
    return bundle, data


def graph_path(bundle: Path, manifest: Manifest, precision: str, graph: str) -> Path:
    return bundle / manifest.graph_file(precision, graph)


def accuracy_session(path: Path, precision: str, extra_outputs: tuple[str, ...] = ()) -> Any:
    model = onnx.load(str(path))
    for name in extra_outputs:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.BOOL, None))
    return emulation_session(model) if precision == "fp16" else ort_session(model.SerializeToString())


def evaluate(bundle: Path, manifest: Manifest, data: Path, split: str, precision: str) -> dict[str, Any]:
    """Scores of the whole split (tiles of 100 captions) and NAAF's is_negative decisions of the first tile."""
    from itmrt.data.precomp import PrecompSplit
    from itmrt.text.vocab import Vocabulary

    test = PrecompSplit.open(data, split)
    vocabulary = Vocabulary.from_json(bundle / "vocab.json")
    image_input = manifest.graph("image_encoder").inputs[0].name
    naaf = manifest.family == "naaf"
    image_session = accuracy_session(graph_path(bundle, manifest, precision, "image_encoder"), precision)
    text_session = accuracy_session(graph_path(bundle, manifest, precision, "text_encoder"), precision)
    scorer_session = accuracy_session(
        graph_path(bundle, manifest, precision, "scorer"), precision, ("is_negative",) if naaf else ()
    )
    images = np.concatenate([
        image_session.run(None, {image_input: np.asarray(test.images[i : i + 50], dtype=np.float32)})[0]
        for i in range(0, test.num_images, 50)
    ])
    scores = np.zeros((test.num_images, test.num_captions), dtype=np.float32)
    decisions = None
    for start in range(0, test.num_captions, 100):
        tokens, lengths = vocabulary.encode_batch(test.captions[start : start + 100], max_length=40)
        tokens, lengths = tokens.astype(np.int32), lengths.astype(np.int32)
        captions = text_session.run(None, {"token_ids": tokens, "lengths": lengths})[0]
        outputs = scorer_session.run(
            None, {"image_embeddings": images, "caption_embeddings": captions, "lengths": lengths}
        )
        scores[:, start : start + 100] = outputs[0]
        if naaf and start == 0:
            mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
            decisions = outputs[1][:, mask]  # [images, real words of the tile]
    return {"scores": scores, "decisions": decisions}


def median_ms(session: Any, feeds: dict[str, np.ndarray], repeats: int) -> float:
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def similarity_product_ms(embed: int, regions: int, repeats: int, work: Path) -> dict[str, float]:
    """The scorer's [Bc, L, d] x [Bi, d, n] product alone, float32 vs symmetric int8 Q/DQ (min-max ranges)."""
    captions = helper.make_tensor_value_info("captions", TensorProto.FLOAT, [1, "bc", "l", embed])
    images = helper.make_tensor_value_info("images_t", TensorProto.FLOAT, ["bi", 1, embed, regions])
    sims = helper.make_tensor_value_info("sims", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["captions", "images_t"], ["sims"], name="sims_node")], "sims", [captions, images],
        [sims]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feeds = {
        "captions": (rng.standard_normal((1, 64, 20, embed)) / np.sqrt(embed)).astype(np.float32),
        "images_t": (rng.standard_normal((64, 1, embed, regions)) / np.sqrt(embed)).astype(np.float32),
    }
    reader = StreamingCalibrationReader(lambda: iter([feeds]), 1, "similarity", progress=False)
    quantized, _, _ = quantize_graph(model, "minmax", work / "sims.json", reader, [])
    return {
        "fp32_ms": median_ms(ort_session(model.SerializeToString()), feeds, repeats),
        "int8_ms": median_ms(ort_session(quantized.SerializeToString()), feeds, repeats),
    }


def speed(bundle: Path, manifest: Manifest, data: Path, repeats: int) -> dict[str, dict[str, float]]:
    calib = open_calibration_data(bundle, manifest, data, "train", 64, 1)
    images, tokens, lengths = next(calib.paired_batches(64))  # 64 images, 64 captions
    feeds = FeedMaker(bundle, manifest)
    result: dict[str, dict[str, float]] = {}
    for graph in ("image_encoder", "text_encoder", "scorer"):
        feed = feeds.feeds(graph, images, tokens, lengths)
        timings = {p: median_ms(ort_session(graph_path(bundle, manifest, p, graph)), feed, repeats) for p in PRECISIONS}
        result[graph] = {**{f"{p}_ms": round(t, 3) for p, t in timings.items()},
                         **{f"{p}_speedup": round(timings["fp32"] / timings[p], 2) for p in ("fp16", "int8")}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path, help="dataset folder (train split calibrates, --split evaluates)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    random_weights = args.bundle is None
    if random_weights:
        bundle, data = demo_bundle(work)
    else:
        if args.data is None:
            parser.error("--bundle needs --data")
        bundle, data = args.bundle, args.data
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    started = time.perf_counter()
    make_fp16(bundle, PrecisionOptions(calib_data=data, samples=32, min_samples=8, progress=False), log=log)
    fp16_seconds = time.perf_counter() - started
    started = time.perf_counter()
    manifest = calibrate(
        bundle, PrecisionOptions(calib_data=data, method=args.method, samples=64, min_samples=8, progress=False),
        log=log
    )
    int8_seconds = time.perf_counter() - started

    results: dict[str, Any] = {"bundle": str(bundle), "random_weights": random_weights, "method": args.method,
                               "fp16_build_s": round(fp16_seconds, 1), "int8_calibrate_s": round(int8_seconds, 1)}
    evaluated = {p: evaluate(bundle, manifest, data, args.split, p) for p in PRECISIONS}
    base = evaluated["fp32"]
    base_table = recall_table(base["scores"])
    results["fp32_rsum"] = round(base_table["rsum"], 2)
    for precision in ("fp16", "int8"):
        table = recall_table(evaluated[precision]["scores"])
        entry: dict[str, Any] = {
            "rsum": round(table["rsum"], 2),
            "rsum_change": round(table["rsum"] - base_table["rsum"], 2),
            "max_abs_score_error": float(np.abs(evaluated[precision]["scores"] - base["scores"]).max()),
        }
        if base["decisions"] is not None:
            entry["naaf_decision_flip_rate"] = float(np.mean(evaluated[precision]["decisions"] != base["decisions"]))
        results[precision] = entry
    results["speed"] = speed(bundle, manifest, data, args.repeats)
    sims = similarity_product_ms(
        int(manifest.dims["embed_size"]), int(manifest.dims["num_regions"]), args.repeats, work
    )
    results["speed"]["similarity_product"] = {**sims, "int8_speedup": round(sims["fp32_ms"] / sims["int8_ms"], 2)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
