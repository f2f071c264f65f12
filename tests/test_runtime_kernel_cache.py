"""The fused scorer's numba kernels compile once per machine: later processes load them from numba's cache.

Every check runs in fresh Python processes, as a user's commands do. Where numba
puts the cache (``numba/core/caching.py``, its locator classes in order):
``NUMBA_CACHE_DIR`` when set; else ``__pycache__`` beside the module when that
folder can be made and written; else the per-user cache folder
(``$XDG_CACHE_HOME/numba``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

REPO_ROOT = Path(__file__).resolve().parents[1]

SCORE_ONCE = """
import json, numpy as np
from itmrt.runtime.fused import FusedNaafScorer
rng = np.random.default_rng(0)
images = rng.standard_normal((3, 5, 16)).astype(np.float32)
captions = rng.standard_normal((4, 6, 16)).astype(np.float32)
lengths = np.array([6, 2, 4, 5], dtype=np.int64)
scorer = FusedNaafScorer(0.1, 20.0, 5.0, threads=1)
scores = scorer.run({"image_embeddings": images, "caption_embeddings": captions, "lengths": lengths})[0]
assert scores.shape == (3, 4) and np.isfinite(scores).all()
stats = {k.py_func.__name__: k.stats for k in scorer.kernels.kernels()}
print(json.dumps({name: {"path": s.cache_path, "hits": sum(s.cache_hits.values()),
                         "misses": sum(s.cache_misses.values())} for name, s in stats.items()}))
"""

CACHE_PATH = """
import json
import itmrt, itmrt.runtime.fused_kernels as kernels
print(json.dumps({"package": itmrt.__file__, "paths": [k.stats.cache_path for k in kernels.kernels()]}))
"""


def _run(code: str, env: dict[str, str], pythonpath: Path = REPO_ROOT) -> dict:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("NUMBA_")}
    environment.update(env, PYTHONPATH=str(pythonpath))
    done = subprocess.run([sys.executable, "-c", code], env=environment, cwd=pythonpath, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _files(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_size for path in folder.rglob("*") if path.is_file()}


def test_kernels_load_from_the_cache_in_later_processes(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    env = {"NUMBA_CACHE_DIR": str(cache)}
    first = _run(SCORE_ONCE, env)
    assert first["score_tile"]["misses"] >= 1 and first["intra_weights"]["misses"] >= 1  # compiled here
    assert all(entry["path"].startswith(str(cache)) for entry in first.values())
    after_first = _files(cache)
    assert any(name.endswith(".nbc") for name in after_first)

    second = _run(SCORE_ONCE, env)
    assert all(entry["misses"] == 0 for entry in second.values()), second  # nothing compiled
    assert second["score_tile"]["hits"] >= 1 and second["intra_weights"]["hits"] >= 1, second
    after_second = _files(cache)

    third = _run(SCORE_ONCE, env)
    assert all(entry["misses"] == 0 for entry in third.values()), third
    assert _files(cache) == after_second == after_first  # the same files, the same sizes: no growth per run


def test_cache_location_follows_numba_rules(tmp_path: Path) -> None:
    """NUMBA_CACHE_DIR wins; else the package's __pycache__; else, when that cannot be written, the per-user folder."""
    copy = tmp_path / "site"
    shutil.copytree(REPO_ROOT / "itmrt", copy / "itmrt", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    user_cache = tmp_path / "xdg"
    env = {"XDG_CACHE_HOME": str(user_cache)}

    chosen = _run(CACHE_PATH, {**env, "NUMBA_CACHE_DIR": str(tmp_path / "explicit")}, copy)
    assert chosen["package"] == str(copy / "itmrt" / "__init__.py")
    assert all(path.startswith(str(tmp_path / "explicit")) for path in chosen["paths"])

    in_tree = _run(CACHE_PATH, env, copy)
    assert set(in_tree["paths"]) == {str(copy / "itmrt" / "runtime" / "__pycache__")}

    # A package folder the user cannot write (an install owned by root, a read-only image). Tests may run
    # as root, who can write anywhere, so the folder is made unusable by a file where __pycache__ would be.
    shutil.rmtree(copy / "itmrt" / "runtime" / "__pycache__")
    (copy / "itmrt" / "runtime" / "__pycache__").write_text("not a folder")
    per_user = _run(CACHE_PATH, env, copy)
    assert all(path.startswith(str(user_cache / "numba")) for path in per_user["paths"]), per_user
