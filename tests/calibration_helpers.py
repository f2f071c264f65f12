"""Small bundles and calibration folders for the calibration/engine tests (exported once per test module)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from itmrt.export.bundle import ExportOptions, export_bundle
from itmrt.families.released import matcher_from_opt, save_released_checkpoint
from itmrt.synthetic.region_features import make_synthetic_dataset
from itmrt.text.vocab import Vocabulary

IMG_DIM = 32
REGIONS = 6
EMBED = 16
THRESHOLD = 0.0123


def make_data(folder: Path, images: int = 40, img_dim: int = IMG_DIM, regions: int = REGIONS) -> Path:
    return make_synthetic_dataset(folder, {"train": images}, seed=3, img_dim=img_dim, num_regions=regions)


def make_naaf_bundle(folder: Path, data: Path) -> Path:
    """A NAAF bundle whose vocabulary is the synthetic data's (random weights, seeded)."""
    vocabulary = Vocabulary.from_json(data / "vocab.json")
    torch.manual_seed(0)
    opt = {
        "vocab_size": len(vocabulary), "img_dim": IMG_DIM, "embed_size": EMBED, "word_dim": 8, "thres_safe": THRESHOLD
    }
    checkpoint = folder / "naaf.pth.tar"
    save_released_checkpoint(checkpoint, matcher_from_opt(opt, "naaf"))
    bundle = folder / "bundle"
    export_bundle(
        checkpoint, data / "vocab.json", bundle, ExportOptions(num_regions=REGIONS, max_batch=64, max_length=24)
    )
    return bundle


def fresh_copy(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    return target
