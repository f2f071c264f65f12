"""CMPM precision variants: identity recall and score error of fp16 / int8 against fp32 (ONNX Runtime, CPU).

    itmrt export itmrt/assets/cmpm_small.safetensors --vocab DATA/vocab.json --out cmpm_bundle
    itmrt build cmpm_bundle --precision fp16
    itmrt calibrate cmpm_bundle --data DATA --split train
    python benchmarks/bench_cmpm_precision.py cmpm_bundle DATA

DATA is the synthetic image data the shipped CMPM was trained on:
``python -c "from itmrt.train.recipes import make_image_data; make_image_data('DATA')"``.
"""

from __future__ import annotations

import argparse

import numpy as np

from itmrt.data.images import ImageCaptionSplit, preprocess_images
from itmrt.metrics.recall import identity_recall_table
from itmrt.runtime import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("data")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    split = ImageCaptionSplit.open(args.data, args.split)
    pixels = preprocess_images(np.asarray(split.images))
    reference = None
    for precision in ("fp32", "fp16", "int8"):
        runtime = load(args.bundle, precision=precision, warn=lambda _message: None)
        scores = runtime.score(runtime.encode_images(pixels), runtime.encode_captions(split.captions))
        table = identity_recall_table(scores, split.image_labels, split.caption_labels)
        if reference is None:
            reference, base = scores, table["rsum"]
        print(f"{precision}: rsum {table['rsum']:.1f} (change {table['rsum'] - base:+.1f}), "
              f"i2t R@1 {table['i2t_r1']:.1f}, t2i R@1 {table['t2i_r1']:.1f}, "
              f"max |score - fp32| {float(np.abs(scores - reference).max()):.2e}")


if __name__ == "__main__":
    main()
