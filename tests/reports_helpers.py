"""A tiny bundle and precomputed split shared by the report tests (sizes kept small: the CPU is shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime_helpers import make_bundle, random_captions, region_features

IMAGES = 8


def make_bundle_and_data(folder: Path, images: int = IMAGES, seed: int = 0) -> tuple[Path, Path]:
    """(bundle, data folder with test_ims.npy / test_caps.txt of ``images`` images and 5 captions each)."""
    bundle, _, _ = make_bundle(folder / "model", seed=seed)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    np.save(data / "test_ims.npy", region_features(images, seed=seed + 1))
    (data / "test_caps.txt").write_text("\n".join(random_captions(5 * images, seed=seed + 2)) + "\n", encoding="utf-8")
    return bundle, data


def is_png(path: Path) -> bool:
    """A PNG that matplotlib can decode to a non-empty RGB(A) image."""
    import matplotlib.image as mpimg

    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pixels = mpimg.imread(path)
    return pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50 and float(pixels.std()) > 0
