"""A region index whose every sha256 was written again around hostile values (a gallery's top document is its own
root of trust): codes and lists that would index outside their arrays, non-finite centroids or projections,
residuals of another dtype, search defaults that are not counts. Each is refused in one line when the gallery
opens, by the API and by the commands, before any kernel reads it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.scale import IndexSpec, SearchRequest, ShardingOptions, index_sharded, open_shards

from cli_helpers import run_cli
from runtime_helpers import make_bundle, random_captions, region_features
from scale_helpers import quiet

pytest.importorskip("faiss")

SHARD = "shard-00000"


@pytest.fixture(scope="module")
def galleries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile-regions")
    bundle = make_bundle(root / "model")[0]
    runtime = load(bundle, threads=1, warn=quiet)
    features = region_features(40, seed=5)
    for storage, sketch in (("exact", "256:512"), ("compact", "256")):
        index_sharded(runtime, features, root / storage,
                      ShardingOptions(20, None, IndexSpec("regions", regions_storage=storage, region_sketch=sketch)))
    (root / "captions.txt").write_text("\n".join(random_captions(2, seed=6, max_words=8)) + "\n")
    np.save(root / "more.npy", region_features(6, seed=7))
    return {"root": root, "runtime": runtime, "bundle": bundle}


def _copy(galleries: dict[str, Any], base: str, name: str) -> Path:
    """A fresh copy of the fixture's ``base`` gallery, to be made hostile."""
    gallery = galleries["root"] / name
    shutil.rmtree(gallery, ignore_errors=True)
    shutil.copytree(galleries["root"] / base, gallery)
    return gallery


def _edit_top(gallery: Path, change: Callable[[dict[str, Any]], None]) -> None:
    top = json.loads((gallery / "gallery.json").read_text())
    change(top)
    (gallery / "gallery.json").write_text(json.dumps(top))


def _reseal(gallery: Path) -> None:
    """The shard's document's sha256 written again into the gallery's document, as a hostile editor would."""
    digest = hashlib.sha256((gallery / SHARD / "gallery.json").read_bytes()).hexdigest()

    def reseal(top: dict[str, Any]) -> None:
        for shard in top["shards"]:
            if shard["name"] == SHARD:
                shard["sha256"] = digest

    _edit_top(gallery, reseal)


def _rewrite_array(gallery: Path, role: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    document = json.loads((gallery / SHARD / "gallery.json").read_text())
    entry = document["region_index"][role]
    path = gallery / SHARD / entry["file"]
    np.save(path, change(np.load(path)))
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (gallery / SHARD / "gallery.json").write_text(json.dumps(document))
    _reseal(gallery)


def _rewrite_param(gallery: Path, key: str, value: Any) -> None:
    document = json.loads((gallery / SHARD / "gallery.json").read_text())
    params = document["region_index"]["params"]
    if value is None:
        params.pop(key)
    else:
        params[key] = value
    (gallery / SHARD / "gallery.json").write_text(json.dumps(document))
    _reseal(gallery)


def _first_set(value: Any) -> Callable[[np.ndarray], np.ndarray]:
    def change(array: np.ndarray) -> np.ndarray:
        changed = array.copy()
        changed.flat[0] = value
        return changed
    return change


ARRAYS = {
    "a negative code": ("both", "codes", lambda a: _first_set(-3)(a.astype(np.int32)), "codes are not"),
    "a code past the centroids": ("both", "codes", _first_set(10**4), "codes are not"),
    "codes as floats": ("both", "codes", lambda a: a.astype(np.float32), "codes are not"),
    "a listed row below 0": ("both", "lists", lambda a: np.concatenate([a[:-1], np.array([-7], a.dtype)]),
                             "inverted lists do not list rows"),
    "list offsets that go back": ("both", "lists", _first_set(5), "inverted lists do not list rows"),
    "a centroid not finite": ("both", "centroids", _first_set(np.nan), "finite"),
    "a projection not finite": ("both", "projection", _first_set(np.inf), "sketches do not fit its projection"),
    "residuals of another dtype": ("compact", "residuals", lambda a: a.astype(np.int16),
                                   "packed residuals do not fit"),
}
PARAMS = {
    "nprobe a string": ("nprobe", "8", "records nprobe '8', not an integer"),
    "nprobe 0": ("nprobe", 0, "records nprobe 0, not an integer from 1"),
    "candidates missing": ("candidates", None, "records candidates missing"),
    "refine below 0": ("refine", -1, "records refine -1"),
    "union below 0": ("union", -2, "records union -2"),
    "prefilter a fraction": ("prefilter", 2.5, "records prefilter 2.5"),
    "the centroid count a string": ("centroids", "x", "records centroids 'x'"),
    "poor_fit a string": ("poor_fit", "x", "records poor_fit 'x', not a number"),
}


def _refused(galleries: dict[str, Any], gallery: Path, message: str, capsys: Any) -> None:
    with pytest.raises(ItmrtError, match=message) as caught:
        open_shards(gallery, threads=1, warn=quiet).search(
            galleries["runtime"].encode_captions(["a dog"]), SearchRequest(k=3, shortlist=5))
    assert "\n" not in str(caught.value) and "re-index the gallery" in str(caught.value)
    out = galleries["root"] / "answers.jsonl"
    for args in (("infer", str(gallery), "--out", str(out)), ("audit", str(gallery), "--sample", "2")):
        result = run_cli(capsys, *args, "--captions", str(galleries["root"] / "captions.txt"), "--top-k", "3",
                         "--shortlist", "5")
        assert result.code == 2 and message in result.err.replace("\n", " ") and result.err.count("\n") == 1, \
            (args[0], result.err)
    assert not out.exists()


@pytest.mark.parametrize(("storage", "case"), [(storage, case) for case in sorted(ARRAYS)
                                               for storage in ("exact", "compact")
                                               if ARRAYS[case][0] in ("both", storage)])
def test_index_arrays_resealed_around_hostile_values_are_refused_in_one_line(
        galleries: dict[str, Any], capsys: Any, storage: str, case: str) -> None:
    _, role, change, message = ARRAYS[case]
    gallery = _copy(galleries, storage, f"hostile-{storage}")
    _rewrite_array(gallery, role, change)
    _refused(galleries, gallery, message, capsys)


@pytest.mark.parametrize("case", sorted(PARAMS))
def test_search_defaults_resealed_around_values_that_are_not_counts_are_refused_in_one_line(
        galleries: dict[str, Any], capsys: Any, case: str) -> None:
    key, value, message = PARAMS[case]
    gallery = _copy(galleries, "compact", "hostile-params")
    _rewrite_param(gallery, key, value)
    _refused(galleries, gallery, message, capsys)


def test_the_untouched_galleries_and_a_resealed_but_unchanged_one_search(galleries: dict[str, Any]) -> None:
    gallery = _copy(galleries, "compact", "resealed")
    _rewrite_array(gallery, "codes", lambda a: a)
    captions = galleries["runtime"].encode_captions(["a dog", "two cats"])
    for path in (galleries["root"] / "exact", galleries["root"] / "compact", gallery):
        found = open_shards(path, threads=1, warn=quiet).search(captions, SearchRequest(k=3, shortlist=5))
        assert found.t2i is not None and found.t2i.indices.shape == (2, 3)


def test_a_top_document_recording_another_item_shape_than_its_shards_hold_is_refused_in_one_line(
        galleries: dict[str, Any], capsys: Any) -> None:
    gallery = _copy(galleries, "exact", "hostile-shape")
    _edit_top(gallery, lambda top: top.update(item_shape=[top["item_shape"][0], 5]))  # was: captions of a wrong size
    _refused(galleries, gallery, "holds items of shape", capsys)


@pytest.mark.parametrize(("change", "message"), [
    (lambda top: top["shortlist_index"].update(nprobe="x"), "records a shortlist index that cannot be built again"),
    (lambda top: top.pop("shortlist_index"), "records no shortlist index"),  # was: flat shards beside region ones
])
def test_an_append_to_a_gallery_recording_a_shortlist_index_no_build_takes_names_the_document(
        galleries: dict[str, Any], capsys: Any, change: Callable[[dict[str, Any]], None], message: str) -> None:
    gallery = _copy(galleries, "compact", "hostile-append")
    _edit_top(gallery, change)
    before = (gallery / "gallery.json").read_bytes()
    result = run_cli(capsys, "index", str(galleries["bundle"]), "--images", str(galleries["root"] / "more.npy"),
                     "--out", str(gallery), "--append")
    assert result.code == 2 and result.err.count("\n") == 1, result.err
    assert f"gallery.json {message}" in result.err  # not "--nprobe ...", not rc 0
    assert (gallery / "gallery.json").read_bytes() == before
    original = galleries["root"] / "compact"
    assert sorted(p.name for p in gallery.iterdir()) == sorted(p.name for p in original.iterdir())
