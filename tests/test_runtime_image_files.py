"""CMPM bundles take image files (JPEG, PNG, WebP): preprocessing as trained, ids as paths, bad files named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli_helpers import run_cli
from tests.runtime_helpers import VOCAB, make_bundle, make_vocab, random_captions

Image = pytest.importorskip("PIL.Image")
torch = pytest.importorskip("torch")

SIZE = 32


@pytest.fixture(scope="module")
def cmpm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from itmrt.export.bundle import ExportOptions, export_bundle
    from itmrt.families.cmpm.model import CMPMModel
    from itmrt.families.released import save_native

    folder = tmp_path_factory.mktemp("cmpm")
    torch.manual_seed(0)
    model = CMPMModel(VOCAB, 16, 12, 32, width_mult=0.25, image_size=SIZE).eval()
    save_native(folder / "cmpm.safetensors", model)
    export_bundle(folder / "cmpm.safetensors", make_vocab(folder), folder / "bundle",
                  ExportOptions(max_batch=16, max_length=12))
    return {"model": model, "bundle": folder / "bundle", "folder": folder}


def _pixels(seed: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _photos(folder: Path) -> dict[str, np.ndarray]:
    """Image files of each format (and a subfolder); returns what a decoder gives back for each id."""
    folder.mkdir(parents=True)
    (folder / "sub").mkdir()
    written = {"a.png": _pixels(1), "sub/b.png": _pixels(2), "c.webp": _pixels(3), "d.jpg": _pixels(4)}
    for name, pixels in written.items():
        options = {"lossless": True} if name.endswith(".webp") else {"quality": 90} if name.endswith(".jpg") else {}
        Image.fromarray(pixels).save(folder / name, **options)
    (folder / "notes.txt").write_text("not an image: ignored in a folder")
    # What the decoder gives back: PNG and lossless WebP exactly the pixels written, JPEG its own decode.
    with Image.open(folder / "d.jpg") as jpeg:
        written["d.jpg"] = np.asarray(jpeg.convert("RGB"))
    # A wider file: the shorter side is already the training size, so only the centre crop applies.
    wide = _pixels(5, SIZE, SIZE + 8)
    Image.fromarray(wide).save(folder / "wide.png")
    written["wide.png"] = wide[:, 4 : 4 + SIZE]
    # A larger file of one colour: resizing keeps the colour, whatever the filter.
    Image.new("RGB", (2 * SIZE, 3 * SIZE), (200, 30, 90)).save(folder / "big.png")
    written["big.png"] = np.broadcast_to(np.array([200, 30, 90], dtype=np.uint8), (SIZE, SIZE, 3))
    return written


def _reference(model: Any, pixels: list[np.ndarray]) -> np.ndarray:
    """The PyTorch reference: the trainer's preprocessing of uint8 RGB images, then the image tower."""
    from itmrt.data.images import preprocess_images

    with torch.no_grad():
        return model.encode_image(torch.from_numpy(preprocess_images(np.stack(pixels)))).numpy()


def test_manifest_records_the_training_preprocessing(cmpm: dict[str, Any]) -> None:
    from itmrt.bundle.folder import read_bundle
    from itmrt.data.images import IMAGE_MEAN, IMAGE_STD

    section = read_bundle(cmpm["bundle"]).manifest["image_preprocessing"]
    assert section["crop"] == {"height": SIZE, "width": SIZE, "at": "center"}
    assert section["resize"]["shorter_side"] == SIZE
    assert np.array_equal(np.float32(section["mean"]), IMAGE_MEAN)
    assert np.array_equal(np.float32(section["std"]), IMAGE_STD)


def test_gallery_from_a_folder_matches_the_pytorch_reference(cmpm: dict[str, Any], tmp_path: Path) -> None:
    from itmrt.runtime import load, read_gallery
    from itmrt.runtime.image_files import list_image_files

    written = _photos(tmp_path / "photos")
    files = list_image_files(tmp_path / "photos")
    assert files.ids == ["a.png", "big.png", "c.webp", "d.jpg", "sub/b.png", "wide.png"]
    runtime = load(cmpm["bundle"], threads=1)
    gallery = runtime.index(files, tmp_path / "gallery")
    assert gallery.ids == files.ids and read_gallery(tmp_path / "gallery").ids == files.ids
    expected = _reference(cmpm["model"], [written[image_id] for image_id in files.ids])
    np.testing.assert_allclose(np.asarray(gallery.embeddings), expected, atol=1e-5, rtol=0)
    # The same embeddings without a gallery, and from a list file naming the same files.
    (tmp_path / "list.txt").write_text("photos/d.jpg\n\n" + str(tmp_path / "photos" / "a.png") + "\n")
    listed = list_image_files(tmp_path / "list.txt")
    assert listed.ids == ["photos/d.jpg", str(tmp_path / "photos" / "a.png")]
    embeddings, ids = runtime.encode_image_files(listed)
    assert ids == listed.ids
    expected = _reference(cmpm["model"], [written["d.jpg"], written["a.png"]])
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_cli_index_and_infer_name_images_by_path(cmpm: dict[str, Any], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _photos(tmp_path / "photos")
    (tmp_path / "caps.txt").write_text("\n".join(random_captions(5, seed=3)) + "\n")
    result = run_cli(capsys, "index", str(cmpm["bundle"]), "--images", str(tmp_path / "photos"),
                     "--out", str(tmp_path / "g"))
    assert result.code == 0, result.err
    assert "indexed 6 images" in result.out
    from_gallery = run_cli(capsys, "infer", str(tmp_path / "g"), "--captions", str(tmp_path / "caps.txt"),
                           "--top-k", "3", "--out", str(tmp_path / "g.jsonl"), "--scores-out", str(tmp_path / "g.npy"))
    assert from_gallery.code == 0, from_gallery.err
    direct = run_cli(capsys, "infer", str(cmpm["bundle"]), "--images", str(tmp_path / "photos"), "--captions",
                     str(tmp_path / "caps.txt"), "--top-k", "3", "--out", str(tmp_path / "d.jsonl"),
                     "--scores-out", str(tmp_path / "d.npy"), "--timings")
    assert direct.code == 0, direct.err
    np.testing.assert_allclose(np.load(tmp_path / "d.npy"), np.load(tmp_path / "g.npy"), atol=1e-6, rtol=0)
    lines = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    ids = ["a.png", "big.png", "c.webp", "d.jpg", "sub/b.png", "wide.png"]
    for line in lines:
        if line["query"] == "caption":
            assert line["image_ids"] == [ids[k] for k in line["images"]]
        else:
            assert line["image_id"] == ids[line["index"]]
    assert (tmp_path / "d.jsonl").read_text() == (tmp_path / "g.jsonl").read_text()
    timings_line = next(line for line in direct.err.splitlines() if line.startswith("timings: "))
    timings = json.loads(timings_line[len("timings: "):])
    assert {"import", "load", "kernels", "encode_images", "encode_captions", "score", "write", "total"} <= set(timings)


def _truncated_jpeg(path: Path) -> None:
    Image.fromarray(_pixels(9)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_unreadable_images_are_named_or_skipped_and_counted(cmpm: dict[str, Any], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _photos(tmp_path / "photos")
    _truncated_jpeg(tmp_path / "photos" / "cut.jpg")
    (tmp_path / "photos" / "fake.png").write_text("this is text, not a PNG")
    common = ["index", str(cmpm["bundle"]), "--images", str(tmp_path / "photos")]
    failed = run_cli(capsys, *common, "--out", str(tmp_path / "g"))
    assert failed.code == 2 and failed.err.count("\n") == 1, failed.err
    assert failed.err.startswith("error: cannot read image ") and "cut.jpg" in failed.err
    assert "--skip-bad-images" in failed.err
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob("*.partial*"))
    skipped = run_cli(capsys, *common, "--out", str(tmp_path / "g"), "--skip-bad-images")
    assert skipped.code == 0, skipped.err
    assert "indexed 6 images (2 unreadable skipped)" in skipped.out
    assert "cut.jpg" in skipped.err and "fake.png" in skipped.err and "skipped 2 of 8 images" in skipped.err
    from itmrt.runtime import read_gallery

    gallery = read_gallery(tmp_path / "g", verify=True)
    assert gallery.ids is not None and "cut.jpg" not in gallery.ids and len(gallery.ids) == len(gallery) == 6


def test_image_sources_that_are_refused(cmpm: dict[str, Any], tmp_path: Path) -> None:
    from itmrt.errors import DataError, ItmrtError
    from itmrt.runtime import load
    from itmrt.runtime.image_files import list_image_files

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        list_image_files(tmp_path / "empty")
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(DataError, match="line 1: no image file"):
        list_image_files(tmp_path / "list.txt")
    Image.fromarray(_pixels(0)).save(tmp_path / "a.png")
    (tmp_path / "twice.txt").write_text("a.png\na.png\n")
    with pytest.raises(DataError, match="listed already"):
        list_image_files(tmp_path / "twice.txt")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "outside.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(DataError, match="outside"):
        list_image_files(tmp_path / "photos")
    Image.fromarray(_pixels(0)).save(tmp_path / "anim.gif")
    (tmp_path / "gif.txt").write_text("anim.gif\n")
    runtime = load(cmpm["bundle"], threads=1)
    with pytest.raises(DataError, match="anim.gif.*not JPEG, PNG or WebP"):
        runtime.encode_image_files(list_image_files(tmp_path / "gif.txt"))
    with pytest.raises(DataError, match="none of the 1 images"), \
            pytest.warns(UserWarning, match="skipped .*anim.gif"):
        runtime.encode_image_files(list_image_files(tmp_path / "gif.txt"), skip_bad_images=True)
    (tmp_path / "one.txt").write_text("a.png\n")
    naaf, _, _ = make_bundle(tmp_path / "naaf")
    with pytest.raises(ItmrtError, match="image files are for CMPM bundles"):
        load(naaf).encode_image_files(list_image_files(tmp_path / "one.txt"))
    # A CMPM bundle exported before the manifest recorded its preprocessing.
    runtime.bundle.manifest = dataclasses.replace(runtime.bundle.manifest, image_preprocessing=None)
    with pytest.raises(ItmrtError, match="export it again"):
        runtime.encode_image_files(list_image_files(tmp_path / "one.txt"))


def test_gallery_names_only_files_inside_itself(cmpm: dict[str, Any], tmp_path: Path) -> None:
    from itmrt.errors import ItmrtError
    from itmrt.runtime import load, read_gallery
    from itmrt.runtime.image_files import list_image_files

    Image.fromarray(_pixels(0)).save(tmp_path / "a.png")
    (tmp_path / "one.txt").write_text("a.png\n")
    load(cmpm["bundle"], threads=1).index(list_image_files(tmp_path / "one.txt"), tmp_path / "g")
    manifest_path = tmp_path / "g" / "gallery.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["ids"]["file"] = "../one.txt"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ItmrtError, match="not a file inside the gallery"):
        read_gallery(tmp_path / "g")
