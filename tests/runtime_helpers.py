"""Small models, bundles and data shared by the runtime tests (tiny sizes: the CPU is shared)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 50
REGIONS = 10
IMG_DIM = 64
WORDS = [f"word{i}" for i in range(VOCAB - 4)]


def naaf_opt(**extra: Any) -> dict[str, Any]:
    return {"vocab_size": VOCAB, "img_dim": IMG_DIM, "embed_size": 32, "word_dim": 16, "thres_safe": 0.05, **extra}


def make_vocab(folder: Path) -> Path:
    from itmrt.text.vocab import Vocabulary

    path = folder / "vocab.json"
    Vocabulary.from_words(WORDS).to_json(path)
    return path


def make_checkpoint(folder: Path, family: str = "naaf", opt: dict[str, Any] | None = None, seed: int = 0) -> Path:
    import torch

    from itmrt.families.released import matcher_from_opt, save_released_checkpoint

    torch.manual_seed(seed)
    matcher = matcher_from_opt(opt or naaf_opt(), family)
    path = folder / f"{family}.pth.tar"
    save_released_checkpoint(path, matcher.eval())
    return path


def make_bundle(folder: Path, family: str = "naaf", opt: dict[str, Any] | None = None, seed: int = 0,
                max_length: int = 12) -> tuple[Path, Path, Path]:
    """(bundle, checkpoint, vocab) of a small random model."""
    from itmrt.export.bundle import ExportOptions, export_bundle

    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_vocab(folder)
    checkpoint = make_checkpoint(folder, family, opt, seed)
    bundle = folder / "bundle"
    export_bundle(checkpoint, vocab, bundle, ExportOptions(num_regions=REGIONS, max_batch=16, max_length=max_length))
    return bundle, checkpoint, vocab


def make_cmpm_bundle(folder: Path, max_over_padding: bool = False) -> Path:
    """A small random CMPM bundle (32 x 32 images); ``max_over_padding`` as the released code pools."""
    import torch

    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.families.cmpm.model import CMPMModel
    from itmrt.families.released import save_native

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = CMPMModel(VOCAB, 16, 12, 32, width_mult=0.25, image_size=32, max_over_padding=max_over_padding).eval()
    save_native(folder / "cmpm.safetensors", model)
    export_bundle(
        folder / "cmpm.safetensors", make_vocab(folder), folder / "bundle", ExportOptions(max_batch=16, max_length=12)
    )
    return folder / "bundle"


def random_captions(count: int, seed: int = 0, min_words: int = 1, max_words: int = 8) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(min_words, max_words + 1)))) for _ in range(count)]


def region_features(count: int, seed: int = 0) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).standard_normal((count, REGIONS, IMG_DIM))).astype(np.float32)
