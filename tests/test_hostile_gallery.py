"""Hostile galleries (issue #17, defect 4): a gallery is a closed world whose embeddings are verified.

``gallery.json`` names only files inside the gallery folder, each with its
sha256; the embeddings are hashed (and checked finite) in one streamed pass
when the gallery is opened; the bundle the gallery names outside itself is
used only when its manifest hashes to the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hostile_helpers import Case, World, assert_one_line, hostile_run


@pytest.fixture()
def case(hostile_world: World, tmp_path: Path) -> Case:
    return hostile_world.case(tmp_path)


def search(case: Case, *extra: object) -> list[object]:
    return ["infer", case.gallery, "--captions", case.captions, "--out", case.out, *extra]


def rehash(case: Case) -> None:
    """Record the embeddings' current sha256 (a forger who edits both)."""
    data = case.gallery_document()
    data["embeddings"]["sha256"] = hashlib.sha256((case.gallery / "image_embeddings.npy").read_bytes()).hexdigest()
    case.write_gallery_document(data)


def test_the_untouched_gallery_searches(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    result = hostile_run(capsys, case.folder, *search(case), changed=("results.jsonl",))
    assert result.code == 0, result.err
    assert len(case.out.read_text().splitlines()) == 4 + 6


def test_tampered_embeddings_are_refused(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    """Defect 4: a tampered embeddings file gave exit 0 and a different top image."""
    embeddings = np.load(case.gallery / "image_embeddings.npy", mmap_mode="r+")
    embeddings[3] = embeddings[0]
    embeddings.flush()
    del embeddings
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "does not match the sha256 in gallery.json")
    assert not case.out.exists()


def test_embeddings_of_another_folder_are_not_read(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    """Defect 4: a ``file`` entry with ``../`` read another folder's embeddings."""
    data = case.gallery_document()
    data["embeddings"]["file"] = "../outside/other/image_embeddings.npy"
    case.write_gallery_document(data)
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "embeddings.file",
                    "not a file inside the gallery")


def test_embeddings_symlinked_outside_are_not_read(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    (case.gallery / "image_embeddings.npy").unlink()
    (case.gallery / "image_embeddings.npy").symlink_to(case.outside / "other" / "image_embeddings.npy")
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "leads outside the folder")


def test_gallery_document_symlinked_outside_is_not_read(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    (case.gallery / "gallery.json").unlink()
    (case.gallery / "gallery.json").symlink_to(case.outside / "other" / "gallery.json")
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "gallery.json leads outside the folder")


def test_ids_file_outside_is_refused(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    data = case.gallery_document()
    data["ids"] = {"file": "/etc/hostname", "sha256": "0" * 64, "count": 6}
    case.write_gallery_document(data)
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "ids.file", "not a file inside the gallery")


def test_nan_embeddings_are_refused_even_with_a_matching_hash(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = np.load(case.gallery / "image_embeddings.npy", mmap_mode="r+")
    embeddings[2, 0, 0] = np.nan
    embeddings.flush()
    del embeddings
    rehash(case)
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "NaN or infinite embeddings")


def test_truncated_embeddings_are_refused(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    path = case.gallery / "image_embeddings.npy"
    path.write_bytes(path.read_bytes()[:-100])
    rehash(case)
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "is truncated")


@pytest.mark.parametrize("name", ["image\x00embeddings.npy", "a" * 300 + ".npy", "\ud800.npy"])
def test_a_file_name_no_system_can_open_is_one_line(case: Case, capsys: pytest.CaptureFixture[str],
                                                     name: str) -> None:
    """A NUL byte raised ValueError from deep inside pathlib (a traceback); a 300-byte name was an OSError whose
    message repeated it whole."""
    data = case.gallery_document()
    data["embeddings"]["file"] = name
    case.write_gallery_document(data)
    message = assert_one_line(hostile_run(capsys, case.folder, *search(case)), "not a relative path inside")
    assert len(message) < 400, message


def test_a_key_given_twice_in_the_gallery_document_is_one_line(case: Case,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """JSON keeps the last of two values of one key: a document naming "embeddings" twice was read by its second
    (here: another file) and failed on what that one lacked. Which one was meant is not said: refused, naming it."""
    raw = (case.gallery / "gallery.json").read_text()
    doubled = raw.replace('"embeddings": {', '"embeddings": {"file": "other.npy"}, "embeddings": {', 1)
    assert doubled != raw
    (case.gallery / "gallery.json").write_text(doubled)
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "'embeddings' appears twice")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_embeddings_with_an_empty_axis_are_refused(case: Case, capsys: pytest.CaptureFixture[str], axis: int) -> None:
    """Regions or dimensions of size 0, rehashed: the one-caption scorer divided by zero (a traceback); no images:
    infer answered nothing for each caption and serve refused every request, though the gallery opened."""
    shape = list(np.load(case.gallery / "image_embeddings.npy", mmap_mode="r").shape)
    shape[axis] = 0
    np.save(case.gallery / "image_embeddings.npy", np.zeros(shape, np.float32))
    data = case.gallery_document()
    data["embeddings"]["shape"] = shape
    case.write_gallery_document(data)
    rehash(case)
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "a gallery holds at least one image")


@pytest.mark.parametrize("command", ["infer", "serve"])
def test_embeddings_in_fortran_order_are_refused_alike(case: Case, capsys: pytest.CaptureFixture[str],
                                                       command: str) -> None:
    """itmrt infer searched a Fortran-ordered file that itmrt serve refused as "not what gallery.json says"."""
    path = case.gallery / "image_embeddings.npy"
    np.save(path, np.asfortranarray(np.load(path)))
    rehash(case)
    args = search(case) if command == "infer" else ["serve", case.gallery, "--port", "0"]
    assert_one_line(hostile_run(capsys, case.folder, *args), "Fortran order")


def test_gallery_of_a_bundle_with_another_image_encoder_is_refused(case: Case,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = case.manifest()
    data["graphs"]["image_encoder"]["outputs"][0]["name"] = "other_embeddings"  # another image encoder's record
    case.write_manifest(data)
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "has another image encoder",
                    "re-index the gallery with `itmrt index")


def test_gallery_of_a_bundle_whose_manifest_grew_still_searches(case: Case,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A manifest changed elsewhere (a build or calibration records engines there): the gallery still fits."""
    data = case.manifest()
    data["created"] = "another export"
    case.write_manifest(data)
    result = hostile_run(capsys, case.folder, *search(case))
    assert result.code == 0, result.err


def test_gallery_without_an_image_encoder_record_needs_its_own_manifest(case: Case,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A gallery made before the image encoder was recorded: opened while the manifest is the same one."""
    document = case.gallery_document()
    document["bundle"].pop("image_encoder_sha256")
    case.write_gallery_document(document)
    assert hostile_run(capsys, case.folder, *search(case)).code == 0
    data = case.manifest()
    data["created"] = "another export"
    case.write_manifest(data)
    assert_one_line(hostile_run(capsys, case.folder, *search(case, "--overwrite")), "predates image-encoder records",
                    "re-index the gallery")


def test_gallery_naming_a_folder_that_is_no_bundle_reads_nothing_there(case: Case,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = case.gallery_document()
    data["bundle"]["path"] = str(case.outside / "other")
    case.write_gallery_document(data)
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), "which is not there any more")


@pytest.mark.parametrize(("change", "key"), [
    (lambda d: d.update(embeddings="x"), "'embeddings' must be an object"),
    (lambda d: d.pop("bundle"), "'bundle' is missing"),
    (lambda d: d["embeddings"].update(sha256=None), "'embeddings.sha256' must be a string, not null"),
    (lambda d: d["embeddings"].update(shape=[6, "36", 32]), "'embeddings.shape[1]' must be an integer"),
    (lambda d: d["embeddings"].update(dtype="object"), "'embeddings.dtype'"),
    (lambda d: d["bundle"].update(family="rm -rf"), "'bundle.family'"),
])
def test_malformed_gallery_document_is_one_line_naming_the_key(  # type: ignore[no-untyped-def]
        case: Case, capsys: pytest.CaptureFixture[str], change, key: str) -> None:
    data = case.gallery_document()
    change(data)
    case.write_gallery_document(data)
    assert_one_line(hostile_run(capsys, case.folder, *search(case)), key, "re-index the gallery")


def test_serve_refuses_a_tampered_gallery_before_listening(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    path = case.gallery / "image_embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_one_line(hostile_run(capsys, case.folder, "serve", case.gallery, "--port", "0"),
                    "does not match the sha256")


def test_gallery_schema_file_is_generated_from_the_records() -> None:
    from itmrt.bundle.gallery_manifest import SCHEMA_FILE, gallery_schema

    assert json.loads(SCHEMA_FILE.read_text()) == gallery_schema()


def test_explain_refuses_a_tampered_gallery(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    """`itmrt explain --images GALLERY` opens the gallery as search does: verified first."""
    path = case.gallery / "image_embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    caption = case.captions.read_text().splitlines()[0]
    assert_one_line(hostile_run(capsys, case.folder, "explain", case.bundle, "--images", case.gallery, "--image", "0",
                                "--caption", caption), "does not match the sha256")
