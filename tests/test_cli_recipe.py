"""`itmrt make-small-models`: refuses to replace models it was not asked to, and unknown families."""

from __future__ import annotations

from cli_helpers import run_cli


def test_refuses_to_overwrite_existing_models(capsys, tmp_path):
    (tmp_path / "naaf_small.pth.tar").write_bytes(b"mine")
    result = run_cli(capsys, "make-small-models", "--out", str(tmp_path), "--families", "naaf", "--no-progress")
    assert result.code == 2 and "--overwrite" in result.err and result.err.count("\n") == 1
    assert (tmp_path / "naaf_small.pth.tar").read_bytes() == b"mine"


def test_refuses_unknown_families(capsys, tmp_path):
    result = run_cli(capsys, "make-small-models", "--out", str(tmp_path), "--families", "naaf,vse", "--no-progress")
    assert result.code == 2 and "--families" in result.err


def test_retraining_some_families_keeps_the_others_records(tmp_path):
    import json

    from itmrt.train.recipes import _earlier_records

    (tmp_path / "recipe.json").write_text(json.dumps({"models": {"naaf": {"best_rsum": 1}, "cmpm": {"best_rsum": 2},
                                                                 "scan": {"best_rsum": 3}}}))
    (tmp_path / "cmpm_small.safetensors").write_bytes(b"x")
    # naaf is retrained; scan's file is gone, so its old record would describe nothing.
    assert _earlier_records(tmp_path / "recipe.json", ("naaf",)) == {"cmpm": {"best_rsum": 2}}
    (tmp_path / "recipe.json").write_text("not json")
    assert _earlier_records(tmp_path / "recipe.json", ("naaf",)) == {}
