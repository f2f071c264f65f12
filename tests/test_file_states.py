"""Files found as listed are hashed again only when they changed, in this process and in later ones
(itmrt.file_states): a later process skips the hash of a file left as it was, a changed file is hashed and
refused, a file written just before its hash is not recorded, and a cache folder others can write is not used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itmrt import file_states
from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.runtime.gallery import read_gallery

from runtime_helpers import make_bundle, region_features

PROBE = """
import hashlib, sys
real, hashed = hashlib.sha256, [0]
class Counted:  # every sha256 of this process, by the bytes it hashed
    def __init__(self, data=b"", **_kwargs):
        self.inner = real()
        self.update(data)
    def update(self, data):
        hashed[0] += memoryview(data).nbytes
        self.inner.update(data)
    def hexdigest(self):
        return self.inner.hexdigest()
hashlib.sha256 = Counted
from itmrt import file_states
file_states.TICK_NS = 0
from itmrt.scale import open_shards
open_shards(sys.argv[1], threads=1, warn=lambda m: None)
print(hashed[0])
"""


@pytest.fixture()
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh record folder for this test, and this process's memory of verified files emptied."""
    folder = tmp_path / "verified"
    monkeypatch.setenv(file_states.CACHE_ENV, str(folder))
    monkeypatch.setattr(file_states, "TICK_NS", 0)
    for kind in (file_states.LISTED, file_states.FINITE_EMBEDDINGS):
        kind.forget()
    yield folder
    for kind in (file_states.LISTED, file_states.FINITE_EMBEDDINGS):
        kind.forget()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("file-states")
    runtime = load(make_bundle(root / "model")[0], threads=1, warn=lambda m: None)
    return {"root": root, "runtime": runtime, "features": region_features(12, seed=3)}


def _hashes_in_a_fresh_process(gallery: Path, env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, str(gallery)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("storage", ["exact", "compact"])
def test_a_later_process_hashes_only_the_files_that_changed(small: dict[str, Any], records: Path,
                                                            storage: str, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from itmrt.scale import IndexSpec, ShardingOptions, index_sharded

    gallery = tmp_path / "gallery"
    index_sharded(small["runtime"], small["features"], gallery,
                  ShardingOptions(6, "float16", IndexSpec("regions", regions_storage=storage)))
    env = {**os.environ, file_states.CACHE_ENV: str(records)}
    stored = sum(f.stat().st_size for f in gallery.rglob("*.npy"))
    first = _hashes_in_a_fresh_process(gallery, env)
    assert first >= stored and len(list(records.iterdir())) > 0
    again = _hashes_in_a_fresh_process(gallery, env)
    assert first - again >= stored  # no .npy hashed again: only documents
    assert _hashes_in_a_fresh_process(gallery, {**env, file_states.CACHE_ENV: "off"}) - again >= stored
    # one file changed in place (same size): hashed again, and refused
    target = next(gallery.glob("shard-00001/region_residuals.npy" if storage == "compact" else
                               "shard-00001/image_embeddings.npy"))
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    done = subprocess.run([sys.executable, "-c", PROBE, str(gallery)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode != 0 and "does not match the sha256" in done.stderr.strip().splitlines()[-1]


def test_a_changed_embeddings_file_is_hashed_again_and_refused(small: dict[str, Any], records: Path,
                                                                tmp_path: Path) -> None:
    gallery = small["runtime"].index(small["features"], tmp_path / "plain")
    read_gallery(gallery.path)
    assert len(list(records.iterdir())) == 1
    file_states.FINITE_EMBEDDINGS.forget()
    read_gallery(gallery.path)  # from the record alone
    path = gallery.path / "image_embeddings.npy"
    array = np.load(path)
    array[0, 0, 0] += 1.0
    with open(path, "r+b") as handle:  # in place: the same inode and size
        handle.seek(-array.nbytes, os.SEEK_END)
        handle.write(array.tobytes())
    with pytest.raises(ItmrtError, match="does not match the sha256"):
        read_gallery(gallery.path)


def test_a_file_written_just_before_its_hash_is_remembered_in_memory_only(small: dict[str, Any], records: Path,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_states, "TICK_NS", 60 * 10**9)  # every file here was written within the last minute
    gallery = small["runtime"].index(small["features"], tmp_path / "fresh")
    read_gallery(gallery.path)
    assert not records.exists() or not list(records.iterdir())
    state = file_states.file_state(gallery.path / "image_embeddings.npy", gallery.manifest.embeddings.sha256)
    assert file_states.FINITE_EMBEDDINGS.known(state)


@pytest.mark.parametrize("setting", ["shared", "off", "not-a-folder"])
def test_no_record_is_kept_where_others_could_write_them_or_when_switched_off(
        small: dict[str, Any], records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    gallery = small["runtime"].index(small["features"], tmp_path / "g")
    if setting == "shared":
        records.mkdir()
        records.chmod(0o777)
    elif setting == "off":
        monkeypatch.setenv(file_states.CACHE_ENV, "off")
    else:
        records.write_text("")  # a file where the folder should be: no record can be written
    read_gallery(gallery.path)  # works all the same
    if setting == "shared":
        assert not list(records.iterdir())
    file_states.FINITE_EMBEDDINGS.forget()
    if setting == "shared":  # a record others could have planted is not believed
        state = file_states.file_state(gallery.path / "image_embeddings.npy", gallery.manifest.embeddings.sha256)
        records.chmod(0o700)
        file_states.FINITE_EMBEDDINGS.remember(state, file_states.hash_started())
        file_states.FINITE_EMBEDDINGS.forget()
        assert file_states.FINITE_EMBEDDINGS.known(state)
        records.chmod(0o777)
        file_states.FINITE_EMBEDDINGS.forget()
        assert not file_states.FINITE_EMBEDDINGS.known(state)
        records.chmod(0o700)


def test_files_of_one_content_are_read_once_and_shared_read_only_while_unchanged(
        small: dict[str, Any], records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faiss")
    from itmrt.scale import IndexSpec, ShardingOptions, index_sharded, open_shards

    gallery = tmp_path / "compact"
    index_sharded(small["runtime"], small["features"], gallery,
                  ShardingOptions(4, "float16", IndexSpec("regions", regions_storage="compact")))
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # shards opened one after another (side by side, two
    # shards opened at once may each read the file before either holds it)
    open_shards(gallery, threads=1, warn=lambda m: None)  # every file hashed once, and found as listed
    shards = open_shards(gallery, threads=1, warn=lambda m: None).shards
    centroids = [shard.gallery.embeddings.centroids for shard in shards]
    assert len(centroids) == 3 and all(c is centroids[0] for c in centroids)  # one build: one set of centroids
    assert not centroids[0].flags.writeable
    # a shard whose copy of the file changed is read (and refused), not handed the shared copy
    target = gallery / "shard-00002" / "region_centroids.npy"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(ItmrtError, match="does not match the sha256"):
        open_shards(gallery, threads=1, warn=lambda m: None)
    del shards, centroids
