"""End-to-end retrieval at Flickr30K test size: time and peak memory of `itmrt infer`.

    python benchmarks/bench_flickr_size.py [--images 1000] [--captions 5000] [--work /tmp/itmrt-flickr-size]

A NAAF with the released sizes (region features 36 x 2048, d = 1024, word_dim 300,
Flickr30K's released vocabulary, random weights: speed and memory do not depend
on training) is exported to a bundle with ``itmrt export``; random region
features and captions of 8 to 20 tokens drawn from the vocabulary are written;
then ``itmrt infer`` scores every image against every caption (top-10 both ways)
in a child process whose wall time and peak resident memory (ru_maxrss) are
reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RELEASED_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "vocab" / "f30k_precomp_vocab.json"
"""Flickr30K's released vocabulary (8481 words), where ../shared is beside the project."""


def prepare_bundle(work: Path, vocab_file: Path | None = RELEASED_VOCAB, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """(bundle, checkpoint, caption words): a NAAF at the released sizes with random weights, exported
    with ``itmrt export`` once per ``work`` folder. The vocabulary is ``vocab_file`` where it exists,
    else 8477 made-up words (the size of Flickr30K's)."""
    import torch

    from itmrt.families.released import matcher_from_opt, save_released_checkpoint
    from itmrt.text.vocab import Vocabulary

    work.mkdir(parents=True, exist_ok=True)
    vocab_path = work / "vocab.json"
    if vocab_file is not None and vocab_file.is_file():
        vocab = Vocabulary.from_json(vocab_file)
    else:
        vocab = Vocabulary.from_words([f"w{i}" for i in range(8477)])
    if not vocab_path.exists():
        vocab.to_json(vocab_path)
    words = sorted(word for word in vocab.word2idx if word.isalpha() and word.isascii())
    checkpoint = work / "naaf_released_size.pth.tar"
    bundle = work / "bundle"
    if not bundle.exists():
        torch.manual_seed(seed)
        opt = {"img_dim": 2048, "embed_size": 1024, "word_dim": 300, "vocab_size": len(vocab), "thres_safe": 0.1,
               "precomp_enc_text_type": "basic"}
        save_released_checkpoint(checkpoint, matcher_from_opt(opt, family="naaf"))
        subprocess.run([sys.executable, "-m", "itmrt", "export", str(checkpoint), "--vocab", str(vocab_path),
                        "--out", str(bundle)], check=True)
    return bundle, checkpoint, words


def write_inputs(work: Path, words: list[str], n_images: int, n_captions: int, seed: int = 0) -> tuple[Path, Path]:
    """Region features ``[n_images, 36, 2048]`` and ``n_captions`` captions of 8 to 20 tokens, once per size."""
    rng = np.random.default_rng(seed)
    features = work / f"images_{n_images}.npy"
    captions_path = work / f"captions_{n_captions}.txt"
    if not features.exists():
        out = np.lib.format.open_memmap(features, mode="w+", dtype=np.float32, shape=(n_images, 36, 2048))
        for start in range(0, n_images, 100):
            stop = min(start + 100, n_images)
            out[start:stop] = np.abs(rng.standard_normal((stop - start, 36, 2048), dtype=np.float32))
        out.flush()
        del out
    if not captions_path.exists():
        lengths = rng.integers(6, 19, size=n_captions)  # + <start>/<end> = 8..20 tokens
        captions_path.write_text("\n".join(" ".join(rng.choice(words, size=n)) for n in lengths) + "\n")
    return features, captions_path


def prepare(work: Path, n_images: int, n_captions: int, seed: int = 0) -> tuple[Path, Path, Path]:
    bundle, _checkpoint, words = prepare_bundle(work, seed=seed)
    features, captions = write_inputs(work, words, n_images, n_captions, seed)
    return bundle, features, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/itmrt-flickr-size"))
    parser.add_argument("--memory-mb", type=int, default=32, help="the scorer's tile budget (itmrt infer --memory-mb)")
    args = parser.parse_args()
    bundle, features, captions = prepare(args.work, args.images, args.captions)
    results = args.work / "results.jsonl"
    results.unlink(missing_ok=True)
    command = [sys.executable, "-m", "itmrt", "infer", str(bundle), "--captions", str(captions), "--images",
               str(features),
               "--top-k", "10", "--memory-mb", str(args.memory_mb), "--out", str(results), "--no-progress"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    pairs = args.images * args.captions
    summary = {"images": args.images, "captions": args.captions, "pairs": pairs, "seconds": round(seconds, 1),
               "pairs_per_s": round(pairs / seconds), "peak_rss_mb": round(peak_mb), "command": " ".join(command[1:])}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
