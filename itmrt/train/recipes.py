"""The small models the demo and the tests use: one recipe, deterministic, CPU-sized.

``make_small_models(out)`` generates the synthetic datasets (region features
for NAAF and SCAN, images for CMPM), trains a small NAAF, a small SCAN and a
small CMPM on them, and copies each best checkpoint into ``out`` together with
``vocab.json`` (the vocabulary all three were trained with: both synthetic
datasets share it) and ``recipe.json`` (the data and training settings, and
each model's validation recall, for the record). The models shipped in ``itmrt/assets/`` were made
with ``itmrt make-small-models --out itmrt/assets``.

The data are re-creatable from ``SMALL_REGION_DATA`` / ``SMALL_IMAGE_DATA``
alone (same seed, byte-identical files), so a shipped model and the data it was
trained on never need to travel together.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from itmrt.bundle.names import IMAGES, REGION_FEATURES
from itmrt.errors import ItmrtError
from itmrt.families import get
from itmrt.publish import atomic_write_text
from itmrt.synthetic.identity_images import make_synthetic_image_dataset
from itmrt.synthetic.region_features import make_synthetic_dataset

# Region-feature data: released feature size (2048), 36 regions, small splits.
SMALL_REGION_DATA: dict[str, Any] = {"num_images": {"train": 1000, "dev": 100, "test": 200}, "seed": 0, "img_dim": 2048}
SMALL_IMAGE_DATA: dict[str, Any] = {
    "num_identities": {"train": 300, "dev": 60, "test": 60}, "seed": 0, "image_size": 64
}
SMALL_TRAINING: dict[str, dict[str, Any]] = {
    "naaf": {"epochs": 12, "lr_decay_epoch": 8, "batch_size": 64, "learning_rate": 2e-3, "embed_size": 128,
             "word_dim": 64},
    "scan": {"epochs": 12, "lr_decay_epoch": 8, "batch_size": 64, "learning_rate": 2e-3, "embed_size": 128,
             "word_dim": 64},
    "cmpm": {"epochs": 12},
}
SHIPPED_FILES = {"naaf": "naaf_small.pth.tar", "scan": "scan_small.pth.tar", "cmpm": "cmpm_small.safetensors"}
SHIPPED_VOCAB = "vocab.json"
"""The vocabulary of the small models, beside them (the synthetic datasets' ``vocab.json``)."""


def make_region_data(folder: str | Path) -> Path:
    """The synthetic region-feature dataset the small NAAF and SCAN are trained and tested on."""
    return make_synthetic_dataset(folder, **SMALL_REGION_DATA)


def make_sample_data(folder: str | Path, test_images: int = 100, overwrite: bool = False) -> Path:
    """A small region-feature dataset drawn like the small models' data (same generator, seed and feature size).

    Splits: ``test`` (``test_images`` images), ``dev`` and ``train`` (half as many each), so every
    command's default split is there; ``vocab.json`` is the small models' vocabulary. The demo and
    ``itmrt sample-data`` make it.
    """
    settings = {key: value for key, value in SMALL_REGION_DATA.items() if key != "num_images"}
    others = max(1, test_images // 2)
    return make_synthetic_dataset(folder, {"test": test_images, "dev": others, "train": others},
                                  overwrite=overwrite, **settings)


def make_image_data(folder: str | Path) -> Path:
    """The synthetic image dataset the small CMPM is trained and tested on."""
    return make_synthetic_image_dataset(folder, **SMALL_IMAGE_DATA)


def make_small_models(
    out: str | Path,
    families: tuple[str, ...] = ("naaf", "scan", "cmpm"),
    work_dir: str | Path | None = None,
    device: str = "cpu",
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Train the small models and copy their best checkpoints to ``out``; returns family -> file.

    The data and training runs go to ``work_dir`` (kept), or to a temporary folder removed afterwards.
    Existing model files in ``out`` are replaced only with ``overwrite``.
    """
    existing = [Path(out) / SHIPPED_FILES[f] for f in families if (Path(out) / SHIPPED_FILES[f]).exists()]
    if existing and not overwrite:
        raise ItmrtError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another --out")
    if work_dir is not None:
        return _make_small_models(Path(out), families, Path(work_dir), device, progress, log)
    with tempfile.TemporaryDirectory(prefix="itmrt-recipe-") as work:
        return _make_small_models(Path(out), families, Path(work), device, progress, log)


def _make_small_models(
    out: Path,
    families: tuple[str, ...],
    work: Path,
    device: str,
    progress: Callable[[str, int], Callable[[int], None]] | None,
    log: Callable[[str], None],
) -> dict[str, Path]:
    from itmrt.families.cmpm.trainer import CMPMTrainConfig, train_cmpm
    from itmrt.train.trainer import TrainConfig, train

    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"region_data": SMALL_REGION_DATA, "image_data": SMALL_IMAGE_DATA,
                              "models": _earlier_records(out / "recipe.json", families)}
    written: dict[str, Path] = {}
    region_dir = work / "regions"
    if any(get(f).image_input == REGION_FEATURES for f in families) and not (region_dir / "vocab.json").is_file():
        log(f"making synthetic region data in {region_dir}")
        make_region_data(region_dir)
    for family in families:
        settings = SMALL_TRAINING[family]
        run_dir = work / f"run_{family}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        log(f"training a small {family}")
        if get(family).image_input == IMAGES:
            image_dir = work / "images"
            if not (image_dir / "vocab.json").is_file():
                make_image_data(image_dir)
            data_dir = image_dir
            result = train_cmpm(CMPMTrainConfig(data_dir=image_dir, out_dir=run_dir, device=device, **settings))
            best = result.best_checkpoint or result.last_checkpoint
            summary: dict[str, Any] = {"best_rsum": result.best_rsum, "history": result.history}
        else:
            data_dir = region_dir
            tresult = train(TrainConfig(family=family, data_dir=str(region_dir), out_dir=str(run_dir), device=device,
                                        **settings), progress=progress, log=log)
            best = tresult.best_checkpoint
            summary = {"best_rsum": tresult.best_rsum, "history": [vars(r) for r in tresult.history]}
        target = out / SHIPPED_FILES[family]
        shutil.copyfile(best, target)
        shutil.copyfile(data_dir / "vocab.json", out / SHIPPED_VOCAB)  # the same words for every family
        written[family] = target
        record["models"][family] = {"file": target.name, "training": settings, **summary}
        if get(family).learns_threshold and (run_dir / "thresholds.png").is_file():
            shutil.copyfile(run_dir / "thresholds.png", out / f"{family}_small_thresholds.png")
    atomic_write_text(out / "recipe.json", json.dumps(record, indent=2, default=str) + "\n")
    return written


def _earlier_records(recipe: Path, retrained: tuple[str, ...]) -> dict[str, Any]:
    """The models already in ``out`` that this run does not retrain keep their record in recipe.json."""
    if not recipe.is_file():
        return {}
    try:
        models = json.loads(recipe.read_text(encoding="utf-8")).get("models", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {family: entry for family, entry in models.items()
            if family not in retrained and (recipe.parent / SHIPPED_FILES.get(family, "")).is_file()}
