"""CLI faults (issue #24): outputs onto inputs, a full disk, an unwritable kernel cache, an encoder that overflows.

Each is one line and a non-zero exit, and leaves nothing behind: the inputs as
they were, no half-written gallery, no staging folder. The full disk is a real
one: a 256 KB tmpfs mounted for the test (skipped where mounting is not
allowed); the unwritable kernel cache is a process whose ``RLIMIT_FSIZE`` makes
every write past 100 bytes fail, as a full disk would.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli_helpers import run_cli
from runtime_helpers import make_bundle, random_captions, region_features
from serve_helpers import make_gallery

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-faults")
    bundle = make_bundle(root / "model")[0]
    gallery = make_gallery(bundle, root / "gallery", count=12)
    captions = root / "captions.txt"
    captions.write_text("\n".join(random_captions(3, seed=1)) + "\n")
    features = root / "features.npy"
    np.save(features, region_features(8, seed=2))
    return {"root": root, "bundle": bundle, "gallery": gallery, "captions": captions, "features": features}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line(result: Any, words: str) -> None:
    assert result.code == 2, (result.code, result.err)
    assert words in result.err and result.err.count("\n") == 1, result.err


def test_outputs_never_land_on_an_input(world: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    gallery, bundle = world["gallery"], world["bundle"]
    before = (digests(gallery), digests(bundle))
    link = tmp_path / "innocent.jsonl"
    link.symlink_to(gallery / "gallery.json")
    search = ["infer", str(gallery), "--captions", str(world["captions"])]
    cases = [
        [*search, "--out", str(gallery / "gallery.json"), "--overwrite"],
        [*search, "--out", str(tmp_path / "r.jsonl"), "--scores-out", str(gallery / "image_embeddings.npy"),
         "--overwrite"],
        [*search, "--out", str(tmp_path / "r.jsonl"), "--scores-out", str(bundle / "manifest.json"), "--overwrite"],
        [*search, "--out", str(link), "--overwrite"],
        [*search, "--out", str(gallery / "new.jsonl")],
        ["infer", str(bundle), "--gallery", str(gallery), "--captions", str(world["captions"]),
         "--out", str(world["captions"]), "--overwrite"],
        ["index", str(bundle), "--images", str(world["features"]), "--out", str(bundle), "--overwrite"],
        ["index", str(bundle), "--images", str(world["features"]), "--out", str(world["root"]), "--overwrite"],
    ]
    for args in cases:
        one_line(run_cli(capsys, *args), "this command reads")
    # Without --overwrite an input's file was first "already exists; pass --overwrite" (which would not help), and
    # infer called its gallery "the checkpoint or bundle or gallery" (a path inside it: "would write over" it).
    named = [([*search, "--out", str(gallery / "gallery.json")], f"--out {gallery / 'gallery.json'} would write "
              f"over the gallery {gallery} this command reads, --overwrite or not; choose a path outside it"),
             ([*search, "--out", str(gallery / "new.jsonl")], f"would write inside the gallery {gallery} this"),
             (["infer", str(bundle), "--gallery", str(gallery), "--captions", str(world["captions"]), "--out",
               str(gallery / "image_embeddings.npy")], f"would write over the gallery (--gallery) {gallery} this"),
             (["audit", str(gallery), "--captions", str(world["captions"]), "--out", str(world["captions"])],
              f"would write over the captions file {world['captions']} this command reads")]
    for args, words in named:
        one_line(run_cli(capsys, *args), words)
    assert (digests(gallery), digests(bundle)) == before
    assert run_cli(capsys, *search, "--out", str(tmp_path / "ok.jsonl")).code == 0


def test_every_command_keeps_its_outputs_off_its_inputs(world: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Not only infer and index: audit, eval, explain, query, export, parity and bench once wrote over a
    gallery's document, a data folder's captions or a checkpoint inside the bundle being replaced."""
    gallery, bundle, captions = world["gallery"], world["bundle"], world["captions"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "test_caps.txt").write_text("a caption\n")
    target = tmp_path / "old-bundle"
    shutil.copytree(bundle, target)
    shutil.copy(world["root"] / "model" / "naaf.pth.tar", target / "model.pth.tar")
    watched = [gallery, bundle, data, target]
    before = [digests(folder) for folder in watched], captions.read_bytes()
    cases = [
        (["audit", str(gallery), "--captions", str(captions), "--out", str(gallery / "gallery.json"), "--overwrite"],
         "this command reads"),
        (["audit", str(gallery), "--captions", str(captions), "--markdown", str(captions), "--overwrite"],
         "this command reads"),
        (["eval", str(target / "model.pth.tar"), "--vocab", str(bundle / "vocab.json"), "--data", str(data),
          "--json", str(data / "test_caps.txt"), "--overwrite"], "this command reads"),
        (["explain", str(bundle), "--images", str(gallery), "--image", "0", "--caption", "a dog", "--json",
          str(gallery / "gallery.json"), "--overwrite"], "this command reads"),
        (["query", "http://127.0.0.1:9", "--captions", str(captions), "--out", str(captions), "--overwrite"],
         "this command reads"),
        (["export", str(target / "model.pth.tar"), "--vocab", str(bundle / "vocab.json"), "--out", str(target),
          "--overwrite"], "this command reads"),
        (["export", str(world["root"] / "model" / "naaf.pth.tar"), "--vocab", str(target / "vocab.json"),
          "--out", str(target), "--overwrite"], "this command reads"),
        (["parity", str(target), "--data", str(data), "--report", str(target / "report"), "--overwrite"],
         "this command reads"),
        (["parity", str(target), "--data", str(data), "--report", str(data), "--overwrite"], "this command reads"),
        (["bench", str(target), "--report", str(target), "--overwrite"], "this command reads"),
    ]
    for args, words in cases:
        one_line(run_cli(capsys, *args), words)
    assert ([digests(folder) for folder in watched], captions.read_bytes()) == before


@pytest.fixture()
def small_disk(tmp_path: Path) -> Any:
    """A 256 KB file system of its own (tmpfs; needs the right to mount, else the test is skipped)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk case is not exercised")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_index_on_a_full_disk_is_one_line_and_leaves_nothing(world: dict[str, Path], tmp_path: Path,
                                                             small_disk: Path) -> None:
    """A memory-mapped gallery on a full disk died by SIGBUS (rc 135) and left a .partial folder."""
    features = tmp_path / "many.npy"
    np.save(features, region_features(1000, seed=3))  # 1000 x 10 x 32 float32 embeddings: 1.3 MB
    args = ["index", str(world["bundle"]), "--images", str(features), "--out", str(small_disk / "gallery")]
    script = f"from itmrt.cli.app import main\nmain({args!r})\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "No space left on device" in done.stderr and "disk is full" in done.stderr
    assert list(small_disk.iterdir()) == []  # no gallery, no .partial


def run_where_no_file_can_be_written(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter whose files cannot grow past 100 bytes (numba's kernel cache cannot be
    written: a full disk, as the process sees it), with its own empty cache folder."""
    limit = ("import resource, signal\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", limit + script], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)


def test_serve_starts_when_the_kernel_cache_cannot_be_written(world: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("numba")
    script = (
        "from itmrt.serve.searcher import open_runtime_searcher\n"
        f"s = open_runtime_searcher({str(world['bundle'])!r}, {str(world['gallery'])!r}, scorer='fused', "
        "warn=lambda m: print('warning:', m))\n"
        "print('warmed up', s.runtime.scorer_kind, s.warmup() > 0)\n"
    )
    done = run_where_no_file_can_be_written(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kernel cache cannot be written" in done.stdout and "warmed up fused True" in done.stdout, done.stdout


def test_infer_with_the_fused_scorer_runs_when_the_kernel_cache_cannot_be_written(world: dict[str, Path],
                                                                                    tmp_path: Path) -> None:
    """The runtime itself (what infer and eval score with) falls back, at the kernels' first use - no warm-up."""
    pytest.importorskip("numba")
    captions = [f"word{i} word{i + 1}" for i in range(1, 30)]
    script = (
        "from itmrt.runtime import load\n"
        f"rt = load({str(world['bundle'])!r}, scorer='fused', warn=lambda m: print('warning:', m))\n"
        f"found = rt.rank(rt.open_gallery({str(world['gallery'])!r}), rt.encode_captions({captions!r}), top_k=3)\n"
        "print('kernels', rt.fused._kernels is not None, 'rows', found.t2i.indices.shape[0])\n"
    )
    done = run_where_no_file_can_be_written(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kernel cache cannot be written" in done.stdout, done.stdout
    assert f"kernels True rows {len(captions)}" in done.stdout, done.stdout


def test_a_compact_region_gallery_is_searched_when_the_kernel_cache_cannot_be_written(world: dict[str, Path],
                                                                                      tmp_path: Path) -> None:
    """Compact storage's compiled decode and the residual stage's level gather fall back to kernels compiled in
    memory at their first call, as the scorers' kernels do (it died with numba's OSError before)."""
    pytest.importorskip("numba")
    pytest.importorskip("faiss")
    from itmrt.runtime import load
    from itmrt.scale import IndexSpec, ShardingOptions, index_sharded

    runtime = load(world["bundle"], threads=1, warn=lambda message: None)
    gallery = tmp_path / "compact"
    index_sharded(runtime, region_features(40, seed=5), gallery,
                  ShardingOptions(16, None, IndexSpec("regions", regions_storage="compact")))
    script = (
        "from itmrt.scale import SearchRequest, open_shards\n"
        f"shards = open_shards({str(gallery)!r}, threads=1, warn=lambda m: print('warning:', m))\n"
        "shards.runtime.warmup()\n"
        f"captions = shards.runtime.encode_captions({random_captions(3, seed=9)!r})\n"
        "found = shards.search(captions, SearchRequest(k=3, shortlist=5, rescore=16))\n"
        "print('found', found.t2i.indices.shape, shards.runtime.one_caption.kernel_loaded)\n"
    )
    done = run_where_no_file_can_be_written(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "found (3, 3) True" in done.stdout, done.stdout


def test_an_encoder_that_overflows_is_refused_naming_the_rows(world: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    features = region_features(10, seed=4)
    features[[3, 8]] *= np.float32(1e37)
    path = tmp_path / "huge.npy"
    np.save(path, features)
    result = run_cli(capsys, "index", str(world["bundle"]), "--images", str(path), "--out", str(tmp_path / "g"))
    one_line(result, "image 3, 8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.npy"]
    result = run_cli(capsys, "infer", str(world["bundle"]), "--images", str(path), "--captions",
                     str(world["captions"]), "--out", str(tmp_path / "r.jsonl"))
    one_line(result, "image 3, 8")


def test_sigterm_mid_index_cleans_up_like_ctrl_c(world: dict[str, Path], tmp_path: Path) -> None:
    """A killed `itmrt index` left its hidden staging folder (hundreds of MB at scale) until the next write."""
    features = tmp_path / "many.npy"
    np.save(features, region_features(6000, seed=4))
    out = tmp_path / "out"
    args = ["index", str(world["bundle"]), "--images", str(features), "--out", str(out), "--shard-images", "500",
            "--shortlist-index", "regions", "--no-progress"]
    script = f"from itmrt.cli.app import main\nmain({args!r})\n"
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*.partial/shard-*")) and process.poll() is None:
        assert time.monotonic() < deadline, "no shard was staged in 120 s"
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.skip("the index finished before it could be interrupted")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, (process.returncode, err)
    assert err == "error: terminated (SIGTERM)\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.npy"]  # no gallery, no staging folder


@pytest.mark.parametrize(("url", "words"), [
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://127.0.0.1:abc", "not a valid URL"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://exa mple.com", "spaces or control characters"),
    ("ftp://127.0.0.1:9", "not an http(s) URL"),
])
def test_query_refuses_a_malformed_url_in_one_line(world: dict[str, Path], url: str, words: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    one_line(run_cli(capsys, "query", url, "--captions", str(world["captions"])), words)


@pytest.mark.parametrize("split", ["../outside", "/etc/passwd", "a/b", ""])
def test_a_split_that_names_a_path_is_refused_in_one_line(world: dict[str, Path], split: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``--split`` is a file-name prefix inside ``--data``; a path there would read files outside it."""
    outside = world["root"] / "outside_ims.npy"  # what ../outside would have read
    np.save(outside, region_features(2, seed=3))
    data = world["root"] / "data"
    data.mkdir(exist_ok=True)
    for command in (["parity", str(world["bundle"]), "--report", str(tmp_path / "report")],
                    ["calibrate", str(world["bundle"])]):
        one_line(run_cli(capsys, *command, "--data", str(data), "--split", split), "split name")


def test_vocab_beside_a_bundle_or_gallery_is_refused_not_ignored(world: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    vocab = world["root"] / "vocab.json"
    vocab.write_text("{}")
    for source in (world["bundle"], world["gallery"]):
        one_line(run_cli(capsys, "infer", str(source), "--captions", str(world["captions"]), "--vocab", str(vocab),
                         "--out", str(tmp_path / f"{source.name}.jsonl")), "--vocab is for a checkpoint")
        assert not (tmp_path / f"{source.name}.jsonl").exists()
