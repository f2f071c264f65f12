"""What the sharded-gallery tests share: a small model, its images in one gallery and in 3 shards, captions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from itmrt.runtime import load
from itmrt.scale import ShardingOptions, index_sharded

from runtime_helpers import make_bundle, random_captions, region_features

N_IMAGES = 50


def quiet(_message: str) -> None:
    pass


def scale_setup(root: Path, seed: int, captions: int) -> dict[str, Any]:
    """A small NAAF bundle; ``N_IMAGES`` images as one gallery (``plain``) and as shards of 17 (``sharded``);
    the images' features and the captions as files too (for the CLI)."""
    bundle = make_bundle(root / "model")[0]
    runtime = load(bundle, threads=1, warn=quiet)
    features = region_features(N_IMAGES, seed=seed)
    np.save(root / "features.npy", features)
    texts = random_captions(captions, seed=seed + 1, max_words=10)
    (root / "captions.txt").write_text("\n".join(texts) + "\n")
    plain = runtime.index(features, root / "plain")
    index_sharded(runtime, features, root / "sharded", ShardingOptions(shard_images=17))
    return {"root": root, "bundle": bundle, "runtime": runtime, "features": features, "captions": texts,
            "encoded": runtime.encode_captions(texts), "plain": plain, "sharded": root / "sharded"}


def same_top_k(a: Any, b: Any, atol: float = 0.0) -> None:
    """Two top-k results: the same indices, and identical scores (within ``atol`` where given: a warmed
    runtime, as `serve`'s, takes NAAF's per-word steps in a compiled kernel that rounds differently)."""
    np.testing.assert_array_equal(a.indices, b.indices)
    if atol:
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=atol)
    else:
        np.testing.assert_array_equal(a.scores, b.scores)
