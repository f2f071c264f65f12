"""Sharded galleries are tied to their bundle's image encoder, not its whole manifest (the one-folder rule).

``itmrt build`` after ``itmrt index --shard-images`` changes the bundle's
``manifest.json`` (it records the new precision graphs); the sharded gallery
must still be searched by ``infer`` and ``serve`` and appended to, while a
bundle with another image encoder is refused in one line. A sharded gallery
made before the identity was recorded opens only with its own manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itmrt.scale import SearchRequest, open_shards, read_sharded_gallery

from cli_helpers import run_cli
from hostile_helpers import assert_one_line
from runtime_helpers import make_bundle, random_captions, region_features
from scale_helpers import quiet

pytest.importorskip("faiss")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("grows")
    bundle = make_bundle(root / "model")[0]
    np.save(root / "features.npy", region_features(30, seed=5))
    (root / "captions.txt").write_text("\n".join(random_captions(6, seed=6, max_words=8)) + "\n")
    return {"root": root, "bundle": bundle}


def _index(capsys: Any, made: dict[str, Any], out: Path, *extra: str) -> None:
    done = run_cli(capsys, "index", str(made["bundle"]), "--images", str(made["root"] / "features.npy"),
                   "--out", str(out), "--shard-images", "12", "--no-warmup", *extra)
    assert done.code == 0, done.err


def _infer(capsys: Any, made: dict[str, Any], gallery: Path, out: Path) -> Any:
    return run_cli(capsys, "infer", str(gallery), "--captions", str(made["root"] / "captions.txt"),
                   "--out", str(out))


def test_build_after_index_keeps_the_sharded_gallery_usable(made: dict[str, Any], tmp_path: Path,
                                                            capsys: Any) -> None:
    bundle, gallery = made["bundle"], tmp_path / "sharded"
    _index(capsys, made, gallery)
    document = json.loads((gallery / "gallery.json").read_text())
    identity = document["bundle"]["image_encoder_sha256"]
    shard_doc = json.loads((gallery / "shard-00000" / "gallery.json").read_text())
    assert shard_doc["bundle"]["image_encoder_sha256"] == identity
    before = _infer(capsys, made, gallery, tmp_path / "before.jsonl")
    assert before.code == 0, before.err
    plain = tmp_path / "plain"  # a one-folder gallery follows the same rule
    assert run_cli(capsys, "index", str(bundle), "--images", str(made["root"] / "features.npy"), "--out", str(plain),
                   "--no-warmup").code == 0

    manifest_before = _sha(bundle / "manifest.json")
    built = run_cli(capsys, "build", str(bundle), "--precision", "fp16")  # the real command: a grown manifest
    assert built.code == 0, built.err
    assert _sha(bundle / "manifest.json") != manifest_before

    after = _infer(capsys, made, gallery, tmp_path / "after.jsonl")
    assert after.code == 0, after.err
    assert (tmp_path / "after.jsonl").read_text() == (tmp_path / "before.jsonl").read_text()
    one = _infer(capsys, made, plain, tmp_path / "plain.jsonl")  # precision/fp16/image_encoder.onnx is no weight
    assert one.code == 0, one.err
    assert (tmp_path / "plain.jsonl").read_text() == (tmp_path / "before.jsonl").read_text()

    from itmrt.serve.client import ServiceClient
    from itmrt.serve.server import ServeOptions, Service

    from serve_helpers import running

    captions = (made["root"] / "captions.txt").read_text().split("\n")[:3]
    with running(Service(gallery, options=ServeOptions(port=0, configure_logging=False, threads=1))) as service, \
            ServiceClient(service.url) as client:
        served = client.search(captions, 5)
    shards = open_shards(gallery, threads=1, warn=quiet)
    expected = shards.search(shards.runtime.encode_captions(captions), SearchRequest(k=5)).t2i
    np.testing.assert_array_equal(served.indices, expected.indices)

    _index(capsys, made, gallery, "--append")  # the grown bundle appends: its new shards record the new manifest
    grown = read_sharded_gallery(gallery)
    assert len(grown) == 60 and len(grown.shards) == 6
    newest = json.loads((gallery / grown.shards[-1].name / "gallery.json").read_text())
    assert newest["bundle"]["manifest_sha256"] == _sha(bundle / "manifest.json") != manifest_before
    assert newest["bundle"]["image_encoder_sha256"] == identity
    again = _infer(capsys, made, gallery, tmp_path / "again.jsonl")
    assert again.code == 0 and "6 shards" in again.out, again.err


def test_another_image_encoder_is_refused_and_old_sharded_galleries_need_their_manifest(
        made: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(made["bundle"], bundle)
    mine = dict(made, bundle=bundle)
    gallery, old = tmp_path / "sharded", tmp_path / "old"
    _index(capsys, mine, gallery)
    _index(capsys, mine, old)
    document = json.loads((old / "gallery.json").read_text())
    document["bundle"].pop("image_encoder_sha256")  # as sharded galleries were written before the record
    (old / "gallery.json").write_text(json.dumps(document))
    assert _infer(capsys, mine, old, tmp_path / "old.jsonl").code == 0  # its own manifest: searched

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["created"] = "another export"  # the manifest changes, the image encoder does not
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert _infer(capsys, mine, gallery, tmp_path / "a.jsonl").code == 0
    assert_one_line(_infer(capsys, mine, old, tmp_path / "b.jsonl"), "predates image-encoder records")

    manifest["graphs"]["image_encoder"]["outputs"][0]["name"] = "other_embeddings"  # another image encoder
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line(_infer(capsys, mine, gallery, tmp_path / "c.jsonl"), "has another image encoder",
                    "re-index the gallery")
    refused = run_cli(capsys, "index", str(bundle), "--images", str(made["root"] / "features.npy"),
                      "--out", str(gallery), "--append", "--no-warmup")
    assert_one_line(refused, "another bundle's image encoder")
