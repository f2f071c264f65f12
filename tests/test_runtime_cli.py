"""`itmrt infer` / `itmrt index`: bundle == checkpoint (acceptance), torch-free runs, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from itmrt.cli.app import main

from runtime_helpers import VOCAB, make_bundle, make_vocab, random_captions, region_features

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rankings(path: Path) -> dict[tuple[str, int], list[int]]:
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[(row["query"], row["index"])] = row["images"] if row["query"] == "caption" else row["captions"]
    return out


@pytest.fixture(scope="module")
def naaf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    bundle, checkpoint, vocab = make_bundle(root / "model")
    np.save(root / "feats.npy", region_features(30, seed=11))
    (root / "caps.txt").write_text("\n".join(random_captions(40, seed=12, max_words=10)) + "\n")
    return {"root": root, "bundle": bundle, "checkpoint": checkpoint, "vocab": vocab,
            "feats": root / "feats.npy", "caps": root / "caps.txt"}


def test_bundle_matches_checkpoint_scores_and_top10(naaf: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    common = ["--captions", naaf["caps"], "--images", naaf["feats"], "--top-k", "10"]
    code, out, err = run_cli(["infer", naaf["bundle"], *common, "--out", tmp_path / "ort.jsonl",
                              "--scores-out", tmp_path / "ort.npy", "--memory-mb", "1"], capsys)
    assert code == 0, err
    assert "30 images x 40 captions" in out
    code, _, err = run_cli(["infer", naaf["checkpoint"], "--vocab", naaf["vocab"], *common,
                            "--out", tmp_path / "ref.jsonl", "--scores-out", tmp_path / "ref.npy"], capsys)
    assert code == 0, err
    ort_scores, ref_scores = np.load(tmp_path / "ort.npy"), np.load(tmp_path / "ref.npy")
    assert ort_scores.shape == (30, 40) and ort_scores.dtype == np.float32
    assert np.abs(ort_scores - ref_scores).max() <= 1e-5
    ort_rank, ref_rank = rankings(tmp_path / "ort.jsonl"), rankings(tmp_path / "ref.jsonl")
    assert len(ort_rank) == 70 and ort_rank == ref_rank
    assert ref_rank[("caption", 0)] == np.argsort(-ref_scores[:, 0], kind="stable")[:10].tolist()


def test_index_then_infer_on_gallery_without_torch(naaf: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(
        ["index", naaf["bundle"], "--images", naaf["feats"], "--out", tmp_path / "gallery"], capsys
    )
    assert code == 0, err and "indexed 30 images" in out
    args = ["infer", str(tmp_path / "gallery"), "--captions", str(naaf["caps"]),
            "--out", str(tmp_path / "g.jsonl"), "--scores-out", str(tmp_path / "g.npy")]
    script = f"import sys; sys.modules['torch'] = None\nfrom itmrt.cli.app import main\nmain({args!r})\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    code, _, err = run_cli(["infer", naaf["bundle"], "--captions", naaf["caps"], "--images", naaf["feats"],
                            "--out", tmp_path / "b.jsonl", "--scores-out", tmp_path / "b.npy"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), np.load(tmp_path / "b.npy"))
    assert rankings(tmp_path / "g.jsonl") == rankings(tmp_path / "b.jsonl")


def test_direction_answers_only_the_queries_asked(naaf: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``--direction t2i`` writes the caption lines of ``both`` and no image lines (``i2t`` the other way), on
    the bundle, the checkpoint and a shortlist; a bad value is refused in one line."""
    common = ["--captions", naaf["caps"], "--images", naaf["feats"], "--top-k", "5"]
    for source, extra in ((naaf["bundle"], []), (naaf["bundle"], ["--shortlist", "8"]),
                          (naaf["checkpoint"], ["--vocab", naaf["vocab"]])):
        code, _, err = run_cli(["infer", source, *common, *extra, "--out", tmp_path / "both.jsonl", "--overwrite"],
                               capsys)
        assert code == 0, err
        both = rankings(tmp_path / "both.jsonl")
        for direction, query in (("t2i", "caption"), ("i2t", "image")):
            code, _, err = run_cli(["infer", source, *common, *extra, "--direction", direction,
                                    "--out", tmp_path / f"{direction}.jsonl", "--overwrite"], capsys)
            assert code == 0, err
            got = rankings(tmp_path / f"{direction}.jsonl")
            assert got and got == {key: value for key, value in both.items() if key[0] == query}, (source, extra)
    code, _, err = run_cli(["infer", naaf["bundle"], *common, "--direction", "sideways", "--out",
                            tmp_path / "x.jsonl"], capsys)
    assert code == 2 and "--direction" in err and "sideways" in err


def test_outputs_are_not_overwritten_unless_asked(naaf: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "r.jsonl").write_text("keep\n")
    args = [
        "infer", naaf["bundle"], "--captions", naaf["caps"], "--images", naaf["feats"], "--out", tmp_path / "r.jsonl"
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "already exists" in err and (tmp_path / "r.jsonl").read_text() == "keep\n"
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err and (tmp_path / "r.jsonl").read_text().startswith('{"query": "caption"')


def one_line_error(args: list[object], capsys, expected: str) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli([str(a) for a in args], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_bad_inputs_end_in_one_line_errors(naaf: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = ["--out", tmp_path / "x.jsonl"]
    base = ["infer", naaf["bundle"], "--images", naaf["feats"], *out]
    np.save(tmp_path / "wide.npy", np.zeros((3, 10, 65), np.float32))
    one_line_error(["infer", naaf["bundle"], "--captions", naaf["caps"], "--images", tmp_path / "wide.npy", *out],
                   capsys, "axis 2 is 65, not 64")
    (tmp_path / "blank.txt").write_text("word1 word2\n\nword3\n")
    one_line_error([*base, "--captions", tmp_path / "blank.txt"], capsys, "line 2 is empty")
    (tmp_path / "bytes.txt").write_bytes(b"word1\nword\xff2\n")
    one_line_error([*base, "--captions", tmp_path / "bytes.txt"], capsys, "line 2 is not valid UTF-8")
    (tmp_path / "long.txt").write_text("word1\n" + " ".join(["word3"] * 12) + "\n")
    one_line_error(
        [*base, "--captions", tmp_path / "long.txt", "--on-long", "refuse"], capsys, "caption 2 has 14 tokens"
    )
    code, _, err = run_cli(["infer", naaf["bundle"], "--images", naaf["feats"], "--captions", tmp_path / "long.txt",
                            "--out", tmp_path / "truncated.jsonl"], capsys)  # default: truncate, with a warning
    assert code == 0 and err.startswith("warning: 1 caption(s) longer than 12 tokens were truncated")
    one_line_error(
        ["infer", naaf["checkpoint"], "--captions", naaf["caps"], "--images", naaf["feats"], *out], capsys,
        "pass --vocab"
    )
    broken = tmp_path / "broken"
    shutil.copytree(naaf["bundle"], broken)
    data = (broken / "text_encoder.onnx").read_bytes()
    (broken / "text_encoder.onnx").write_bytes(data[:1000])
    one_line_error(
        ["infer", broken, "--captions", naaf["caps"], "--images", naaf["feats"], *out], capsys, "truncated or changed"
    )
    one_line_error(["infer", naaf["bundle"], "--captions", naaf["caps"], "--images", naaf["feats"], "--precision",
                    "int8", *out],
                   capsys, "precision int8 is not in bundle")
    assert not (tmp_path / "x.jsonl").exists()


def test_gallery_from_another_bundle_is_refused(naaf: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    other, _, _ = make_bundle(tmp_path / "other", seed=3)
    code, _, err = run_cli(["index", other, "--images", naaf["feats"], "--out", tmp_path / "g"], capsys)
    assert code == 0, err
    one_line_error(["infer", naaf["bundle"], "--gallery", tmp_path / "g", "--captions", naaf["caps"], "--out",
                    tmp_path / "x.jsonl"],
                   capsys, "made with another bundle")


def test_cmpm_bundle_matches_checkpoint(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import torch

    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.families.cmpm.model import CMPMModel
    from itmrt.families.released import save_native

    torch.manual_seed(0)
    model = CMPMModel(VOCAB, 16, 12, 32, width_mult=0.25, image_size=32).eval()
    save_native(tmp_path / "cmpm.safetensors", model)
    vocab = make_vocab(tmp_path)
    export_bundle(tmp_path / "cmpm.safetensors", vocab, tmp_path / "bundle", ExportOptions(max_batch=16, max_length=12))
    np.save(tmp_path / "imgs.npy", np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32))
    (tmp_path / "caps.txt").write_text("\n".join(random_captions(15, seed=1)) + "\n")
    common = ["--captions", tmp_path / "caps.txt", "--images", tmp_path / "imgs.npy"]
    assert run_cli(
        ["infer", tmp_path / "bundle", *common, "--out", tmp_path / "a.jsonl", "--scores-out", tmp_path / "a.npy"],
        capsys
    )[0] == 0
    code, _, err = run_cli(["infer", tmp_path / "cmpm.safetensors", "--vocab", vocab, *common, "--out",
                            tmp_path / "b.jsonl",
                            "--scores-out", tmp_path / "b.npy"], capsys)
    assert code == 0, err
    assert np.abs(np.load(tmp_path / "a.npy") - np.load(tmp_path / "b.npy")).max() <= 1e-5
    assert rankings(tmp_path / "a.jsonl") == rankings(tmp_path / "b.jsonl")
