"""Building a region-indexed gallery: compact shards built from the embeddings in memory (no dense file written)
are the shards the dense-then-index path makes, file for file; an append whose images changed in kind says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itmrt.runtime import load
from itmrt.runtime.gallery import EMBEDDINGS_FILE
from itmrt.scale import IndexSpec, SearchRequest, ShardingOptions, index_sharded, open_shards
from itmrt.scale.writer import ShardedWriter, image_chunks

from runtime_helpers import make_bundle, random_captions, region_features
from scale_helpers import quiet, same_top_k

pytest.importorskip("faiss")

COMPACT = IndexSpec("regions", regions_storage="compact", residual_bits=2)
VARYING = ("created", "build_seconds", "stage_seconds")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("region-build")
    runtime = load(make_bundle(root / "model")[0], threads=1, warn=quiet)
    return {"root": root, "runtime": runtime, "features": region_features(40, seed=11)}


def _without_varying(value: Any) -> Any:
    """A document with its timings and dates left out."""
    if isinstance(value, dict):
        return {key: _without_varying(item) for key, item in value.items() if key not in VARYING}
    if isinstance(value, list):
        return [_without_varying(item) for item in value]
    return value


def _dense_then_indexed(runtime: Any, features: np.ndarray, out: Path, dtype: str) -> None:
    """The path before the in-memory build: each shard written as dense embeddings, then indexed from them."""
    with ShardedWriter(out, runtime.bundle, ShardingOptions(16, dtype, COMPACT)) as writer:
        for chunk in image_chunks(features, 16):
            writer.add(lambda folder, chunk=chunk: runtime.index(chunk, folder, dtype=dtype))
        writer.commit()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_compact_build_writes_no_dense_embeddings_and_the_same_shards_as_indexing_them_after(
        model: dict[str, Any], dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, features, root = model["runtime"], model["features"], model["root"]
    _dense_then_indexed(runtime, features, root / f"dense-{dtype}", dtype)
    from itmrt.runtime import gallery as gallery_module

    def no_dense_file(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a compact build wrote dense embeddings")

    with monkeypatch.context() as patched:
        patched.setattr(gallery_module, "allocated_memmap", no_dense_file)
        index_sharded(runtime, features, root / f"memory-{dtype}", ShardingOptions(16, dtype, COMPACT))
        index_sharded(runtime, None, root / f"given-{dtype}", ShardingOptions(16, dtype, COMPACT),
                      embeddings=runtime.encode_images(features))
    before = root / f"dense-{dtype}"
    for built in (root / f"memory-{dtype}", root / f"given-{dtype}"):
        shards = sorted(p.name for p in built.glob("shard-*"))
        assert shards == sorted(p.name for p in before.glob("shard-*")) and len(shards) == 3
        for name in shards:
            files = sorted(p.name for p in (built / name).iterdir())
            assert files == sorted(p.name for p in (before / name).iterdir()) and EMBEDDINGS_FILE not in files
            for file in files:
                if file == "gallery.json":
                    document = _without_varying(json.loads((built / name / file).read_text()))
                    if built.name.startswith("given"):  # given embeddings: no encoder of this run made them
                        document.update(source="image features", backend="ort", precision="fp32")
                    assert document == _without_varying(json.loads((before / name / file).read_text()))
                else:
                    assert (built / name / file).read_bytes() == (before / name / file).read_bytes(), (name, file)
    captions = runtime.encode_captions(random_captions(5, seed=12, max_words=8))
    request = SearchRequest(k=4, shortlist=5)
    same_top_k(open_shards(root / f"memory-{dtype}", threads=1, warn=quiet).search(captions, request).t2i,
               open_shards(before, threads=1, warn=quiet).search(captions, request).t2i)


@pytest.mark.parametrize("spec", [IndexSpec("regions"), COMPACT], ids=["exact", "compact"])
def test_an_append_whose_regions_fit_the_centroids_worse_says_so_once_and_a_like_one_does_not(
        model: dict[str, Any], spec: IndexSpec) -> None:
    runtime, features, root = model["runtime"], model["features"], model["root"]
    gallery = root / f"drift-{spec.regions_storage}"
    index_sharded(runtime, features[:16], gallery, ShardingOptions(16, "float16", spec))
    heard: list[str] = []
    runtime.warn = heard.append
    try:
        index_sharded(runtime, features[:16], gallery, ShardingOptions(16), append=True)
        assert not [m for m in heard if "changed in kind" in m]
        rng = np.random.default_rng(5)
        other = rng.standard_normal((32, *runtime.encode_images(features[:1]).shape[1:])).astype(np.float32)
        other /= np.linalg.norm(other, axis=-1, keepdims=True)
        index_sharded(runtime, None, gallery, ShardingOptions(16), append=True, embeddings=other)
    finally:
        runtime.warn = quiet
    drift = [m for m in heard if "changed in kind" in m]
    assert len(drift) == 1 and "itmrt audit" in drift[0] and "--overwrite" in drift[0], heard
    assert len(open_shards(gallery, threads=1, warn=quiet).shards) == 4


def test_embeddings_too_large_for_memory_are_encoded_in_a_scratch_file_that_is_not_published(
        model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from itmrt.runtime import gallery as gallery_module

    runtime, features, root = model["runtime"], model["features"], model["root"]
    monkeypatch.setattr(gallery_module, "memory_for_scratch", lambda: 0)
    index_sharded(runtime, features, root / "scratch", ShardingOptions(16, "float16", COMPACT))
    assert not list((root / "scratch").rglob(gallery_module.SCRATCH_FILE))
    assert not list((root / "scratch").rglob(EMBEDDINGS_FILE))
    if not (root / "dense-float16").is_dir():
        _dense_then_indexed(runtime, features, root / "dense-float16", "float16")
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        for name in ("region_residuals.npy", "region_codes.npy", "region_centroids.npy"):
            dense = (root / "dense-float16" / shard / name).read_bytes()
            assert (root / "scratch" / shard / name).read_bytes() == dense
