"""A pipe (FIFO) where a bundle or gallery file should be: refused at once in one line, never a command that
waits forever for a writer (and then ignores SIGTERM, its reading thread stuck in the kernel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itmrt.runtime import load
from itmrt.scale import IndexSpec, ShardingOptions, index_sharded

from runtime_helpers import make_bundle, random_captions, region_features

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("faiss")
    root = tmp_path_factory.mktemp("fifos")
    bundle = make_bundle(root / "model")[0]
    runtime = load(bundle, threads=1, warn=lambda m: None)
    features = region_features(30, seed=2)
    np.save(root / "features.npy", features)
    (root / "captions.txt").write_text("\n".join(random_captions(3, seed=4)) + "\n")
    runtime.index(features, root / "plain")
    index_sharded(runtime, features, root / "flat", ShardingOptions(10, None, IndexSpec("flat")))
    index_sharded(runtime, features, root / "compact",
                  ShardingOptions(10, "float16", IndexSpec("regions", regions_storage="compact")))
    return {"root": root, "bundle": bundle}


def _run(world: dict[str, Any], *args: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "itmrt", *[str(a) for a in args]]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=world["root"])
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command[2:])} still waiting after {TIMEOUT_S} s")


def _fifo_in(copy_of: Path, name: str, into: Path) -> Path:
    """A copy of ``copy_of`` at ``into`` with its file ``name`` replaced by a FIFO."""
    shutil.copytree(copy_of, into)
    (into / name).unlink()
    os.mkfifo(into / name)
    return into


@pytest.mark.parametrize(("gallery", "name"), [
    ("plain", "image_embeddings.npy"),
    ("plain", "gallery.json"),
    ("flat", "gallery.json"),
    ("flat", "shard-00001/gallery.json"),
    ("flat", "shard-00001/shortlist.faiss"),
    ("flat", "shard-00001/global_vectors.npy"),
    ("flat", "shard-00002/image_embeddings.npy"),
    ("compact", "shard-00001/region_centroids.npy"),
    ("compact", "shard-00001/region_codes.npy"),
    ("compact", "shard-00001/region_residuals.npy"),
])
def test_a_fifo_among_a_gallerys_files_is_refused_in_one_line(world: dict[str, Any], tmp_path: Path,
                                                              gallery: str, name: str) -> None:
    folder = _fifo_in(world["root"] / gallery, name, tmp_path / "g")
    done = _run(world, "infer", folder, "--captions", world["root"] / "captions.txt", "--out", tmp_path / "o.jsonl",
                "--direction", "t2i", "--top-k", 3, "--shortlist", 5)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error:") and ("regular file" in lines[0] or "not a gallery" in lines[0]), lines
    assert not (tmp_path / "o.jsonl").exists()


def test_a_fifo_as_a_bundles_manifest_is_refused_in_one_line(world: dict[str, Any], tmp_path: Path) -> None:
    bundle = _fifo_in(world["bundle"], "manifest.json", tmp_path / "b")
    for args in (["--gallery", world["root"] / "plain"], ["--images", world["root"] / "features.npy"]):
        done = _run(world, "infer", bundle, *args, "--captions", world["root"] / "captions.txt",
                    "--out", tmp_path / "o.jsonl")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), done.stderr
