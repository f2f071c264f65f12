"""Sharded galleries (no Ray): layout and hashes, appending, float16 storage, the FAISS shortlist, exact merging.

Every search result is compared with the one-gallery runtime
(``Runtime.rank`` on an unsharded gallery of the same images), which is what a
sharded gallery must reproduce.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from itmrt.errors import ItmrtError
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.gallery import read_gallery
from itmrt.runtime.shortlist import (
    caption_global_vectors,
    image_global_vectors,
    top_candidates,
)
from itmrt.runtime.tiled import top_k_of_matrix
from itmrt.scale import (
    IndexSpec,
    LocalShards,
    RayOptions,
    SearchRequest,
    ShardingOptions,
    index_sharded,
    open_shards,
    read_sharded_gallery,
)
from itmrt.scale.audit import audit
from itmrt.scale.index import ShortlistIndex, build_index
from itmrt.scale.shard import ShardAnswer, merge_answers
from itmrt.scale.writer import ShardedWriter

from cli_helpers import run_cli
from scale_helpers import N_IMAGES, quiet, same_top_k, scale_setup

faiss = pytest.importorskip("faiss")

BOTH = ("t2i", "i2t")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return scale_setup(tmp_path_factory.mktemp("scale"), seed=31, captions=23)


def test_gallery_json_lists_shards_with_counts_and_hashes_each_tied_to_the_bundle(setup: dict[str, Any]) -> None:
    root, runtime = setup["root"], setup["runtime"]
    document = json.loads((root / "sharded" / "gallery.json").read_text())
    assert document["kind"] == "itmrt-sharded-gallery" and document["images"] == N_IMAGES
    assert [(s["name"], s["first"], s["images"]) for s in document["shards"]] == [
        ("shard-00000", 0, 17), ("shard-00001", 17, 17), ("shard-00002", 34, 16)]
    for entry in document["shards"]:
        shard = root / "sharded" / entry["name"]
        assert entry["sha256"] == hashlib.sha256((shard / "gallery.json").read_bytes()).hexdigest()
        own = read_gallery(shard, verify=True)
        assert own.manifest["bundle"]["manifest_sha256"] == runtime.bundle.manifest_sha256
        index = own.manifest["shortlist"]["index"]
        assert index["kind"] == "flat" and index["built_from"] == own.manifest["shortlist"]["vectors"]["sha256"]
        assert own.manifest["shortlist"]["vectors"]["made_from"] == own.manifest["embeddings"]["sha256"]
    assert not [p for p in (root).iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_sharded_full_search_equals_one_gallery(setup: dict[str, Any]) -> None:
    runtime, encoded = setup["runtime"], setup["encoded"]
    reference = runtime.rank(setup["plain"], encoded, top_k=7, keep_scores=True)
    shards = open_shards(setup["sharded"], threads=1, warn=quiet)
    got = shards.search(encoded, SearchRequest(k=7, directions=BOTH, keep_scores=True))
    same_top_k(got.t2i, reference.t2i)
    same_top_k(got.i2t, reference.i2t)
    np.testing.assert_array_equal(got.scores, reference.scores)
    assert got.pairs == N_IMAGES * len(encoded) and set(got.shard_seconds) == {s.name for s in shards.gallery.shards}


def test_a_large_sharded_scan_of_one_caption_loads_the_region_kernels(setup: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard read by position is scored block by block, each call too small to pay for the region kernels'
    import; a scan whose blocks together pass :data:`LARGE_CALL_VALUES` loads them, as one call over the shard
    would (a one-caption command over 100,000 float16 images spent 2 s more in ONNX Runtime's Gram graph), and
    answers as the plain gallery does."""
    pytest.importorskip("numba")
    from itmrt.runtime import one_caption, region_kernels

    if not region_kernels.available():
        pytest.skip("this CPU has no hardware half-float conversion: the scorer keeps ONNX Runtime's cast")
    encoded = setup["encoded"]
    one = CaptionEmbeddings(encoded.vectors[: int(encoded.lengths[0])], encoded.lengths[:1], encoded.offsets[:2])
    reference = setup["runtime"].rank(setup["plain"], one, top_k=7)
    small = open_shards(setup["sharded"], threads=1, warn=quiet)
    small.search(one, SearchRequest(k=7, directions=("t2i",)))
    assert not small.runtime.one_caption.region_kernels_loaded  # 17 images a shard: below the rule
    from itmrt.scale import positional

    image_values = int(setup["features"].shape[1]) * int(encoded.vectors.shape[1])
    monkeypatch.setattr(one_caption, "LARGE_CALL_VALUES", 17 * image_values)  # one shard's stored values
    monkeypatch.setattr(positional, "BLOCK_BYTES", 4 * image_values * 4)  # read 4 images at a time
    shards = open_shards(setup["sharded"], threads=1, warn=quiet)
    assert type(shards.shards[0].gallery.embeddings).__name__ == "PositionalRows"
    got = shards.search(one, SearchRequest(k=7, directions=("t2i",)))
    assert shards.runtime.one_caption.region_kernels_loaded
    np.testing.assert_array_equal(got.t2i.indices, reference.t2i.indices)
    np.testing.assert_allclose(got.t2i.scores, reference.t2i.scores, rtol=0, atol=1e-5)


def malformed_captions(good: CaptionEmbeddings) -> dict[str, tuple[Any, str]]:
    """Caption sets made by hand, each wrong in one way, and what its error says."""
    vectors, lengths, offsets = good.vectors, good.lengths, good.offsets
    return {
        "strings": (["a dog"], "must be encoded first"),
        "lengths past the vectors": (CaptionEmbeddings(vectors, lengths + 3, offsets), "offsets must start at 0"),
        "offsets past the vectors": (CaptionEmbeddings(vectors, lengths, offsets + 5), "offsets must start at 0"),
        "offsets one short": (CaptionEmbeddings(vectors, lengths, offsets[:-1]), "offsets must be"),
        "no offsets": (CaptionEmbeddings(vectors, lengths), "vectors for 2 captions"),
        "float lengths": (CaptionEmbeddings(vectors, lengths.astype(np.float32), offsets), "integer array"),
        "one vector": (CaptionEmbeddings(vectors[0], lengths, offsets), "2-D float array"),
        "another size": (CaptionEmbeddings(vectors[:, :-1], lengths, offsets), "caption embeddings of size"),
        "global kind": (CaptionEmbeddings(vectors[:2], lengths), "not of the kind this bundle scores"),
    }


def test_caption_embeddings_made_by_hand_wrong_are_one_line(setup: dict[str, Any]) -> None:
    # each failed inside numpy or ONNX Runtime (an index out of bounds, a missing input, an assertion)
    runtime = setup["runtime"]
    shards = open_shards(setup["sharded"], threads=1, warn=quiet)
    for name, (captions, expected) in malformed_captions(runtime.encode_captions(setup["captions"][:2])).items():
        for request in (SearchRequest(k=3), SearchRequest(k=3, shortlist=5)):
            with pytest.raises(ItmrtError, match=expected) as caught:
                shards.search(captions, request)
            assert "\n" not in str(caught.value), name
        if name not in ("another size", "global kind"):  # the runtime's own checks name those
            with pytest.raises(ItmrtError, match=expected):
                runtime.rank(setup["plain"], captions, top_k=3)
    shards.close()


def test_a_search_request_of_the_wrong_type_is_one_line(setup: dict[str, Any]) -> None:
    # None or a dict failed as "'NoneType' object has no attribute 'check'"
    shards = open_shards(setup["sharded"], threads=1, warn=quiet)
    for request in (None, {"k": 3}):
        with pytest.raises(ItmrtError, match="^the request must be an itmrt.scale.SearchRequest"):
            shards.search(setup["encoded"], request)  # type: ignore[arg-type]
    shards.close()


def test_no_captions_are_the_same_line_with_and_without_a_shortlist(setup: dict[str, Any]) -> None:
    # "nothing to score: no images or no captions" or "no captions to shortlist" (and a region shortlist answered)
    shards = open_shards(setup["sharded"], threads=1, warn=quiet)
    for request in (SearchRequest(k=3), SearchRequest(k=3, shortlist=5), SearchRequest(k=3, directions=("i2t",))):
        with pytest.raises(ItmrtError, match=r"^no captions to search: encode at least one caption \(shards\.runtime"):
            shards.search(setup["encoded"].take([]), request)
    shards.close()


def test_region_index_options_on_a_gallery_without_one_are_one_line(setup: dict[str, Any], tmp_path: Path,
                                                                      capsys: Any) -> None:
    # they were ignored without a word (and itmrt audit reported an nprobe it never used)
    shards = open_shards(setup["sharded"], threads=1, warn=quiet)
    for options in ({"nprobe": 3}, {"exact_pass": 20, "refine": 5}, {"budget": 20}):
        with pytest.raises(ItmrtError, match="a region index; the shards of .* shortlist by global vectors"):
            shards.search(setup["encoded"], SearchRequest(k=3, shortlist=10, **options))
    shards.close()
    out = tmp_path / "out.json"
    result = run_cli(capsys, "infer", str(setup["sharded"]), "--captions", str(setup["root"] / "captions.txt"),
                     "--shortlist", "10", "--nprobe", "3", "--out", str(out))
    assert result.code == 2 and "--nprobe searches a region index" in result.err, result.err
    assert result.err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize(("spec", "expected"), [
    (IndexSpec("hnsw", hnsw_ef_search=10**12), "--hnsw-ef-search must be at most 16777216"),  # written, and
    # every search of the gallery then failed: "OverflowError: in method 'HNSW_efSearch_set'"
    (IndexSpec("hnsw", hnsw_ef_construction=2**31), "--hnsw-ef-construction must be at most 16777216"),
    (IndexSpec("hnsw", hnsw_m=2**31), "--hnsw-m must be at most 1024"),  # "Wrong number or type of arguments"
    (IndexSpec("hnsw", hnsw_m=10**7), "--hnsw-m must be at most 1024"),  # gigabytes of links for 20 images
    (IndexSpec("regions", region_centroids=10**12), "--region-centroids must be at most 16777216"),
])
def test_index_counts_past_their_range_are_one_line_and_write_nothing(setup: dict[str, Any], tmp_path: Path,
                                                                      spec: IndexSpec, expected: str) -> None:
    with pytest.raises(ItmrtError, match=expected) as caught:
        index_sharded(setup["runtime"], setup["features"][:20], tmp_path / "out", ShardingOptions(8, None, spec))
    assert "\n" not in str(caught.value) and not list(tmp_path.iterdir())
    index_sharded(setup["runtime"], setup["features"][:20], tmp_path / "out",
                  ShardingOptions(8, None, IndexSpec("hnsw", hnsw_m=np.int64(1024))))  # the largest taken


def test_index_cli_bounds_the_index_counts_as_the_api(setup: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    for flag, value in (("--hnsw-ef-search", "1000000000000"), ("--hnsw-m", "1025")):
        result = run_cli(capsys, "index", str(setup["bundle"]), "--images", str(setup["root"] / "features.npy"),
                         "--out", str(out), "--shard-images", "20", "--shortlist-index", "hnsw", flag, value)
        assert result.code == 2 and flag in result.err and result.err.count("\n") == 1, result.err
        assert not out.exists()


@pytest.mark.parametrize(("keywords", "expected"), [
    ({"sample": 2.5}, "--sample must be an integer from 1 to 16777216, not 2.5"),  # inside numpy's choice
    ({"sample": "2"}, "--sample must be an integer from 1 to 16777216, not '2'"),  # a TypeError in a comparison
    ({"sample": True}, "--sample must be an integer from 1"),
    ({"seed": -1}, "--seed must be an integer from 0 to 4294967295, not -1"),  # "expected non-negative integer"
    ({"seed": 1.5}, "--seed must be an integer from 0 to 4294967295, not 1.5"),  # inside numpy's SeedSequence
    ({"captions": "word1 word2 word3"}, "the captions to audit must be a list of strings"),  # sampled by letter
    ({"k": "3"}, "--top-k must be an integer, not '3'"),  # a TypeError comparing it with the recorded K
])
def test_audit_refuses_a_sample_seed_or_captions_of_the_wrong_kind_in_one_line(setup: dict[str, Any],
                                                                              keywords: dict[str, Any],
                                                                              expected: str) -> None:
    shards = open_shards(setup["sharded"], threads=1, warn=quiet)
    given = {"captions": setup["captions"], "sample": 3, "k": 3, "seed": 0, **keywords}
    with pytest.raises(ItmrtError) as caught:
        audit(shards, given["captions"], given["sample"], k=given["k"], seed=given["seed"])
    shards.close()
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_audit_takes_numpy_integers_and_reports_python_numbers(setup: dict[str, Any], tmp_path: Path,
                                                               capsys: Any) -> None:
    # the report kept np.int64 values, which json.dumps refuses
    shards = open_shards(setup["sharded"], threads=1, warn=quiet)
    report = audit(shards, setup["captions"], np.int64(3), k=np.int64(3), shortlist=np.int32(5), seed=np.uint32(2))
    shards.close()
    assert json.loads(json.dumps(report))["k"] == 3 and report["shortlist_per_shard"] == 5
    out = tmp_path / "audit.json"
    result = run_cli(capsys, "audit", str(setup["sharded"]), "--captions", str(setup["root"] / "captions.txt"),
                     "--sample", "3", "--seed", "-1", "--out", str(out))  # a NumPy traceback
    assert result.code == 2 and "--seed" in result.err and result.err.count("\n") == 1, result.err
    assert not out.exists()


@pytest.mark.parametrize(("options", "expected"), [
    (ShardingOptions(2.5), "--shard-images must be an integer of at least 1, not 2.5"),
    (ShardingOptions(True), "--shard-images must be an integer of at least 1, not True"),  # wrote an unreadable one
    (ShardingOptions(8, None, IndexSpec("regions", nprobe=2.5)), "--nprobe must be an integer"),  # recorded as 2.5
    (ShardingOptions(8, None, IndexSpec("hnsw", hnsw_m="4")), "--hnsw-m must be an integer"),
    (ShardingOptions(8, None, IndexSpec("ivf", ivf_lists=2.5)), "--ivf-lists must be an integer"),
    (ShardingOptions(8, None, IndexSpec("regions", regions_storage="compact", residual_bits="2")),
     "--residual-bits must be a number"),
    (ShardingOptions(8, None, {"kind": "regions"}), "must be an IndexSpec"),  # type: ignore[arg-type]
    (None, "options must be an itmrt.scale.ShardingOptions"),  # 'NoneType' object has no attribute 'check'
])
def test_sharding_options_of_the_wrong_type_are_one_line_and_write_nothing(setup: dict[str, Any], tmp_path: Path,
                                                                          options: ShardingOptions,
                                                                          expected: str) -> None:
    # each failed inside FAISS or numpy, or wrote a gallery its own reader refuses or that holds a float count
    with pytest.raises(ItmrtError, match=expected) as caught:
        index_sharded(setup["runtime"], setup["features"][:20], tmp_path / "out", options)
    assert "\n" not in str(caught.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("keywords", "expected"), [
    ({"copy_mb": "10"}, "copy_mb (--copy-shards-mb) must be a finite number, not '10'"),  # a TypeError in a comparison
    ({"copy_mb": -5}, "copy_mb (--copy-shards-mb) must be in [0, "),  # taken as "never copy"
    ({"copy_mb": float("nan")}, "copy_mb (--copy-shards-mb) must be a finite number, not nan"),
    ({"verify": "no"}, "verify must be True or False, not 'no'"),  # verified the shards (a true string)
    ({"ray": "local"}, "ray must be an itmrt.scale.RayOptions"),  # 'str' object has no attribute 'check'
    ({"ray": RayOptions(workers="2")}, "--ray-workers must be an integer"),  # type: ignore[arg-type]
])
def test_open_shards_options_of_the_wrong_type_are_one_line_before_the_bundle_loads(
        setup: dict[str, Any], keywords: dict[str, Any], expected: str) -> None:
    with pytest.raises(ItmrtError) as caught:
        open_shards(setup["root"] / "no gallery here", threads=1, warn=quiet, **keywords)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
    if "copy_mb" in keywords:  # the class open_shards makes checks it too
        with pytest.raises(ItmrtError) as caught:
            LocalShards(setup["runtime"], read_sharded_gallery(setup["sharded"]), copy_mb=keywords["copy_mb"])
        assert str(caught.value).startswith(expected)


def test_numpy_counts_in_sharding_options_are_taken_as_numbers(setup: dict[str, Any], tmp_path: Path) -> None:
    # FAISS's constructors refused a numpy integer, and JSON a numpy float
    spec = IndexSpec("ivf", ivf_lists=np.int64(2), hnsw_m=np.int32(4), residual_bits=np.float32(3))
    index_sharded(setup["runtime"], setup["features"][:20], tmp_path / "out", ShardingOptions(np.int64(8), None, spec))
    recorded = json.loads((tmp_path / "out" / "gallery.json").read_text())
    assert recorded["shard_images"] == 8 and recorded["shortlist_index"]["ivf_lists"] == 2
    open_shards(tmp_path / "out", threads=1, warn=quiet).close()


def test_one_shard_flat_index_gives_the_numpy_shortlist(setup: dict[str, Any]) -> None:
    runtime, encoded, root = setup["runtime"], setup["encoded"], setup["root"]
    index_sharded(runtime, setup["features"], root / "one", ShardingOptions(shard_images=N_IMAGES))
    shards = open_shards(root / "one", threads=1, warn=quiet)
    for shortlist in (7, 12, N_IMAGES):
        reference = runtime.rank(setup["plain"], encoded, top_k=7, shortlist=shortlist)
        got = shards.search(encoded, SearchRequest(k=7, shortlist=shortlist, directions=BOTH))
        same_top_k(got.t2i, reference.t2i)
        same_top_k(got.i2t, reference.i2t)


def test_flat_index_candidates_equal_the_numpy_shortlist() -> None:
    rng = np.random.default_rng(5)
    items = rng.standard_normal((300, 24)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    raw, record = build_index(items, IndexSpec("flat"))
    record["sha256"] = hashlib.sha256(raw).hexdigest()
    index = ShortlistIndex(faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8)), record)
    for k in (1, 3, 10, 300, 400):
        for batch in (queries[:1], queries[:7], queries):
            np.testing.assert_array_equal(index.candidates(batch, k), top_candidates(batch, items, k))


def test_ivf_and_hnsw_record_their_parameters_and_find_real_rows(setup: dict[str, Any]) -> None:
    runtime, root, encoded = setup["runtime"], setup["root"], setup["encoded"]
    vectors = image_global_vectors(setup["plain"].embeddings)
    caption_vectors = caption_global_vectors(encoded)
    exact = top_candidates(caption_vectors, vectors, 10)
    for spec in (IndexSpec("ivf", ivf_lists=4, ivf_probe=4), IndexSpec("hnsw", hnsw_m=8, hnsw_ef_search=32)):
        out = root / f"approx-{spec.kind}"
        gallery = index_sharded(runtime, setup["features"], out, ShardingOptions(N_IMAGES, index=spec))
        entry = read_gallery(out / gallery.shards[0].name).manifest["shortlist"]["index"]
        assert entry["kind"] == spec.kind and entry["params"] == spec.params(N_IMAGES)
        shard = open_shards(out, threads=1, warn=quiet).shards[0]
        found = shard.candidates(caption_vectors, 10)
        assert all(len(set(row)) == 10 and row.min() >= 0 for row in found)
        if spec.kind == "ivf":  # every list probed: exhaustive, so exactly the flat shortlist
            np.testing.assert_array_equal(found, exact)
        else:
            assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]) > 0.9


def test_appending_adds_shards_without_rewriting_old_ones(setup: dict[str, Any], tmp_path: Path) -> None:
    runtime, features = setup["runtime"], setup["features"]
    out = tmp_path / "grown"
    index_sharded(runtime, features[:20], out, ShardingOptions(shard_images=12, dtype="float16"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*/*")}
    grown = index_sharded(runtime, features[20:], out, ShardingOptions(shard_images=12), append=True)
    assert [(s.name, s.first, s.images) for s in grown.shards] == [
        ("shard-00000", 0, 12), ("shard-00001", 12, 8), ("shard-00002", 20, 12), ("shard-00003", 32, 12),
        ("shard-00004", 44, 6)]
    assert all((p.stat().st_mtime_ns, p.read_bytes()) == held for p, held in before.items())
    assert grown.dtype == "float16" and not [p for p in out.iterdir() if p.name.startswith(".")]
    # the grown gallery searches as one float16 gallery of every image would
    reference = runtime.rank(runtime.index(features, tmp_path / "whole16", dtype="float16"), setup["encoded"], top_k=5)
    same_top_k(open_shards(out, threads=1, warn=quiet).search(setup["encoded"], SearchRequest(k=5)).t2i, reference.t2i)
    with pytest.raises(ItmrtError, match="stores float16; drop --dtype"):
        index_sharded(runtime, features[:3], out, ShardingOptions(5, dtype="float32"), append=True)
    with pytest.raises(ItmrtError, match="not one"):
        index_sharded(runtime, features[:3], setup["root"] / "plain", ShardingOptions(5), append=True)


def test_an_append_in_progress_locks_the_gallery_and_a_failed_one_leaves_nothing(setup: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    runtime = setup["runtime"]
    out = tmp_path / "locked"
    index_sharded(runtime, setup["features"][:10], out, ShardingOptions(shard_images=10))
    document = (out / "gallery.json").read_bytes()
    with ShardedWriter(out, runtime.bundle, ShardingOptions(5), append=True) as first:
        with pytest.raises(ItmrtError, match="another process is appending"):
            ShardedWriter(out, runtime.bundle, ShardingOptions(5), append=True)

        def broken(folder: Path) -> Any:
            runtime.index(setup["features"][:5], folder)
            raise RuntimeError("the disk filled up")

        with pytest.raises(RuntimeError):
            first.add(broken)
    assert (out / "gallery.json").read_bytes() == document
    assert sorted(p.name for p in out.iterdir()) == ["gallery.json", "shard-00000"]
    with pytest.raises(ItmrtError, match="already holds a gallery"):
        index_sharded(runtime, setup["features"][:5], out, ShardingOptions(5))


def test_float16_storage_is_half_the_size_and_close_to_float32(setup: dict[str, Any], tmp_path: Path) -> None:
    runtime, encoded = setup["runtime"], setup["encoded"]
    half = runtime.index(setup["features"], tmp_path / "half", dtype="float16")
    assert half.embeddings.dtype == np.float16
    full_size = (setup["plain"].path / "image_embeddings.npy").stat().st_size
    assert (half.path / "image_embeddings.npy").stat().st_size < 0.51 * full_size
    error = np.abs(runtime.score(half, encoded) - runtime.score(setup["plain"], encoded))
    # rounding moves every similarity a little; NAAF's masks jump where one crosses the threshold
    assert error.max() > 0 and np.quantile(error, 0.95) < 1e-3 and error.max() < 0.1


def test_tampered_shards_are_refused(setup: dict[str, Any], tmp_path: Path) -> None:
    runtime = setup["runtime"]
    out = tmp_path / "tampered"
    index_sharded(runtime, setup["features"][:12], out, ShardingOptions(shard_images=6))
    shard_doc = out / "shard-00001" / "gallery.json"
    shard_doc.write_text(shard_doc.read_text().replace('"precision": "fp32"', '"precision": "int8"'))
    with pytest.raises(ItmrtError, match="does not match the sha256"):
        open_shards(out, threads=1, warn=quiet)
    document = json.loads((out / "gallery.json").read_text())
    document["shards"][1]["name"] = "../plain"
    (out / "gallery.json").write_text(json.dumps(document))
    with pytest.raises(ItmrtError, match="not a name inside the gallery"):
        read_sharded_gallery(out)
    document["shards"][1]["name"] = "shard-00001"
    (out / "gallery.json").write_text(json.dumps(document))
    shutil.move(out / "shard-00001", tmp_path / "elsewhere")
    (out / "shard-00001").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ItmrtError, match="shard-00001 is a symbolic link"):
        read_sharded_gallery(out)
    index_sharded(runtime, setup["features"][:12], out, ShardingOptions(shard_images=6), overwrite=True)
    with open(out / "shard-00000" / "shortlist.faiss", "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\0\0\0\1")
    with pytest.raises(ItmrtError, match="shortlist.faiss does not match the sha256"):
        open_shards(out, threads=1, warn=quiet)


@pytest.mark.parametrize(("change", "key"), [
    (lambda d: d.update(shards=None), "'shards' must be"),
    (lambda d: d.update(shards=5), "'shards' must be"),
    (lambda d: d.update(shards=[None]), "'shards[0]' must be"),
    (lambda d: d.update(shards=[]), "'shards' lists no shards"),
    (lambda d: d.update(images=-1), "'images'"),
    (lambda d: d.update(images=1000), "'images' is 1000, but the shards hold 12 images"),
    (lambda d: d.update(item_shape=[-10, 32]), "'item_shape[0]'"),
    (lambda d: d.update(shard_images=0), "'shard_images'"),
    (lambda d: d.update(shard_images="10"), "'shard_images' must be"),
    (lambda d: d.update(ids="yes"), "'ids' must be"),
    (lambda d: d.update(dtype="int4"), "'dtype'"),
    (lambda d: d["shards"][1].update(first=False), "'shards[1].first' must be"),
    (lambda d: d["shards"][1].update(name=0), "'shards[1].name' must be"),
    (lambda d: d["shards"][1].update(sha256="x"), "'shards[1].sha256'"),
    (lambda d: d["bundle"].update(manifest_sha256=None), "'bundle.manifest_sha256'"),
])
def test_a_malformed_top_document_is_one_line_naming_the_key(setup: dict[str, Any], tmp_path: Path,
                                                             change: Any, key: str) -> None:
    out = tmp_path / "malformed"
    index_sharded(setup["runtime"], setup["features"][:12], out, ShardingOptions(shard_images=6))
    document = json.loads((out / "gallery.json").read_text())
    change(document)
    (out / "gallery.json").write_text(json.dumps(document))
    with pytest.raises(ItmrtError) as caught:
        read_sharded_gallery(out)
    message = str(caught.value)
    assert key in message and "\n" not in message and message.startswith(str(out / "gallery.json")), message


def test_shards_open_side_by_side_and_a_failure_names_the_first_bad_shard(setup: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    """Shards are opened (verified) on one thread per core: a failure names the first bad shard in shard order,
    whichever thread finished first, and the shards that did open keep no file open."""
    out = tmp_path / "three"
    index_sharded(setup["runtime"], setup["features"][:18], out, ShardingOptions(shard_images=6))
    originals = {shard: (out / f"shard-0000{shard}" / "image_embeddings.npy").read_bytes() for shard in range(3)}
    def held() -> list[str]:  # this process's descriptors on the gallery's files
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                found.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [target for target in found if target.startswith(str(out))]

    for bad in ([2], [1, 2], [0, 2]):
        for shard, raw in originals.items():
            damaged = bytearray(raw)
            if shard in bad:
                damaged[-4:] = np.float32(0.5).tobytes()
            (out / f"shard-0000{shard}" / "image_embeddings.npy").write_bytes(bytes(damaged))
        with pytest.raises(ItmrtError, match=f"shard-0000{bad[0]}/image_embeddings.npy does not match the sha256"):
            open_shards(out, threads=1, warn=quiet)
        assert held() == []
    for shard, raw in originals.items():
        (out / f"shard-0000{shard}" / "image_embeddings.npy").write_bytes(raw)
    assert len(open_shards(out, threads=1, warn=quiet).shards) == 3


def test_shard_embeddings_are_verified_when_opened_and_names_stay_inside(setup: dict[str, Any], tmp_path: Path) -> None:
    runtime = setup["runtime"]
    out = tmp_path / "sharded"
    index_sharded(runtime, setup["features"][:12], out, ShardingOptions(shard_images=6))
    embeddings = out / "shard-00001" / "image_embeddings.npy"
    original = embeddings.read_bytes()
    with open(embeddings, "r+b") as handle:  # one value changed, the shape kept: only the hash can tell
        handle.seek(-4, os.SEEK_END)
        handle.write(np.float32(0.5).tobytes())
    with pytest.raises(ItmrtError, match="image_embeddings.npy does not match the sha256"):
        open_shards(out, threads=1, warn=quiet)
    embeddings.write_bytes(original)
    vectors = out / "shard-00000" / "global_vectors.npy"
    kept = vectors.read_bytes()
    with open(vectors, "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(np.float32(0.5).tobytes())
    with pytest.raises(ItmrtError, match="global_vectors.npy does not match the sha256"):
        open_shards(out, threads=1, warn=quiet)
    vectors.write_bytes(kept)
    # a shard document whose shortlist names a file outside the shard, with every hash on the way updated
    shard_doc = out / "shard-00000" / "gallery.json"
    document = json.loads(shard_doc.read_text())
    document["shortlist"]["vectors"]["file"] = "../shard-00001/global_vectors.npy"
    shard_doc.write_text(json.dumps(document))
    top = json.loads((out / "gallery.json").read_text())
    top["shards"][0]["sha256"] = hashlib.sha256(shard_doc.read_bytes()).hexdigest()
    (out / "gallery.json").write_text(json.dumps(top))
    with pytest.raises(ItmrtError, match="shortlist.vectors.file"):
        open_shards(out, threads=1, warn=quiet)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_merging_shards_top_k_equals_one_top_k_of_everything(data: st.DataObject) -> None:
    """Any split into shards, any k, scores with many ties: the merge orders as one sort of the whole matrix."""
    images = data.draw(st.integers(1, 30))
    captions = data.draw(st.integers(1, 6))
    k = data.draw(st.integers(1, 12))
    values = data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0]), min_size=images * captions,
                                max_size=images * captions))
    matrix = np.array(values, dtype=np.float32).reshape(images, captions)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, images - 1)), max_size=4)))) if images > 1 else []
    bounds = [0, *cuts, images]
    answers = []
    for first, end in itertools.pairwise(bounds):
        t2i, i2t = top_k_of_matrix(matrix[first:end], k)
        t2i.indices = t2i.indices + first
        answers.append(ShardAnswer(f"s{first}", first, end - first, t2i, i2t, matrix[first:end]))
    merged = merge_answers(answers[::-1], SearchRequest(k=k, directions=BOTH, keep_scores=True), captions)
    t2i, i2t = top_k_of_matrix(matrix, k)
    same_top_k(merged.t2i, t2i)
    same_top_k(merged.i2t, i2t)
    np.testing.assert_array_equal(merged.scores, matrix)


def test_cli_index_and_infer_on_a_sharded_gallery(setup: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    root, bundle = setup["root"], str(setup["bundle"])
    features, captions = str(root / "features.npy"), str(root / "captions.txt")
    out = tmp_path / "cli"
    made = run_cli(capsys, "index", bundle, "--images", features, "--out", str(out), "--shard-images", "20",
                   "--shortlist-index", "hnsw", "--hnsw-m", "8", "--no-warmup", "--dtype", "float16")
    assert made.code == 0 and "3 shards, 50 images in all, float16" in made.out, made.err
    grown = run_cli(capsys, "index", bundle, "--images", features, "--out", str(out), "--append", "--no-warmup")
    assert grown.code == 0 and "indexed 50 images" in grown.out and "6 shards, 100 images" in grown.out, grown.err
    assert json.loads((out / "gallery.json").read_text())["shortlist_index"]["hnsw_m"] == 8
    refused = run_cli(capsys, "index", bundle, "--images", features, "--out", str(tmp_path / "x"),
                      "--shortlist-index", "ivf")
    assert refused.code == 2 and "add --shard-images" in refused.err
    plain, sharded = tmp_path / "plain.jsonl", tmp_path / "sharded.jsonl"
    assert run_cli(capsys, "infer", str(root / "plain"), "--captions", captions, "--out", str(plain)).code == 0
    done = run_cli(capsys, "infer", str(root / "sharded"), "--captions", captions, "--out", str(sharded))
    assert done.code == 0 and "3 shards in this process, full scoring" in done.out, done.err
    assert sharded.read_text() == plain.read_text()
    wrong = run_cli(capsys, "infer", str(root / "plain"), "--captions", captions, "--out", str(tmp_path / "r.jsonl"),
                    "--ray", "local")
    assert wrong.code == 2 and "--ray searches a sharded gallery" in wrong.err


def test_serve_a_sharded_gallery_in_one_process_with_a_shortlist(setup: dict[str, Any]) -> None:
    from itmrt.serve.client import ServiceClient
    from itmrt.serve.server import ServeOptions, Service

    from serve_helpers import running

    captions = setup["captions"][:5]
    options = ServeOptions(port=0, configure_logging=False, threads=1, shortlist=8)
    with running(Service(setup["sharded"], options=options)) as service, ServiceClient(service.url) as client:
        hits = client.search(captions, 4)
        wide = client.search(captions[:1], 12)  # top_k over the shortlist: K grows to 12 for that request
    shards = open_shards(setup["sharded"], threads=1, warn=quiet)
    encoded = setup["runtime"].encode_captions(captions)
    # the service's runtime is warmed (compiled per-word kernel), the local one is not: equal to float rounding
    same_top_k(hits, shards.search(encoded, SearchRequest(k=4, shortlist=8)).t2i, atol=1e-6)
    same_top_k(wide, shards.search(encoded.take([0]), SearchRequest(k=12, shortlist=12)).t2i, atol=1e-6)
    with pytest.raises(ItmrtError, match="search a sharded gallery"):
        Service(setup["plain"].path, options=ServeOptions(port=0, shortlist=8))


@pytest.mark.parametrize("keywords", [{"overwrite": "no"}, {"append": "no"}, {"skip_bad_images": 1}])
def test_yes_no_keywords_given_as_strings_are_refused_before_anything_is_replaced(
        setup: dict[str, Any], tmp_path: Path, keywords: dict[str, Any]) -> None:
    # "no" is a true string: overwrite="no" replaced the gallery that was there, append="no" extended it
    out = tmp_path / "out"
    index_sharded(setup["runtime"], setup["features"][:20], out, ShardingOptions(8))
    before = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    with pytest.raises(ItmrtError) as caught:
        index_sharded(setup["runtime"], setup["features"][20:30], out, ShardingOptions(8), **keywords)
    name = next(iter(keywords))
    assert str(caught.value).startswith(f"{name} must be True or False") and "\n" not in str(caught.value)
    assert {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == before
    for call in (lambda: setup["runtime"].index(setup["features"][:5], out, overwrite="no"),
                 lambda: setup["runtime"].store_embeddings(np.zeros((1, 1, 1), np.float32), out, overwrite="no")):
        with pytest.raises(ItmrtError, match="^overwrite must be True or False"):
            call()
    assert {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == before


def test_rank_keep_scores_must_be_true_or_false(setup: dict[str, Any]) -> None:
    runtime = setup["runtime"]
    captions = runtime.encode_captions(["a dog on the grass"])
    with pytest.raises(ItmrtError, match="^keep_scores must be True or False, not 'yes'$"):
        runtime.rank(runtime.encode_images(setup["features"][:4]), captions, top_k=1, keep_scores="yes")


@pytest.mark.parametrize("copy_mb", [0.0, 1e9])
def test_a_shard_folder_gone_is_one_line_from_the_python_api(setup: dict[str, Any], tmp_path: Path,
                                                             copy_mb: float) -> None:
    # copying the shards into memory first sized them by listing each folder: a FileNotFoundError escaped
    gallery = tmp_path / "gallery"
    shutil.copytree(setup["sharded"], gallery)
    shutil.rmtree(gallery / "shard-00001")
    with pytest.raises(ItmrtError) as caught:
        open_shards(gallery, threads=1, warn=quiet, copy_mb=copy_mb)
    assert "shard-00001" in str(caught.value) and "\n" not in str(caught.value)
