"""Outputs claimed safely (issue #17, defects 9-10).

A file is claimed at rename time (two writers of one new name: one wins, the
other gets a one-line error and leaves nothing); ``--overwrite`` swaps a folder
in one step, or restores the old one; leftovers of writers that died are
removed by the next writer (only ours, only when their writer is gone);
outputs get the modes the umask gives.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hostile_helpers import Case, World, assert_one_line, hostile_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def case(hostile_world: World, tmp_path: Path) -> Case:
    return hostile_world.case(tmp_path)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_two_writers_of_one_new_file_one_wins_the_other_fails_cleanly(case: Case) -> None:
    """Defect 9: two concurrent `infer` runs to one --out both said "wrote" and the first result was lost."""
    script = "import sys; from itmrt.cli.app import main; main(sys.argv[1:])"
    args = [str(a) for a in case.infer()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen([sys.executable, "-c", script, *args], cwd=case.folder, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read() if run.stderr else "") for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.startswith("error: ") and loser.count("\n") == 1 and "already exists" in loser
    lines = [json.loads(line) for line in case.out.read_text().splitlines()]
    assert len(lines) == 4 + 6 and not list(case.folder.glob(".results.jsonl.*"))


def test_the_overwrite_decision_is_taken_at_the_rename(tmp_path: Path) -> None:
    from itmrt.publish import TargetExistsError, claim_file

    target = tmp_path / "results.jsonl"
    temp = tmp_path / ".results.jsonl.1.x.tmp"
    temp.write_text("mine\n")
    target.write_text("another run's, written meanwhile\n")
    with pytest.raises(TargetExistsError, match="already exists"):
        claim_file(temp, target, overwrite=False)
    assert target.read_text() == "another run's, written meanwhile\n"
    claim_file(temp, target, overwrite=True)
    assert target.read_text() == "mine\n"


def test_a_folder_published_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    from itmrt.publish import TargetExistsError, publish_folder, staging_folder

    target = tmp_path / "bundle"
    staging = staging_folder(target)
    (staging / "manifest.json").write_text("new")
    target.mkdir()
    (target / "manifest.json").write_text("published by another run meanwhile")
    with pytest.raises(TargetExistsError, match="created meanwhile"):
        publish_folder(staging, target, "refuse")
    assert (target / "manifest.json").read_text() == "published by another run meanwhile"


def test_export_overwrite_swaps_the_bundle_in_one_step(hostile_world: World, case: Case,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Defect 9: `export --overwrite` moved the old bundle aside first; an interruption left no bundle."""
    old = case.manifest()
    result = hostile_run(capsys, case.folder, "export", hostile_world.checkpoint, "--vocab", hostile_world.vocab,
                         "--out", case.bundle, "--num-regions", "10", "--max-batch", "16", "--max-length", "12",
                         "--threshold", "0.2", "--overwrite", changed=("bundle/",))
    assert result.code == 0, result.err
    assert case.manifest()["threshold"]["value"] == pytest.approx(0.2) != old["threshold"]["value"]
    assert sorted(p.name for p in case.folder.iterdir() if p.name.startswith(".")) == []


def test_old_bundle_moved_aside_by_a_writer_that_died_is_put_back(hostile_world: World, case: Case,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Where a system cannot swap two names, the old folder is moved aside first; if the writer dies there,
    the next writer of that target puts it back before anything else."""
    aside = case.folder / f".bundle.{dead_pid()}.k2j4_x.old"
    case.bundle.rename(aside)
    result = hostile_run(capsys, case.folder, "export", hostile_world.checkpoint, "--vocab", hostile_world.vocab,
                         "--out", case.bundle, "--num-regions", "10", changed=("bundle/", ".bundle."))
    assert_one_line(result, "already holds a bundle")
    assert not aside.exists() and (case.bundle / "manifest.json").is_file()


def test_leftovers_of_dead_writers_are_removed_and_only_those(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    """Defect 9: `kill -9` during `export` or `index` left hidden .NAME.*.partial folders nothing removed."""
    target = case.folder / "new_gallery"
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys; from itmrt.publish import staging_folder; "
         "(staging_folder(sys.argv[1]) / 'half.npy').write_bytes(bytes(1000)); os.kill(os.getpid(), signal.SIGKILL)",
         str(target)], env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    (left,) = list(case.folder.glob(".new_gallery.*.partial"))
    alive = case.folder / f".new_gallery.{os.getppid()}.abcd1234.partial"  # a writer that is still running
    alive.mkdir()
    not_ours = [case.folder / ".new_gallery.partial", case.folder / f".other.{dead_pid()}.abcd1234.partial"]
    for folder in not_ours:
        folder.mkdir()
    result = hostile_run(capsys, case.folder, "index", case.bundle, "--images", case.features, "--out", target,
                         "--no-warmup", changed=(".new_gallery.",))
    assert result.code == 0, result.err
    assert not left.exists() and alive.is_dir() and all(folder.is_dir() for folder in not_ours)
    assert (target / "gallery.json").is_file()


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_follow_the_umask(case: Case, capsys: pytest.CaptureFixture[str], umask: int, folder_mode: int,
                                  file_mode: int) -> None:
    """Defect 10: outputs were written 0600 and folders 0700 even with umask 022."""
    previous = os.umask(umask)
    try:
        assert hostile_run(capsys, case.folder, "index", case.bundle, "--images", case.features,
                           "--out", case.folder / "g2", "--no-warmup").code == 0
        assert hostile_run(capsys, case.folder, *case.infer()).code == 0
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(case.folder / "g2") == folder_mode
    assert {mode(path) for path in (case.folder / "g2").iterdir()} == {file_mode}
    assert mode(case.out) == file_mode


def test_existing_scores_file_keeps_the_whole_result_from_being_written(case: Case,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (case.folder / "scores.npy").write_text("the user's")
    result = hostile_run(capsys, case.folder, *case.infer("--scores-out", case.folder / "scores.npy"))
    assert_one_line(result, "scores.npy already exists")
    assert not case.out.exists() and (case.folder / "scores.npy").read_text() == "the user's"


def test_index_onto_a_folder_of_the_users_is_refused(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    mine = case.folder / "photos"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        result = hostile_run(capsys, case.folder, "index", case.bundle, "--images", case.features, "--out", mine,
                             "--no-warmup", *extra)
        assert_one_line(result, "not a gallery", "will not delete it")


def test_explain_keeps_an_existing_json_file(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    mine = case.folder / "explained.json"
    mine.write_text("the user's")
    caption = case.captions.read_text().splitlines()[0]
    result = hostile_run(capsys, case.folder, "explain", case.bundle, "--images", case.features, "--image", "99",
                         "--caption", caption, "--json", mine)
    assert_one_line(result, "explained.json already exists")
    result = hostile_run(capsys, case.folder, "explain", case.bundle, "--images", case.features, "--image", "99",
                         "--caption", caption, "--json", case.folder / "new.json")
    assert_one_line(result, "--image 99 is out of range")
    assert mine.read_text() == "the user's" and not (case.folder / "new.json").exists()


@pytest.mark.parametrize("command", ["audit", "eval"])
def test_two_outputs_naming_one_file_are_refused_before_any_work(hostile_world: World, case: Case,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 command: str) -> None:
    """`audit --out R --markdown R` wrote the table, then refused the report as "written meanwhile by another
    run?" (with --overwrite the report silently replaced the table); eval's --json and --scores-out alike."""
    same = case.folder / "report.json"
    if command == "audit":
        args: list[object] = ["audit", case.gallery, "--captions", case.captions, "--out", same, "--markdown", same]
    else:
        args = ["eval", hostile_world.checkpoint, "--vocab", hostile_world.vocab, "--data", case.folder / "data",
                "--json", same, "--scores-out", same]
    for extra in ([], ["--overwrite"]):
        assert_one_line(hostile_run(capsys, case.folder, *args, *extra), "name the same file", str(same))
    assert not same.exists()


@pytest.mark.parametrize("which", ["bundle", "gallery"])
def test_sample_data_is_not_merged_into_a_bundle_or_gallery(case: Case, capsys: pytest.CaptureFixture[str],
                                                            which: str) -> None:
    """`itmrt sample-data --out BUNDLE --overwrite` merged a dataset into the bundle and replaced its vocab.json
    (the bundle then failed its hash check); into a gallery it added 12 files. Writers that add their files to a
    folder (datasets, training runs) leave bundles and galleries alone, --overwrite or not."""
    folder = case.bundle if which == "bundle" else case.gallery
    result = hostile_run(capsys, case.folder, "sample-data", "--out", folder, "--images", "2", "--overwrite")
    assert_one_line(result, f"{folder} is an itmrt {which}", "choose another output folder")
    assert not list(folder.glob("*_caps.txt"))
