"""Hostile values (issue #17, defects 5-8 and 11): every bad input is one clear line, nothing else.

Classes: manifest values checked against the schema on read (types, ranges, the
known families, precisions and dtypes); non-finite or out-of-range numbers refused
where they enter (checkpoints, features, calibration data); options with sane
ranges; operating-system errors and deep nesting as one line naming the path;
messages that say what the input really is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hostile_helpers import Case, World, assert_one_line, hostile_run


@pytest.fixture()
def case(hostile_world: World, tmp_path: Path) -> Case:
    return hostile_world.case(tmp_path)


# -- manifest values (defect 7; defect 6's malformed types) ------------------------------------------------


MANIFEST_CASES: list[tuple[Callable[[dict[str, Any]], Any], str]] = [
    (lambda m: m.update(graphs=list(m["graphs"].values())), "'graphs' must be an object, not list"),
    (lambda m: m.update(files="scorer.onnx"), "'files' must be an object"),
    (lambda m: m.update(family="rm -rf"), "which is not a model family name"),
    # a manifest that records its traits opens whatever its family; one that does not must name a known family
    (lambda m: (m.update(family="naaf2"), m.pop("traits")),
     "unknown model family 'naaf2'; this itmrt knows naaf, scan, cmpm"),
    (lambda m: m["graphs"]["scorer"].update(shape_ranges="1:32:128"), "'graphs.scorer.shape_ranges' must be an object"),
    (lambda m: m["dims"].update(embed_size="32"), "'dims.embed_size' must be"),
    (lambda m: m["dims"].update(embed_size=-5), "'dims.embed_size' is -5; it must be at least 0"),
    (lambda m: m.update(vocab=50), "'vocab' must be an object"),
    (lambda m: m["graphs"]["scorer"]["shape_ranges"]["batch_images"].update(min=64, max=8),
     "has min 64, opt 16, max 8, not min <= opt <= max"),
    (lambda m: m["graphs"]["scorer"]["shape_ranges"]["batch_images"].update(max=10**12), "it must be at most"),
    (lambda m: m["threshold"].update(value=5.0), "'threshold.value' is 5.0; a similarity threshold is in -1..1"),
    (lambda m: m["graphs"]["scorer"]["inputs"][0].update(dtype="object"), "'graphs.scorer.inputs[0].dtype'"),
    (lambda m: m.update(engines={"fp64": {}}), "'engines.fp64'"),
    (lambda m: m["graphs"].update(extra=m["graphs"]["scorer"]), "'graphs.extra'"),
    (lambda m: m["vocab"].update(unk_id=99), "'vocab.unk_id' is 99, outside the vocabulary of 50"),
]


@pytest.mark.parametrize(("change", "expected"), MANIFEST_CASES, ids=[text[:30] for _, text in MANIFEST_CASES])
def test_manifest_value_is_one_line_naming_the_key(case: Case, capsys: pytest.CaptureFixture[str],
                                                   change: Callable[[dict[str, Any]], Any], expected: str) -> None:
    data = case.manifest()
    change(data)
    case.write_manifest(data)
    assert "verified" not in assert_one_line(hostile_run(capsys, case.folder, "check", case.bundle), expected)


@pytest.mark.parametrize(("text", "expected"), [
    ('{"kind": "itmrt-bundle", "schema_version": 1, "threshold": {"value": NaN}}', "not valid JSON (ValueError)"),
    ('{"kind": "itmrt-bundle", "a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON"),
])
def test_manifest_json_itmrt_cannot_trust_is_refused(case: Case, capsys: pytest.CaptureFixture[str], text: str,
                                                     expected: str) -> None:
    (case.bundle / "manifest.json").write_text(text)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()), expected)


def test_vocabulary_size_disagreeing_with_the_manifest_fails_check_and_infer(case: Case,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = case.manifest()
    data["vocab"]["size"] = 49
    case.write_manifest(data)
    result = hostile_run(capsys, case.folder, "check", case.bundle)
    assert result.code == 2 and "vocabulary 'vocab.json': 50 words" in result.err and "verified" not in result.out
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()), "vocab.json has 50 words, the manifest says 49")


# -- numbers that are not finite or out of range (defect 5) -------------------------------------------------


def released_checkpoint(world: World, folder: Path, opt: dict[str, Any] | None = None,
                        weight: float | None = None) -> Path:
    """The world's checkpoint with options replaced or one weight set to ``weight`` (as a hostile file has them)."""
    import torch

    content = torch.load(world.checkpoint, weights_only=False)
    vars(content["opt"]).update(opt or {})
    if weight is not None:
        content["model"][0]["fc.weight"][0, 0] = weight
    path = folder / "hostile.pth.tar"
    torch.save(content, path)
    return path


@pytest.mark.parametrize(("opt", "weight", "expected"), [
    ({"thres_safe": float("nan")}, None, "option 'thres_safe' is nan; it must be a finite number in [-1, 1]"),
    ({"lambda_softmax": float("inf")}, None, "option 'lambda_softmax' is inf"),
    ({"embed_size": -5}, None, "option 'embed_size' is -5; it must be an integer from 1 to 65536"),
    (None, float("nan"), "NaN or infinite values in the image encoder: fc.weight"),
])
def test_hostile_checkpoint_is_refused_before_export(hostile_world: World, case: Case,
                                                     capsys: pytest.CaptureFixture[str], opt: dict[str, Any] | None,
                                                     weight: float | None, expected: str) -> None:
    checkpoint = released_checkpoint(hostile_world, case.folder, opt, weight)
    result = hostile_run(capsys, case.folder, "export", checkpoint, "--vocab", case.bundle / "vocab.json",
                         "--out", case.folder / "new", "--num-regions", "10")
    assert_one_line(result, expected)
    assert not (case.folder / "new").exists()


@pytest.mark.parametrize(("value", "dtype", "expected"), [
    (3e38, np.float32, "the image encoder gave NaN or infinite embeddings"),
    (np.nan, np.float32, "features.npy: images 0..5 contain NaN or infinite values"),  # names the file
    (1e300, np.float64, "features.npy: images 0..5 contain NaN or infinite values"),
])
def test_features_that_are_not_finite_or_overflow_are_refused(case: Case, capsys: pytest.CaptureFixture[str],
                                                               value: float, dtype: Any, expected: str) -> None:
    """Defect 5: features of 3e38 gave NaN embeddings and -Infinity scores in the JSONL with exit 0."""
    features = np.load(case.features).astype(dtype)
    features[1] = value
    np.save(case.features, features)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer(), changed=("features.npy",)), expected)
    assert not case.out.exists()


def calibration_data(case: Case, value: float) -> Path:
    """A 'train' split of 8 images (5 captions each) whose second image holds ``value``."""
    from runtime_helpers import random_captions, region_features

    folder = case.folder / "calib"
    folder.mkdir()
    features = region_features(8, seed=3)
    features[1] = value
    np.save(folder / "train_ims.npy", features)
    (folder / "train_caps.txt").write_text("\n".join(random_captions(40, seed=4)) + "\n")
    return folder


@pytest.mark.parametrize(("value", "method", "expected"), [
    (np.nan, "minmax", "hold NaN or infinite values"),
    (np.nan, "percentile", "hold NaN or infinite values"),
    (3e38, "minmax", ""),
    (3e38, "percentile", ""),
])
def test_calibration_data_out_of_range_is_refused(case: Case, capsys: pytest.CaptureFixture[str], value: float,
                                                  method: str, expected: str) -> None:
    """Defect 5: NaN calibration data reported "max abs error inf" as a success (minmax), or a numpy traceback."""
    data = calibration_data(case, value)
    result = hostile_run(capsys, case.folder, "calibrate", case.bundle, "--data", data, "--method", method,
                         "--samples", "8", "--min-samples", "4", "--batch-size", "4", "--no-progress", temp_ok=True)
    assert_one_line(result, expected)
    assert "precisions" not in case.manifest()


# -- options (defect 8; defect 6's unbounded sizes) ------------------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["--threads", "2000"], "--threads 2000 is outside 0.."),
    (["--memory-mb", "1000000000"], "--memory-mb"),
    (["--max-length", "100000"], "--max-length"),
    (["--top-k", "0"], "--top-k"),
])
def test_infer_options_out_of_range(case: Case, capsys: pytest.CaptureFixture[str], args: list[str],
                                    expected: str) -> None:
    assert_one_line(hostile_run(capsys, case.folder, *case.infer(*args)), expected)


@pytest.mark.parametrize(("args", "expected"), [
    (["--num-regions", "100000000"], "--num-regions"),
    (["--tolerance", "nan"], "--tolerance must be a finite number"),
    (["--threshold", "5"], "--threshold must be in [-1, 1]"),
])
def test_export_options_out_of_range(hostile_world: World, case: Case, capsys: pytest.CaptureFixture[str],
                                     args: list[str], expected: str) -> None:
    """Defect 6: ``--num-regions 100000000`` tried to allocate 17.9 TiB."""
    result = hostile_run(capsys, case.folder, "export", hostile_world.checkpoint, "--vocab", case.bundle / "vocab.json",
                         "--out", case.folder / "new", *args)
    assert_one_line(result, expected)


def test_bench_batch_sizes_are_bounded_before_any_work(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    """`itmrt bench --batch-sizes 99999999999` started the bench and tried to allocate what no machine has
    (--batch-size elsewhere stops at 65536)."""
    result = hostile_run(capsys, case.folder, "bench", case.bundle, "--report", case.folder / "report",
                         "--batch-sizes", "1,99999999999", "--no-plots", "--no-progress")
    assert_one_line(result, "--batch-sizes must be integers from 1 to 65536", "'1,99999999999'")
    assert not (case.folder / "report").exists()


@pytest.mark.parametrize("flag", ["--images", "--captions"])
def test_bench_gallery_and_caption_pool_are_bounded_before_any_work(case: Case, capsys: pytest.CaptureFixture[str],
                                                                    flag: str) -> None:
    """`itmrt bench --images 10000000` (under the old bound, 2^24) opened the bundle, then made the whole gallery
    in memory and ended in "out of memory"; both are made whole, so both stop where a batch does."""
    from itmrt.errors import ItmrtError
    from itmrt.reports.bench import BenchOptions, run_bench

    result = hostile_run(capsys, case.folder, "bench", case.bundle, "--report", case.folder / "report", flag, "65537",
                         "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--no-plots", "--no-progress")
    assert_one_line(result, f"Invalid value for '{flag}'", "65536")
    assert not (case.folder / "report").exists()
    name = flag.removeprefix("--")
    with pytest.raises(ItmrtError, match=f"^{flag} must be an integer from 1 to 65536, not 10000000$"):
        run_bench(case.folder / "no bundle here", BenchOptions(**{name: 10_000_000}))


@pytest.mark.parametrize("shape", ["foo=1:2:3", "batch_images=8:4:16", "batch_images=0:1:2"])
def test_invalid_shape_is_refused_without_tensorrt(case: Case, capsys: pytest.CaptureFixture[str], shape: str) -> None:
    """Defect 8: an invalid --shape was ignored where TensorRT is absent; now refused before any graph is made."""
    assert_one_line(hostile_run(capsys, case.folder, "build", case.bundle, "--precision", "fp16", "--shape", shape),
                    "--shape")
    assert "precisions" not in case.manifest()


def test_api_threads_are_bounded_too(hostile_world: World) -> None:
    from itmrt.errors import ItmrtError
    from itmrt.runtime import load

    with pytest.raises(ItmrtError, match="at most|outside 0") as error:
        load(hostile_world.bundle, threads=2000)
    assert "\n" not in str(error.value)


def test_serve_float_options_must_be_finite(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line(hostile_run(capsys, case.folder, "serve", case.gallery, "--max-body-mb", "inf"),
                    "--max-body-mb must be a finite number")


# -- operating-system errors, deep nesting (defect 6) -------------------------------------------------------------


def test_outputs_under_a_file_are_one_line(case: Case, hostile_world: World,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Defect 6: an unwritable output was a raw OSError in export, build, calibrate, index and infer."""
    blocked = case.captions / "sub"  # a folder path inside a file
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()[:-2], "--out", blocked / "r.jsonl"),
                    "cannot", "Not a directory")
    assert_one_line(hostile_run(capsys, case.folder, "index", case.bundle, "--images", case.features,
                                "--out", blocked / "g", "--no-warmup"), "cannot", "Not a directory")
    assert_one_line(hostile_run(capsys, case.folder, "export", hostile_world.checkpoint, "--vocab",
                                case.bundle / "vocab.json", "--out", blocked / "b", "--num-regions", "10"),
                    "cannot", "Not a directory")


@pytest.mark.parametrize("command", ["build", "calibrate"])
def test_bundle_that_cannot_take_new_files_is_one_line(case: Case, capsys: pytest.CaptureFixture[str],
                                                       command: str) -> None:
    (case.bundle / "precision").write_text("a file where the precision graphs' folder goes\n")
    if command == "build":
        args: list[object] = ["build", case.bundle, "--precision", "fp16"]
    else:
        args = ["calibrate", case.bundle, "--data", calibration_data(case, 0.5), "--samples", "8",
                "--min-samples", "4", "--batch-size", "4", "--no-progress"]
    assert_one_line(hostile_run(capsys, case.folder, *args, temp_ok=True), "cannot", "precision")
    assert (case.bundle / "precision").read_text().startswith("a file")


def test_file_name_too_long_is_one_line(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    name = case.folder / ("s" * 300 + ".npy")
    assert_one_line(hostile_run(capsys, case.folder, *case.infer("--scores-out", name)), "File name too long")
    assert not case.out.exists()  # the result is one: results.jsonl is not left without its scores


def test_deeply_nested_vocabulary_is_one_line(hostile_world: World, case: Case,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    vocab = case.folder / "deep.json"
    vocab.write_text("[" * 200_000 + "]" * 200_000)
    assert_one_line(hostile_run(capsys, case.folder, "export", hostile_world.checkpoint, "--vocab", vocab,
                                "--out", case.folder / "new"), "nested too deeply")


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root may write anywhere: permissions cannot make a folder unwritable")
def test_unwritable_output_folder_is_one_line(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    locked = case.folder / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()[:-2], "--out", locked / "r.jsonl"),
                    "Permission denied")


# -- messages that say what the input is (defect 11) ---------------------------------------------------------


def test_folder_as_checkpoint_or_vocabulary_says_folder(hostile_world: World, case: Case,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--out", case.folder / "new"]
    assert_one_line(hostile_run(capsys, case.folder, "export", case.outside, "--vocab", case.bundle / "vocab.json",
                                *common), "is a folder; give the checkpoint file")
    assert_one_line(hostile_run(capsys, case.folder, "export", hostile_world.checkpoint, "--vocab", case.outside.parent,
                                *common), "is a folder; give the vocabulary JSON file")


@pytest.mark.parametrize(("content", "expected"), [
    (b"0.1 0.2 0.3\n0.4 0.5 0.6\n", "does not start with NumPy's header (is it text?)"),
    (b"PK\x03\x04 an npz", ".npz archive"),
    (b"truncate", "is truncated"),
    (b"extend", "bytes past the"),
])
def test_features_file_that_is_not_npy_says_what_it_is(case: Case, capsys: pytest.CaptureFixture[str],
                                                       content: bytes, expected: str) -> None:
    if content == b"truncate":  # a real .npy missing its last rows
        content = case.features.read_bytes()[:-1000]
    if content == b"extend":  # rows written past what the header announces: numpy read the first ones only
        content = case.features.read_bytes() + np.zeros(1000, np.float32).tobytes()
    case.features.write_bytes(content)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer(), changed=("features.npy",)), expected)


def test_captions_with_cr_only_line_ends_are_separate_captions(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    """Defect 11: CR-only line ends made one truncated caption."""
    captions = case.captions.read_text().splitlines()
    case.captions.write_bytes("\r".join(captions).encode() + b"\r")
    result = hostile_run(capsys, case.folder, *case.infer(), changed=("captions.txt", "results.jsonl"))
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in case.out.read_text().splitlines()]
    assert [line["caption"] for line in lines if line["query"] == "caption"] == captions


def test_folder_as_captions_says_folder(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()[:2], "--captions", case.outside, *case.infer()[4:]),
                    "is a folder")


@pytest.mark.parametrize("command", ["check", "index", "explain"])
def test_gallery_or_file_where_a_bundle_goes_says_so(case: Case, capsys: pytest.CaptureFixture[str],
                                                     command: str) -> None:
    """A gallery given where a bundle goes was "not a complete itmrt bundle; export it again" (and a file "no
    bundle folder at ...; run `itmrt export` first"), sending the user to re-export a bundle they have."""
    for wrong, expected in ((case.gallery, "is a gallery (written by `itmrt index`), not a bundle"),
                            (case.features, "is not a folder; give the bundle folder")):
        args: list[object] = {"check": ["check", wrong],
                              "index": ["index", wrong, "--images", case.features, "--out", case.folder / "g"],
                              "explain": ["explain", wrong, "--images", case.features, "--image", "0",
                                          "--caption", "word1"]}[command]
        line = assert_one_line(hostile_run(capsys, case.folder, *args), f"{wrong} {expected}")
        assert "export it again" not in line and "run `itmrt export` first" not in line


@pytest.mark.parametrize("command", ["query", "serve"])
def test_folder_or_pipe_as_token_file_is_named_so(case: Case, capsys: pytest.CaptureFixture[str],
                                                  command: str) -> None:
    """`--token-file FOLDER` (or a FIFO) was said to be "not found"."""
    import os

    os.mkfifo(case.folder / "token")
    (case.folder / "tokens").mkdir()
    for token in (case.folder / "tokens", case.folder / "token"):
        if command == "query":
            args: list[object] = ["query", "http://127.0.0.1:9", "--captions", case.captions, "--token-file", token]
        else:
            args = ["serve", case.gallery, "--port", "0", "--token-file", token]
        line = assert_one_line(hostile_run(capsys, case.folder, *args), f"token file {token} ")
        assert ("is a folder" if token.is_dir() else "is not a regular file") in line and "not found" not in line


@pytest.mark.parametrize("which", ["captions", "features", "vocabulary"])
def test_device_or_pipe_as_input_is_named_so_and_not_read(hostile_world: World, case: Case,
                                                          capsys: pytest.CaptureFixture[str], which: str) -> None:
    """A FIFO would block a reader and a device like /dev/zero never ends: both are refused, and not called
    missing."""
    import os

    fifo = case.folder / ("input.npy" if which == "features" else "input.txt")
    os.mkfifo(fifo)
    if which == "captions":
        args: list[object] = [*case.infer()[:2], "--captions", fifo, *case.infer()[4:]]
    elif which == "features":
        args = [*case.infer()[:4], "--images", fifo, *case.infer()[6:]]
    else:
        args = ["export", hostile_world.checkpoint, "--vocab", fifo, "--out", case.folder / "new"]
    assert_one_line(hostile_run(capsys, case.folder, *args), str(fifo), "is not a regular file")
    assert not case.out.exists() and not (case.folder / "new").exists()


def test_a_loop_of_links_as_input_is_named_so(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    (case.folder / "loop1.npy").symlink_to("loop2.npy")
    (case.folder / "loop2.npy").symlink_to("loop1.npy")
    args = [*case.infer()[:4], "--images", case.folder / "loop1.npy", *case.infer()[6:]]
    assert_one_line(hostile_run(capsys, case.folder, *args), "loop1.npy", "leads back to itself")


@pytest.mark.parametrize(("meta", "expected"), [
    ("[" * 100_000 + "]" * 100_000, "as JSON (RecursionError)"),
    ('{"images": [{"extra": 1, "partner": "x"}], "captions": []}', "does not have the synthetic generator's layout"),
    (json.dumps({"images": [{"extra": 1, "partner": 5}, {}],
                 "captions": [{"image": 5 if c == 9 else c // 5, "negated": False} for c in range(10)]}),
     "outside its 2 images and 10 captions"),
])
def test_malformed_mismatch_meta_is_one_line(hostile_world: World, case: Case, capsys: pytest.CaptureFixture[str],
                                             meta: str, expected: str) -> None:
    """`itmrt eval --mismatched-words` reads {split}_meta.json: damaged ones end in one line, before any scoring."""
    from runtime_helpers import random_captions, region_features

    data = case.folder / "data"
    data.mkdir()
    np.save(data / "test_ims.npy", region_features(2, seed=5))
    (data / "test_caps.txt").write_text("\n".join(random_captions(10, seed=6)) + "\n")
    (data / "test_meta.json").write_text(meta)
    result = hostile_run(capsys, case.folder, "eval", hostile_world.checkpoint, "--vocab", hostile_world.vocab,
                         "--data", data, "--split", "test", "--mismatched-words")
    assert_one_line(result, "test_meta.json" if "JSON" in expected else "meta file", expected)


@pytest.fixture(scope="module")
def api_runtime(hostile_world: World) -> Any:
    from itmrt.runtime import load

    return load(hostile_world.bundle, threads=1, warn=lambda message: None)


def _one_vector_each(captions: Any) -> Any:
    from itmrt.runtime.encoders import CaptionEmbeddings

    return CaptionEmbeddings(captions.vectors[: len(captions)], captions.lengths)


def _narrowed(captions: Any) -> Any:
    from itmrt.runtime.encoders import CaptionEmbeddings

    return CaptionEmbeddings(captions.vectors[:, :5], captions.lengths, captions.offsets)


API_CASES: list[tuple[str, Callable[[Any, Any, list[str]], Any], str]] = [
    # k <= 0 ranked all but the last -k images for a few captions (the one-caption path), silently
    ("k=-1", lambda rt, g, c: rt.search_text_to_image(c, g, -1), "--top-k must be at least 1, not -1"),
    ("k=0", lambda rt, g, c: rt.rank(g, rt.encode_captions(c), top_k=0), "--top-k must be at least 1, not 0"),
    ("k=-1 shortlist", lambda rt, g, c: rt.search_text_to_image(c, g, -1, shortlist=4), "--top-k must be at least 1"),
    ("k=1.5", lambda rt, g, c: rt.search_image_to_text(g, c, 1.5), "--top-k must be an integer, not 1.5"),
    ("shortlist=2.5", lambda rt, g, c: rt.search_text_to_image(c, g, 2, shortlist=2.5),
     "--shortlist must be an integer"),
    ("caption None", lambda rt, g, c: rt.encode_captions([*c, None]), "caption 5 is not a string but NoneType"),
    ("caption bytes", lambda rt, g, c: rt.encode_captions([b"word1"]), "caption 1 is not a string but bytes"),
    # None failed as "'NoneType' object is not iterable"; a blank caption was ranked by nothing it said (a
    # captions file's blank line and the service's blank caption are refused)
    ("captions None", lambda rt, g, c: rt.encode_captions(None), "encode_captions takes a list of captions "
     "(strings), not NoneType"),
    ("caption blank", lambda rt, g, c: rt.search_text_to_image([*c, " "], g, 2), "caption 5 is blank; give each "
     "caption at least one word"),
    # a NUL or an escape sequence was taken as part of a word (an unknown one) and ranked
    ("caption NUL", lambda rt, g, c: rt.search_text_to_image([*c, "a dog\x00 runs"], g, 2),
     "caption 5 holds the control character U+0000; captions are plain text: remove it"),
    ("caption escape", lambda rt, g, c: rt.encode_captions(["a \x1b[2J dog"]), "caption 1 holds the control "
     "character U+001B"),
    ("features list", lambda rt, g, c: rt.encode_images([[[0.0] * 64] * 10]), "must be a numpy array, not list"),
    # features that are not float were cast and encoded (complex with a ComplexWarning), by index() into a gallery
    ("features int", lambda rt, g, c: rt.encode_images(np.ones((1, 10, 64), np.int64)), "image features hold int64; "
     "give float32 values"),
    ("features bool", lambda rt, g, c: rt.encode_images(np.ones((1, 10, 64), bool)), "image features hold bool"),
    ("features complex", lambda rt, g, c: rt.encode_images(np.ones((1, 10, 64), np.complex64)),
     "image features hold complex64"),
    ("images None", lambda rt, g, c: rt.score(None, rt.encode_captions(c)), "not NoneType"),
    ("captions not encoded", lambda rt, g, c: rt.rank(g, c), "captions must be encoded first"),
    # a string was searched by substring ("t2i" in "t2i, i2t"); an unknown name or none gave empty results
    ("directions str", lambda rt, g, c: rt.rank(g, rt.encode_captions(c), 2, shortlist=4, directions="t2i"),
     "directions must be a tuple of one or both of 't2i', 'i2t', each once, not 't2i'"),
    ("directions unknown", lambda rt, g, c: rt.rank(g, rt.encode_captions(c), 2, shortlist=4, directions=("t2x",)),
     "directions must be a tuple of one or both of 't2i', 'i2t', each once, not ('t2x',)"),
    ("directions empty", lambda rt, g, c: rt.rank(g, rt.encode_captions(c), 2, shortlist=4, directions=()),
     "directions must be a tuple of one or both"),
    ("directions None", lambda rt, g, c: rt.rank(g, rt.encode_captions(c), 2, directions=None),
     "directions must be a tuple of one or both"),
    # plain embeddings that are not float were cast and ranked; NaN came back from score_images as scores; zero
    # regions, a wrong depth or the wrong kind of caption embeddings failed inside numpy or ONNX Runtime
    ("embeddings str", lambda rt, g, c: rt.rank(np.asarray(g.embeddings).astype(str), rt.encode_captions(c)),
     "image embeddings hold <U"),
    ("embeddings int", lambda rt, g, c: rt.score_images(np.ones(g.embeddings.shape, np.int32), rt.encode_captions(c)),
     "image embeddings hold int32; give float32 or float16 embeddings"),
    ("embeddings NaN", lambda rt, g, c: rt.score_images(np.full(g.embeddings.shape, np.nan, np.float32),
                                                        rt.encode_captions(c)), "the scorer gave NaN or infinite"),
    ("no regions", lambda rt, g, c: rt.rank(np.asarray(g.embeddings)[:, :0], rt.encode_captions(c)),
     "image embeddings have shape (6, 0, 32)"),
    ("embeddings depth", lambda rt, g, c: rt.rank(np.asarray(g.embeddings)[:, :, :5], rt.encode_captions(c * 20)),
     "image embeddings have shape (6, 10, 5)"),
    ("captions global", lambda rt, g, c: rt.rank(g, _one_vector_each(rt.encode_captions(c * 20))),
     "scores token embeddings with offsets"),
    ("captions depth", lambda rt, g, c: rt.rank(g, _narrowed(rt.encode_captions(c)), 1, shortlist=2),
     "caption embeddings have 5 values a vector"),
    ("threads 1.5", lambda rt, g, c: __import__("itmrt.runtime").runtime.load(rt.bundle.path, threads=1.5),
     "--threads must be an integer"),
    # a number or None where a path goes failed in pathlib as a TypeError; "" was read as the current folder
    ("bundle 5", lambda rt, g, c: __import__("itmrt").load(5), "the bundle must be a path (a str or pathlib.Path), "
     "not int"),
    ("bundle ''", lambda rt, g, c: __import__("itmrt").load(""), "the bundle must be a path (a str or "
     "pathlib.Path), not an empty string"),
    ("gallery None", lambda rt, g, c: rt.open_gallery(None), "the gallery must be a path (a str or pathlib.Path), "
     "not NoneType"),
    ("index out 5", lambda rt, g, c: rt.index(np.ones((1, 10, 64), np.float32), 5), "out (the gallery folder to "
     "create) must be a path"),
    ("sharded out 5", lambda rt, g, c: __import__("itmrt.scale.writer").scale.writer.index_sharded(
        rt, np.ones((1, 10, 64), np.float32), 5, __import__("itmrt.scale.writer").scale.writer.ShardingOptions(8)),
     "out (the gallery folder) must be a path"),
    ("sharded gallery None", lambda rt, g, c: __import__("itmrt.scale.layout").scale.layout.read_sharded_gallery(
        None), "the gallery must be a path"),
]


@pytest.mark.parametrize(("call", "expected"), [case[1:] for case in API_CASES], ids=[case[0] for case in API_CASES])
def test_api_wrong_values_and_types_are_one_line(hostile_world: World, api_runtime: Any,
                                                 call: Callable[[Any, Any, list[str]], Any], expected: str) -> None:
    """The Python API given a k <= 0, a float where a count goes, a caption that is not a string, or a list
    where an array or encoded captions go: one line naming it, not a wrong ranking or an AttributeError (or
    ONNX Runtime's TypeError) from deep inside."""
    from itmrt.errors import ItmrtError

    gallery = api_runtime.open_gallery(hostile_world.gallery)
    captions = hostile_world.captions.read_text().splitlines()
    with pytest.raises(ItmrtError, match=re.escape(expected)) as error:
        call(api_runtime, gallery, captions)
    assert "\n" not in str(error.value)


def test_api_counts_may_be_numpy_integers(hostile_world: World) -> None:
    # the scale options took np.int64 counts; RuntimeOptions kept one, which ONNX Runtime's options may refuse
    import numpy as np

    from itmrt.errors import ItmrtError
    from itmrt.runtime import RuntimeOptions, load

    options = RuntimeOptions(threads=np.int64(1))
    assert type(options.threads) is int and options.threads == 1
    # batch_size, max_length, device, budget_bytes and gpu_mem_limit_mb were refused as "must be an integer"
    counts = {"batch_size": 64, "max_length": 10, "device": 0, "budget_bytes": 1 << 20, "gpu_mem_limit_mb": 512}
    options = RuntimeOptions(**{name: np.int64(value) for name, value in counts.items()})
    assert {name: (type(getattr(options, name)), getattr(options, name)) for name in counts} == \
        {name: (int, value) for name, value in counts.items()}
    with pytest.raises(ItmrtError, match="--batch-size must be an integer from 1 to 65536, not 0"):
        RuntimeOptions(batch_size=np.int32(0))
    load(hostile_world.bundle, threads=np.int64(1), batch_size=np.int64(8)).close()
