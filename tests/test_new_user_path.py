"""What a new user meets first: the shipped models and their vocabulary, sample data with every default split,
and the messages of the commands they run on them (unknown words, a wrong --images, Ctrl-C, a mismatched
gallery, progress in a log, help texts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from itmrt.export.bundle import ExportOptions, export_bundle
from itmrt.train.recipes import SHIPPED_FILES, SHIPPED_VOCAB, make_sample_data

from cli_helpers import run_cli

ASSETS = Path(__file__).resolve().parents[1] / "itmrt" / "assets"
SMALL_EXPORT = ExportOptions(max_batch=16, max_length=24, parity_batch_images=3, parity_batch_captions=4)

pytestmark = pytest.mark.skipif(not (ASSETS / SHIPPED_FILES["naaf"]).is_file(), reason="no shipped small NAAF")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sample data, the shipped NAAF and SCAN exported with the shipped vocabulary, and a NAAF gallery."""
    root = tmp_path_factory.mktemp("new-user")
    data = make_sample_data(root / "data", 6)
    for family in ("naaf", "scan"):
        export_bundle(ASSETS / SHIPPED_FILES[family], ASSETS / SHIPPED_VOCAB, root / family, SMALL_EXPORT)
    return {"root": root, "data": data, "naaf": root / "naaf", "scan": root / "scan"}


def test_the_shipped_vocabulary_is_the_models_and_sample_data_has_every_default_split(world) -> None:
    from itmrt.families.checkpoints import load_checkpoint
    from itmrt.models.native import recorded_vocab_sha256
    from itmrt.text.vocab import Vocabulary

    shipped = Vocabulary.from_json(ASSETS / SHIPPED_VOCAB)
    for file in SHIPPED_FILES.values():
        assert recorded_vocab_sha256(load_checkpoint(ASSETS / file)) == shipped.sha256, file
    assert Vocabulary.from_json(world["data"] / "vocab.json") == shipped
    for split in ("train", "dev", "test"):  # calibrate/build default to train, eval/parity to test
        assert (world["data"] / f"{split}_ims.npy").is_file() and (world["data"] / f"{split}_caps.txt").is_file()


def test_sample_data_command_refuses_a_folder_that_holds_something(tmp_path: Path, capsys) -> None:
    assert run_cli(capsys, "sample-data", "--out", str(tmp_path / "d"), "--images", "2").code == 0
    assert json.loads((tmp_path / "d" / "train_meta.json").read_text())["split"] == "train"
    again = run_cli(capsys, "sample-data", "--out", str(tmp_path / "d"), "--images", "2")
    assert again.code == 2 and "not empty" in again.err and "pass --overwrite" in again.err


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB file system (tmpfs; skipped where this process may not mount one)."""
    folder = tmp_path / "small"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):  # no mount command, or it hangs
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root and a system that allows it)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)


@pytest.mark.parametrize("images", ["8", "100001"])
def test_sample_data_too_large_for_the_disk_or_any_trial_is_refused_at_once(small_disk: Path, images: str) -> None:
    """8 images (4.7 MB) on a 2 MB disk: the process died of SIGBUS writing its memory-mapped features, half a
    dataset left in staging; --images was accepted up to 2^24 (10 TB at 0.3 MB an image). Now both are one line
    before any work."""
    done = subprocess.run([sys.executable, "-m", "itmrt", "sample-data", "--out", str(small_disk / "d"), "--images",
                           images], capture_output=True, text=True, timeout=120, cwd=small_disk,
                          env={**os.environ, "PYTHONPATH": str(ASSETS.parents[1])})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert ("GB free" if images == "8" else "100000") in lines[0], lines[0]
    assert list(small_disk.iterdir()) == []


def test_infer_reports_unknown_words_and_a_caption_with_none_known(world, tmp_path: Path, capsys) -> None:
    captions = tmp_path / "caps.txt"
    captions.write_text("zzyzx qwertyuiop\n" + (world["data"] / "test_caps.txt").read_text().splitlines()[0] + "\n\n")
    result = run_cli(capsys, "infer", str(world["naaf"]), "--images", str(world["data"] / "test_ims.npy"),
                     "--captions", str(captions), "--out", str(tmp_path / "r.jsonl"))
    assert result.code == 0, result.err  # a blank line after the last caption is no error
    warning = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "2 of " in warning[0] and "no known word at all (caption 1)" in warning[0]


def test_infer_names_the_captions_layout_it_reads(world, tmp_path: Path, capsys) -> None:
    captions = tmp_path / "caps.txt"
    captions.write_text("a caption\n\nanother\n")
    result = run_cli(capsys, "infer", str(world["naaf"]), "--images", str(world["data"] / "test_ims.npy"),
                     "--captions", str(captions), "--out", str(tmp_path / "r.jsonl"))
    assert result.code == 2 and "line 2 is empty" in result.err and "per image" not in result.err


def test_eval_reports_unknown_words(world, capsys) -> None:
    result = run_cli(capsys, "eval", str(ASSETS / SHIPPED_FILES["naaf"]), "--vocab", str(ASSETS / SHIPPED_VOCAB),
                     "--data", str(world["data"]), "--split", "test", "--no-progress")
    assert result.code == 0, result.err
    assert "0 of " in result.out and "are not in the vocabulary" in result.out


@pytest.mark.parametrize("command", ["infer", "index"])
def test_a_text_file_as_images_for_a_region_feature_bundle_is_named(world, tmp_path: Path, capsys,
                                                                    command: str) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("photo.jpg\n")
    args = ["--captions", str(world["data"] / "test_caps.txt")] if command == "infer" else []
    result = run_cli(capsys, command, str(world["naaf"]), "--images", str(listing), *args,
                     "--out", str(tmp_path / "out"))
    assert result.code == 2 and len(result.err.splitlines()) == 1
    assert f"--images {listing} is not a .npy features file" in result.err and "region features" in result.err


def test_ctrl_c_says_so_in_one_line_with_status_130(world, tmp_path: Path, capsys, monkeypatch) -> None:
    from itmrt.runtime.api import Runtime

    def interrupted(self: Runtime) -> float:  # Ctrl-C lands while the runtime warms up
        raise KeyboardInterrupt

    monkeypatch.setattr(Runtime, "warmup", interrupted)
    result = run_cli(capsys, "index", str(world["naaf"]), "--images", str(world["data"] / "test_ims.npy"),
                     "--out", str(tmp_path / "gallery"))
    assert result.code == 130 and result.err == "error: interrupted (Ctrl-C)\n"
    assert not (tmp_path / "gallery").exists()


def test_serve_refuses_a_gallery_another_bundle_made_before_it_binds(world, tmp_path: Path, capsys) -> None:
    pytest.importorskip("uvicorn")
    gallery = tmp_path / "gallery"
    assert run_cli(capsys, "index", str(world["naaf"]), "--images", str(world["data"] / "test_ims.npy"),
                   "--out", str(gallery), "--no-warmup").code == 0
    result = run_cli(capsys, "serve", str(world["scan"]), "--gallery", str(gallery), "--port", "0")
    assert result.code == 2 and result.err.startswith("error: gallery ") and "another bundle" in result.err
    assert len(result.err.splitlines()) == 1 and "listening" not in result.out + result.err


def test_bench_prints_progress_lines_when_stderr_is_a_log(world, tmp_path: Path, capsys) -> None:
    args = ["bench", str(world["naaf"]), "--variants", "ort:fp32", "--batch-sizes", "1", "--repeats", "1",
            "--warmup", "0", "--captions", "4", "--images", "2", "--no-plots"]
    result = run_cli(capsys, *args, "--report", str(tmp_path / "a"))  # 7 stages x 1 batch size
    assert result.code == 0 and "bench ort:fp32: 7 to do" in result.err and "7 of 7 done in" in result.err
    quiet = run_cli(capsys, *args, "--report", str(tmp_path / "b"), "--no-progress")
    assert quiet.code == 0 and quiet.err == ""


def test_help_keeps_square_brackets_and_shows_no_type_tags_on_flags(capsys) -> None:
    result = run_cli(capsys, "infer", "--help")
    assert result.code == 0 and "itmrt[ray]" in " ".join(result.out.split())
    assert "<bool>" not in result.out and "--overwrite" in result.out


def test_demo_parity_verdict_uses_the_parity_tolerances() -> None:
    from itmrt.demo import _parity_verdict

    figures = {"ort:fp32": {"rsum_change": 0.0, "t2i_top1_agreement": 1.0},
               "ort:int8": {"rsum_change": -5.0, "t2i_top1_agreement": 0.99}}
    verdict = _parity_verdict(figures)
    assert "ort:fp32 pass" in verdict and "ort:int8 FAIL" in verdict and "int8 |rsum change| <= 3" in verdict


def test_query_waits_for_a_service_and_says_why_it_gave_up(tmp_path: Path, capsys) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    captions = tmp_path / "caps.txt"
    captions.write_text("a caption\n")
    result = run_cli(capsys, "query", f"http://127.0.0.1:{port}", "--captions", str(captions), "--wait-s", "0.5")
    assert result.code == 2 and "was not ready within --wait-s 0.5: cannot reach" in result.err
