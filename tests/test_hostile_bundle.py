"""Hostile bundles (issue #17, defects 1-3): a bundle is a closed world.

Every name in the manifest stays inside the folder (no ``..``, no absolute path,
no symlink out - of a file, a folder or the manifest itself), every file a graph
or the runtime reads is listed with its sha256 (external data included), and
nothing listed is optional. Each case checks the one-line error and exit code,
that nothing under the sentinel folder was opened (by Python or native code)
and that nothing the case held was lost.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from cli_helpers import CliResult
from hostile_helpers import Case, World, assert_one_line, hostile_run


@pytest.fixture()
def case(hostile_world: World, tmp_path: Path) -> Case:
    return hostile_world.case(tmp_path)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def externalize(case: Case, location: str = "image_encoder.data", listed: bool = True) -> Path:
    """The image encoder's weights moved to an external-data file, the manifest updated as an honest tool would
    (``location`` other than the file written: the graph then points elsewhere, its hash still listed)."""
    graph = case.bundle / "image_encoder.onnx"
    model = onnx.load(str(graph))
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="image_encoder.data", size_threshold=1024)
    if location != "image_encoder.data":
        model = onnx.load(str(graph), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        graph.write_bytes(model.SerializeToString())
    data = case.manifest()
    data["files"]["image_encoder.onnx"] = data["graphs"]["image_encoder"]["sha256"] = sha(graph)
    if listed and (case.bundle / "image_encoder.data").is_file():
        data["files"]["image_encoder.data"] = sha(case.bundle / "image_encoder.data")
    case.write_manifest(data)
    return case.bundle / "image_encoder.data"


def check_fails(result: CliResult, *problems: str) -> None:
    """``itmrt check``: one line per problem, then the one-line error; exit 2."""
    assert result.code == 2 and "Traceback" not in result.err, result.err
    lines = result.err.strip().splitlines()
    assert lines[-1].startswith("error: bundle ") and "failed" in lines[-1], result.err
    for problem in problems:
        assert any(problem in line for line in lines[:-1]), (problem, result.err)


def rename_entry(data: dict[str, Any], graph: str, new: str) -> None:
    """Point graph ``graph`` at ``new`` with the hash listed under the new name (a consistent forgery)."""
    entry = data["graphs"][graph]
    data["files"][new] = data["files"].pop(entry["file"])
    entry["file"] = new


# -- 1. names that reach outside --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside/scorer.onnx", "sub/../../outside/scorer.onnx"])
def test_graph_name_with_dotdot_is_refused(case: Case, capsys: pytest.CaptureFixture[str], name: str) -> None:
    data = case.manifest()
    rename_entry(data, "scorer", name)
    case.write_manifest(data)
    result = hostile_run(capsys, case.folder, *case.infer())
    assert_one_line(result, "graphs.scorer.file", "not a relative path inside the folder")
    assert not case.out.exists()


def test_absolute_graph_name_is_refused_by_check(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    data = case.manifest()
    rename_entry(data, "scorer", str(case.outside / "scorer.onnx"))
    case.write_manifest(data)
    assert_one_line(hostile_run(capsys, case.folder, "check", case.bundle), "not a relative path inside the folder")


def test_vocabulary_outside_is_refused(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    data = case.manifest()
    data["files"]["../outside/vocab.json"] = data["files"].pop("vocab.json")
    data["vocab"]["file"] = "../outside/vocab.json"
    case.write_manifest(data)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()), "vocab.file")


def test_absolute_name_in_the_file_list_is_refused(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    data = case.manifest()
    data["files"][str(case.outside / "secret.txt")] = "0" * 64
    case.write_manifest(data)
    assert_one_line(hostile_run(capsys, case.folder, "check", case.bundle), "not a relative path inside the folder")


@pytest.mark.parametrize("command", ["infer", "check"])
def test_graph_symlinked_outside_is_not_followed(case: Case, capsys: pytest.CaptureFixture[str], command: str) -> None:
    """The hashes agree (the outside file is a copy), so only the closed-world rule stops this."""
    (case.bundle / "scorer.onnx").unlink()
    (case.bundle / "scorer.onnx").symlink_to(case.outside / "scorer.onnx")
    args = case.infer() if command == "infer" else ["check", case.bundle]
    result = hostile_run(capsys, case.folder, *args)
    assert_one_line(result, "scorer.onnx leads outside the folder")
    assert "verified" not in result.out


def test_folder_symlinked_outside_is_not_followed(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    data = case.manifest()
    rename_entry(data, "scorer", "graphs/scorer.onnx")
    case.write_manifest(data)
    (case.bundle / "scorer.onnx").unlink()
    (case.bundle / "graphs").symlink_to(case.outside)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()), "leads outside the folder")


def test_manifest_symlinked_outside_is_not_read(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    (case.bundle / "manifest.json").unlink()
    (case.bundle / "manifest.json").symlink_to(case.outside / "manifest.json")
    assert_one_line(hostile_run(capsys, case.folder, "check", case.bundle), "manifest.json leads outside the folder")


# -- 2. the hash check cannot be skipped -----------------------------------------------------------------


def test_swapped_graph_dropped_from_the_file_list_is_refused(case: Case, hostile_world: World,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Defect 2: a swapped scorer.onnx whose name was removed from ``files`` ran with exit 0 and wrong scores."""
    from itmrt.families.naaf.graphs import naaf_scorer_graph

    (case.bundle / "scorer.onnx").write_bytes(naaf_scorer_graph(32, 0.9, 20.0, 5.0, 17).SerializeToString())
    data = case.manifest()
    del data["files"]["scorer.onnx"]
    case.write_manifest(data)
    result = hostile_run(capsys, case.folder, *case.infer())
    assert_one_line(result, "'graphs.scorer.file' names scorer.onnx, but 'files' does not list it")
    assert not case.out.exists()



@pytest.mark.parametrize(("graph", "other", "found"), [
    ("image_encoder", "scorer", "takes caption_embeddings, image_embeddings, lengths and gives scores"),
    ("scorer", "text_encoder", "takes lengths, token_ids and gives caption_embeddings"),
])
def test_another_components_graph_with_its_hash_updated_is_one_line(case: Case, capsys: pytest.CaptureFixture[str],
                                                                    graph: str, other: str, found: str) -> None:
    """One component's graph copied over another's, the manifest's hashes updated (a consistent forgery, or a
    tool's mix-up): infer and index died in ONNX Runtime ("Required inputs ... are missing from input feed",
    a traceback), or blamed the fused scorer ("a None scorer")."""
    target = case.bundle / f"{graph}.onnx"
    target.write_bytes((case.bundle / f"{other}.onnx").read_bytes())
    data = case.manifest()
    data["files"][target.name] = data["graphs"][graph]["sha256"] = sha(target)
    case.write_manifest(data)
    expected = (f"{graph}.onnx {found}, but the manifest's {graph} takes", "not this bundle's graph")
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()), *expected)
    assert_one_line(hostile_run(capsys, case.folder, "index", case.bundle, "--images", case.features,
                                "--out", case.folder / "g", "--no-warmup"), *expected)
    assert not case.out.exists() and not (case.folder / "g").exists()


@pytest.mark.parametrize("where", ["files", "graph"])
def test_null_sha256_is_refused(case: Case, capsys: pytest.CaptureFixture[str], where: str) -> None:
    data = case.manifest()
    if where == "files":
        data["files"]["scorer.onnx"] = None
    else:
        data["graphs"]["scorer"]["sha256"] = None
    case.write_manifest(data)
    key = "files.scorer.onnx" if where == "files" else "graphs.scorer.sha256"
    assert_one_line(hostile_run(capsys, case.folder, "check", case.bundle), key, "must be a string, not null")


def test_entry_hash_differing_from_the_file_list_is_refused(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    data = case.manifest()
    data["graphs"]["scorer"]["sha256"] = "1" * 64
    case.write_manifest(data)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()), "lists another sha256 for it")


def test_changed_graph_is_refused_by_infer_and_check(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    graph = case.bundle / "text_encoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-7] + b"\0" * 7)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()), "does not match the sha256")
    check_fails(hostile_run(capsys, case.folder, "check", case.bundle), "file 'text_encoder.onnx': sha256 differs")


# -- 3. external data ---------------------------------------------------------------------------------------


def test_external_data_is_hashed_and_zeroed_weights_are_caught(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    """Defect 3: zeroing a graph's external weights passed `check` and changed the rankings."""
    data_file = externalize(case)
    assert hostile_run(capsys, case.folder, "check", case.bundle).code == 0
    assert hostile_run(capsys, case.folder, *case.infer()).code == 0
    data_file.write_bytes(bytes(data_file.stat().st_size))
    check_fails(hostile_run(capsys, case.folder, "check", case.bundle), "file 'image_encoder.data': sha256 differs")
    assert_one_line(hostile_run(capsys, case.folder, *case.infer("--overwrite"), changed=("results.jsonl",)),
                    "image_encoder.data does not match the sha256")


def test_unlisted_external_data_is_refused(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    externalize(case, listed=False)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()),
                    "uses image_encoder.data, which its file list does not hold with a sha256")
    check_fails(hostile_run(capsys, case.folder, "check", case.bundle),
                "keeps weights in image_encoder.data, which its file list does not hold")


@pytest.mark.parametrize("location", ["../outside/weights.bin", "/ABS/weights.bin"])
def test_external_data_outside_the_folder_is_not_read(case: Case, capsys: pytest.CaptureFixture[str],
                                                       location: str) -> None:
    location = location.replace("/ABS", str(case.outside))
    externalize(case, location)
    result = hostile_run(capsys, case.folder, *case.infer())
    assert_one_line(result, "keeps weights in", "not a relative path inside the folder")
    check_fails(hostile_run(capsys, case.folder, "check", case.bundle), "keeps weights in")


def test_external_data_symlinked_outside_is_not_read(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    data_file = externalize(case)
    os.replace(data_file, case.outside / "image_encoder.data")
    data_file.symlink_to(case.outside / "image_encoder.data")
    assert_one_line(hostile_run(capsys, case.folder, *case.infer()), "image_encoder.data leads outside the folder")


# -- names of later stages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    lambda data: data.update(engines={"fp16": {"scorer": {
        "file": "../outside/secret.txt", "sha256": "0" * 64, "graph_file": "scorer.onnx",
        "graph_sha256": data["graphs"]["scorer"]["sha256"], "tensorrt_version": "10.3", "gpu_name": "x",
        "compute_capability": "8.7"}}}),
    lambda data: data["files"].update({"engines/fp16/scorer.plan": "0" * 64}) or data.update(engines={"fp16": {
        "scorer": {"file": "engines/fp16/scorer.plan", "sha256": "0" * 64, "graph_file": "../outside/scorer.onnx",
                   "graph_sha256": "0" * 64, "tensorrt_version": "10.3", "gpu_name": "x",
                   "compute_capability": "8.7"}}}),
])
def test_engine_names_outside_are_refused(case: Case, capsys: pytest.CaptureFixture[str],
                                          change: Callable[[dict[str, Any]], None]) -> None:
    data = case.manifest()
    change(data)
    case.write_manifest(data)
    assert_one_line(hostile_run(capsys, case.folder, "check", case.bundle), "engines.fp16.scorer",
                    "not a relative path inside the folder")


def test_calibration_file_outside_is_refused(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    data = case.manifest()
    scorer = data["graphs"]["scorer"]
    data["precisions"] = {"int8": {"created": "", "versions": {}, "graphs": {"scorer": {
        "file": "scorer.onnx", "sha256": scorer["sha256"], "source_sha256": scorer["sha256"], "max_abs_error": 0.0,
        "calibration": "../outside/secret.txt", "method": "minmax", "quantized_nodes": [], "excluded_nodes": [],
        "per_channel": True, "symmetric": True, "qdq_pairs": 0, "sample": None}}}}
    case.write_manifest(data)
    assert_one_line(hostile_run(capsys, case.folder, *case.infer("--precision", "int8")),
                    "precisions.int8.graphs.scorer.calibration", "not a relative path inside the folder")
