"""The region index (``--shortlist-index regions``): exact when it probes and keeps everything, appends searchable,
compact storage decoded faithfully, tampered or foreign index files refused, ``--embeddings`` checked."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.runtime.compact_regions import ResidualCodec, pack, unpack
from itmrt.scale import IndexSpec, SearchRequest, ShardingOptions, index_sharded, open_shards
from itmrt.scale.audit import audit

from cli_helpers import run_cli
from runtime_helpers import make_bundle, random_captions, region_features
from scale_helpers import infer_answers_as_the_api, quiet, same_top_k, tampered_file_is_refused

pytest.importorskip("faiss")
pytest.importorskip("numba", reason="exact comparisons: the fused scorer's scores do not depend on the tiling")

BOTH = ("t2i", "i2t")
EVERYTHING = 10**6


def same_answer(found: Any, reference: Any, family: str) -> None:
    """The same top-k; NAAF's fused scorer gives the same scores bit for bit whatever the tiling, SCAN's graph
    scorer to float rounding (its sums run in another order in another tile shape)."""
    if family == "naaf":
        same_top_k(found, reference)
        return
    np.testing.assert_array_equal(found.indices, reference.indices)
    np.testing.assert_allclose(found.scores, reference.scores, rtol=0, atol=1e-6)


@pytest.fixture(scope="module", params=["naaf", "scan"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp(f"regions-{request.param}")
    opt = None if request.param == "naaf" else {"vocab_size": 50, "img_dim": 64, "embed_size": 32, "word_dim": 16}
    bundle = make_bundle(root / "model", family=request.param, opt=opt)[0]
    runtime = load(bundle, threads=1, warn=quiet)
    features = region_features(45, seed=7)
    embeddings = runtime.encode_images(features)
    captions = runtime.encode_captions(random_captions(9, seed=8, max_words=10))
    gallery = root / "gallery"
    index_sharded(runtime, features, gallery, ShardingOptions(16, None, IndexSpec("regions")))
    return {"family": request.param, "root": root, "bundle": bundle, "runtime": runtime, "features": features,
            "embeddings": embeddings,
            "captions": captions, "gallery": gallery}


def test_probing_every_centroid_and_keeping_every_image_is_exhaustive_scoring(world: dict[str, Any]) -> None:
    runtime, captions = world["runtime"], world["captions"]
    reference = runtime.rank(world["embeddings"], captions, top_k=6)
    shards = open_shards(world["gallery"], threads=1, warn=quiet)
    found = shards.search(captions, SearchRequest(k=6, shortlist=EVERYTHING, nprobe=EVERYTHING, directions=BOTH))
    same_answer(found.t2i, reference.t2i, world["family"])
    same_answer(found.i2t, reference.i2t, world["family"])
    assert set(found.stage_seconds) == {"candidates", "rerank"}
    few = shards.search(captions, SearchRequest(k=6, shortlist=6, nprobe=1))
    assert few.pairs == len(captions) * 6 * 3  # 6 candidates in each of 3 shards: far fewer pairs scored
    assert ((few.t2i.indices >= 0) & (few.t2i.indices < 45)).all()


def test_no_captions_are_refused_in_one_line_by_every_search(world: dict[str, Any]) -> None:
    # a region shortlist (and a budget) answered zero captions with an empty answer; full scoring refused them
    shards = open_shards(world["gallery"], threads=1, warn=quiet)
    none = world["captions"].take([])
    for request in (SearchRequest(k=3), SearchRequest(k=3, shortlist=5), SearchRequest(k=3, shortlist=5, budget=9)):
        with pytest.raises(ItmrtError) as caught:
            shards.search(none, request)
        assert str(caught.value) == ("no captions to search: encode at least one caption "
                                     "(shards.runtime.encode_captions)")


def test_the_shard_document_records_the_index_files_and_parameters(world: dict[str, Any]) -> None:
    document = json.loads((world["gallery"] / "shard-00000" / "gallery.json").read_text())
    entry = document["region_index"]
    assert {entry[role]["file"] for role in ("centroids", "codes", "lists")} == {
        "region_centroids.npy", "region_codes.npy", "region_lists.npy"}
    assert entry["params"]["storage"] == "exact" and entry["params"]["nprobe"] >= 1
    assert entry["built_from"] == document["embeddings"]["sha256"]
    codes = np.load(world["gallery"] / "shard-00000" / "region_codes.npy")
    assert codes.shape == (16, world["embeddings"].shape[1]) and codes.max() < entry["params"]["centroids"]


def test_later_shards_of_one_build_share_the_first_shards_centroids_and_record_it(world: dict[str, Any]) -> None:
    entries = [json.loads((world["gallery"] / f"shard-0000{n}" / "gallery.json").read_text())["region_index"]
               for n in range(3)]
    assert [entry["params"]["centroids_from"] for entry in entries] == ["this shard", "shard-00000", "shard-00000"]
    first = np.load(world["gallery"] / "shard-00000" / "region_centroids.npy")
    for n in (1, 2):
        np.testing.assert_array_equal(np.load(world["gallery"] / f"shard-0000{n}" / "region_centroids.npy"), first)
    stages = entries[0]["params"]["stage_seconds"]
    assert {"sample", "kmeans", "assign", "lists"} <= set(stages) and "kmeans" not in entries[1]["params"][
        "stage_seconds"]
    assert entries[0]["params"]["kmeans_iterations"] >= 1


def test_blocks_assigned_on_threads_through_coarse_groups_find_the_nearest_centroid_of_the_groups_probed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from itmrt.scale import regions

    monkeypatch.setattr(regions, "ASSIGN_CHUNK", 500)  # 100 images per block: 7 blocks on the threads

    rng = np.random.default_rng(3)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    centroids = unit(rng.standard_normal((regions.DIRECT_ASSIGN * 2, 24)).astype(np.float32))
    vectors = unit(rng.standard_normal((700, 5, 24)).astype(np.float32))
    assigner = regions.CentroidAssigner(centroids)
    assert assigner.coarse is not None and len(assigner.groups) > regions.COARSE_PROBE
    flat = vectors.reshape(-1, 24)
    codes, sims = assigner.assign(flat)
    np.testing.assert_allclose(sims, np.einsum("rd,rd->r", flat, centroids[codes]), atol=1e-5)
    # the nearest centroid among the probed groups' members, found the slow way
    probed = np.argsort(-(flat @ assigner.coarse.T), axis=1)[:, : regions.COARSE_PROBE]
    for row in range(0, len(flat), 37):
        members = np.concatenate([assigner.groups[g] for g in probed[row]])
        assert codes[row] == members[np.argmax(centroids[members] @ flat[row])]
    one, fit_one = regions.assign_codes(vectors, assigner, workers=1)
    two, fit_two = regions.assign_codes(vectors, assigner, workers=2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one.reshape(-1), codes)
    assert abs(fit_one - fit_two) < 1e-9 and abs(fit_one - float(sims.mean())) < 1e-5


def test_an_append_is_searchable(world: dict[str, Any]) -> None:
    runtime, captions = world["runtime"], world["captions"]
    gallery = world["root"] / "appended"
    features = world["features"]
    index_sharded(runtime, features[:30], gallery, ShardingOptions(16, None, IndexSpec("regions")))
    index_sharded(runtime, features[30:], gallery, ShardingOptions(16), append=True)
    document = json.loads((gallery / "shard-00002" / "gallery.json").read_text())
    assert "region_index" in document
    shards = open_shards(gallery, threads=1, warn=quiet)
    found = shards.search(captions, SearchRequest(k=5, shortlist=EVERYTHING, nprobe=EVERYTHING))
    same_answer(found.t2i, runtime.rank(world["embeddings"], captions, top_k=5).t2i, world["family"])
    # An appended image is found by its own regions' caption-like query: its tokens are its regions.
    own = world["embeddings"][40]
    query = type(captions)(own.copy(), np.array([len(own)], dtype=np.int32), np.array([0, len(own)]))
    hit = shards.search(query, SearchRequest(k=1, shortlist=3)).t2i.indices[0, 0]
    assert hit == runtime.rank(world["embeddings"], query, top_k=1).t2i.indices[0, 0]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_residual_codes_pack_and_decode_within_their_buckets(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(7, 37), dtype=np.uint8)
    np.testing.assert_array_equal(unpack(pack(codes, bits), bits, 37), codes)
    vectors = rng.standard_normal((500, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    centroids = np.zeros_like(vectors)
    codec = ResidualCodec.fit(vectors, centroids, bits)
    decoded = codec.decode(codec.encode(vectors, centroids), centroids)
    cosine = (decoded * vectors).sum(axis=1).mean()
    assert cosine > {1: 0.75, 2: 0.9, 4: 0.98}[bits]


def test_residual_bits_are_allocated_where_they_lower_the_error_most() -> None:
    rng = np.random.default_rng(3)
    scales = np.array([2.0] * 8 + [1.0] * 8 + [0.01] * 8, dtype=np.float32)  # 24 dims, a third nearly constant
    vectors = (rng.standard_normal((4000, 24)) * scales).astype(np.float32)
    centroids = np.zeros_like(vectors)
    codec = ResidualCodec.fit(vectors, centroids, 2.5)
    assert int(codec.bits_per_dim.sum()) == 60
    assert codec.bits_per_dim[:8].min() >= codec.bits_per_dim[8:16].max() >= codec.bits_per_dim[16:].max()
    assert codec.packed_width(24) < 24 * 4 // 8  # fewer bytes than 4 bits everywhere
    packed = codec.encode(vectors, centroids)
    np.testing.assert_array_equal(codec.codes(packed), codec.codes(codec.encode(vectors, centroids)))
    stored = ResidualCodec.from_buckets(codec.buckets, codec.bits_per_dim)
    np.testing.assert_array_equal(stored.decode(packed, centroids), codec.decode(packed, centroids))
    # each dimension's code is its nearest level: decoding and encoding again changes nothing
    levels = codec.buckets[np.arange(24), codec.codes(packed)]
    np.testing.assert_array_equal(codec.codes(codec.encode(levels, centroids)), codec.codes(packed))
    uniform = ResidualCodec.fit(vectors, centroids, 2)
    error = {name: float(((c.buckets[np.arange(24), c.codes(c.encode(vectors, centroids))] - vectors) ** 2).mean())
             for name, c in (("allocated", codec), ("uniform", uniform))}
    assert error["allocated"] < error["uniform"]


def test_lloyd_max_levels_beat_equal_mass_buckets_at_the_same_bits() -> None:
    from itmrt.runtime.compact_regions import lloyd_max

    rng = np.random.default_rng(4)
    values = rng.standard_normal((20000, 3)).astype(np.float32)
    levels, error = lloyd_max(np.sort(values, axis=0), 4)
    np.testing.assert_allclose(np.abs(levels), [[1.51, 0.453, 0.453, 1.51]] * 3, atol=0.05)  # Gaussian's optimum
    np.testing.assert_allclose(error, 0.1175, atol=0.01)
    middles = np.quantile(values, [1 / 8, 3 / 8, 5 / 8, 7 / 8], axis=0).T
    legacy = ResidualCodec.from_buckets(middles)  # a gallery written before: equal-mass buckets, 2 bits each
    assert legacy.bits == 2 and legacy.packed_width(3) == 1
    legacy_error = ((middles[np.arange(3), legacy.codes(legacy.encode(values, 0 * values))] - values) ** 2).mean()
    assert float(error.mean()) < legacy_error


@pytest.mark.parametrize("bits", [4, 2.5])
def test_compact_storage_searches_its_decoded_vectors_exactly(world: dict[str, Any], bits: float) -> None:
    runtime, captions = world["runtime"], world["captions"]
    gallery = world["root"] / f"compact-{bits}"
    spec = IndexSpec("regions", regions_storage="compact", residual_bits=bits)
    index_sharded(runtime, world["features"], gallery, ShardingOptions(16, None, spec))
    assert not list(gallery.glob("shard-*/image_embeddings.npy"))
    assert not list(gallery.glob("shard-*/global_vectors.npy"))  # compact storage's budget leaves them out
    record = json.loads((gallery / "shard-00000" / "gallery.json").read_text())["region_index"]
    assert record["params"]["bits"] == bits and record["params"]["residual_codec"] == "lloyd-max"
    assert record["bits"]["file"] == "region_bits.npy"
    shards = open_shards(gallery, threads=1, warn=quiet)
    decoded = np.concatenate([np.asarray(shard.gallery.embeddings[:]) for shard in shards.shards])
    cosine = (decoded * world["embeddings"]).sum(axis=-1)
    assert cosine.min() > {4: 0.9, 2.5: 0.75}[bits]
    full = shards.search(captions, SearchRequest(k=5))
    same_answer(full.t2i, runtime.rank(decoded, captions, top_k=5).t2i, world["family"])
    found = shards.search(captions, SearchRequest(k=5, shortlist=EVERYTHING, nprobe=EVERYTHING))
    same_answer(found.t2i, full.t2i, world["family"])
    # the later shards of the build reuse the first shard's codec (fitted once), as they reuse its centroids
    later = [json.loads((gallery / f"shard-0000{n}" / "gallery.json").read_text())["region_index"] for n in (1, 2)]
    assert [entry["params"]["codec_from"] for entry in [record, *later]] == ["this shard", "shard-00000",
                                                                              "shard-00000"]
    for name in ("region_buckets.npy", "region_bits.npy"):
        first = np.load(gallery / "shard-00000" / name)
        for n in (1, 2):
            np.testing.assert_array_equal(np.load(gallery / f"shard-0000{n}" / name), first)


@pytest.mark.parametrize("bits", [1, 1.5, 2, 2.7, 4])
def test_the_compiled_residual_encoder_writes_numpys_bytes(bits: float) -> None:
    from itmrt.runtime.compact_regions import compact_kernels

    rng = np.random.default_rng(int(bits * 10))
    depth = {2.7: 300, 2: 66}.get(bits, 64)  # 2.7 bits over 300: every piece width, unaligned rows; 2 bits over 66: a
    # last byte of two dimensions after the compiled decode's whole bytes
    centroids = rng.standard_normal((16, depth)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    codes = rng.integers(16, size=900)
    vectors = centroids[codes] + 0.4 * rng.standard_normal((900, depth)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    codec = ResidualCodec.fit(vectors[:400], centroids[codes[:400]], bits)
    want = codec.encode(vectors, centroids[codes])
    got = np.zeros_like(want)
    compact_kernels().encode_residuals(vectors, centroids, codes.astype(np.intp), *codec.packing(), got)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(codec.bits_per_dim)) > 1 or bits in (1, 2, 4)
    # and the compiled decode (where one byte holds dimensions of one width) gives numpy's decode (float32 rounding)
    assert (codec.byte_levels() is not None) == (bits in (1, 2, 4))
    rows = rng.permutation(900)[:300]
    np.testing.assert_allclose(codec.decode_coded(want[rows], centroids, codes[rows]),
                               codec.decode(want[rows], centroids[codes[rows]]), rtol=0, atol=3e-7)


def test_global_vectors_join_the_candidates_and_poor_fit_shards_search_wider(world: dict[str, Any]) -> None:
    from itmrt.scale.regions import POOR_FIT_EXACT_PASS, POOR_FIT_UNION
    from itmrt.scale.shard import union_candidates

    runtime, captions = world["runtime"], world["captions"]
    shards = open_shards(world["gallery"], threads=1, warn=quiet)
    for shard in shards.shards:  # exact storage keeps the global vectors beside the region index
        assert shard.vectors is not None
        assert shard.vectors.shape == (len(shard.gallery), shard.gallery.embeddings.shape[2])
    reference = runtime.rank(world["embeddings"], captions, top_k=5)
    everything = shards.search(captions, SearchRequest(k=5, shortlist=5, nprobe=1, exact_pass=0, union=EVERYTHING))
    same_answer(everything.t2i, reference.t2i, world["family"])  # the global vectors' best: every image
    few = shards.search(captions, SearchRequest(k=5, shortlist=5, nprobe=1, exact_pass=0, union=3))
    assert few.pairs == len(captions) * (5 + 3) * 3
    wider = shards.search(captions, SearchRequest(k=5, shortlist=5, nprobe=1, exact_pass=7, union=0))
    assert wider.pairs == len(captions) * 7 * 3
    index = shards.shards[0].regions
    assert index.fit >= index.poor_fit_below  # small shards: few regions per centroid
    assert (index.default_exact_pass(None), index.default_union(None)) == (0, 0)
    index.fit = index.poor_fit_below - 0.1
    assert (index.default_exact_pass(None), index.default_union(None)) == (POOR_FIT_EXACT_PASS, POOR_FIT_UNION)
    assert (index.default_exact_pass(3), index.default_union(0)) == (3, 0)
    merged = union_candidates(np.array([[4, 2, 9, 7, 1, 8]]), 2, np.array([[9, 5, 4]]))
    np.testing.assert_array_equal(merged, [[4, 2, 9, 5, 7, 1]])


def test_a_build_whose_regions_fit_their_centroids_poorly_says_so_once_with_what_to_do(
        world: dict[str, Any]) -> None:
    runtime = world["runtime"]
    shape = world["embeddings"].shape
    noise = np.random.default_rng(3).standard_normal((40, *shape[1:])).astype(np.float32)  # no structure at all
    noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
    warned: list[str] = []
    runtime.warn = warned.append
    try:
        index_sharded(runtime, None, world["root"] / "unstructured", ShardingOptions(16, None, IndexSpec(
            "regions", region_centroids=4)), embeddings=noise)
        poor = [message for message in warned if "fit their 4 centroids loosely" in message]
        assert len(poor) == 1 and "itmrt audit" in poor[0] and "\n" not in poor[0]  # three shards, said once
        warned.clear()
        index_sharded(runtime, None, world["root"] / "structured", ShardingOptions(16, None, IndexSpec("regions")),
                      embeddings=world["embeddings"][:40])
        assert not [message for message in warned if "loosely" in message]  # the fixture's gallery fits
    finally:
        runtime.warn = quiet


def small_region_index(rng: np.random.Generator) -> tuple[Any, np.ndarray, np.ndarray]:
    """A 300-image region index over 40 random centroids of 16 dims (6 regions an image), and 7 words'
    similarities to the centroids."""
    from itmrt.scale.region_search import RegionIndex
    from itmrt.scale.regions import inverted_lists

    centroids = rng.standard_normal((40, 16)).astype(np.float32)
    codes = rng.integers(0, 40, size=(300, 6)).astype(np.uint16)
    index = RegionIndex(centroids, inverted_lists(codes, 40), codes,
                        {"rows": 300, "params": {"nprobe": 5, "candidates": 10}})
    return index, codes, rng.standard_normal((7, 40)).astype(np.float32)


def test_the_probe_keeps_each_words_largest_probed_centroid_per_image() -> None:
    rng = np.random.default_rng(8)
    index, codes, sims = small_region_index(rng)
    for nprobe in (1, 5, 40):
        expected = np.empty((7, 300), dtype=np.float32)
        for word, row in enumerate(sims):  # the definition, word by word and image by image
            probed = np.argsort(-row)[:nprobe]
            for image in range(300):
                held = [row[c] for c in probed if c in set(codes[image].tolist())]
                expected[word, image] = max(held) if held else row[probed].min()
        np.testing.assert_array_equal(index.best_similarities(sims[:, :0], nprobe, sims), expected)
        hits, best, _ = index.probe(sims, nprobe)
        np.testing.assert_array_equal(best, expected[:, hits])


def test_a_tampered_or_foreign_index_file_is_refused_in_one_line(world: dict[str, Any]) -> None:
    gallery = world["root"] / "tampered"
    shutil.copytree(world["gallery"], gallery)
    tampered_file_is_refused(gallery, "shard-00001/region_lists.npy")
    foreign = world["root"] / "foreign"
    shutil.copytree(world["gallery"], foreign)
    # shard-00001 shares shard-00000's centroids (one k-means per build): a foreign file is another valid one
    centroids = np.load(foreign / "shard-00000" / "region_centroids.npy")
    np.save(foreign / "shard-00001" / "region_centroids.npy", centroids[::-1].copy())
    with pytest.raises(ItmrtError, match=r"region_centroids\.npy does not match the sha256"):
        open_shards(foreign, threads=1, warn=quiet)


@pytest.mark.parametrize("field", ["nprobe", "exact_pass", "union", "refine", "prefilter", "budget", "rescore"])
@pytest.mark.parametrize("value", [2.5, "3", True, float("nan"), np.float64(20.0)])
def test_a_search_requests_region_counts_must_be_integers(field: str, value: Any) -> None:
    # a float failed inside numpy's partition, a string on a comparison, True was taken as 1, NaN as nothing
    with pytest.raises(ItmrtError, match=f"--{field.replace('_', '-')} must be an integer") as caught:
        SearchRequest(k=5, shortlist=10, **{field: value}).check()
    assert "\n" not in str(caught.value)
    SearchRequest(k=5, shortlist=10, **{field: np.int64(20)}).check()
    SearchRequest(k=5, shortlist=10, budget=10, directions=["t2i"]).check()  # a list names one direction too


@pytest.mark.parametrize(("keywords", "expected"), [
    ({"keep_scores": "no"}, "keep_scores must be True or False, not 'no'"),  # truthy: "drop --scores-out"
    # every shard searched twice; "'int' object is not iterable"
    ({"directions": ("t2i", "t2i")}, "directions must be a tuple of one or both of 't2i', 'i2t', each once"),
    ({"directions": 5}, "directions must be a tuple of one or both of 't2i', 'i2t', each once, not 5"),
    ({"k": 10**12}, "--top-k must be at most 16777216 (as on the command line), not 1000000000000"),
    ({"shortlist": 10**12}, "--shortlist must be at most 16777216"),
    ({"nprobe": 10**12}, "--nprobe must be at most 16777216"),
    ({"budget": np.uint64(2**64 - 1)}, "--budget must be at most 16777216"),
    ({"rescore": 2**24 + 1}, "--rescore must be at most 16777216"),
])
def test_a_search_request_is_bounded_and_typed_as_the_command_line_flags(keywords: dict[str, Any],
                                                                         expected: str) -> None:
    # each was taken where `itmrt infer` refuses it (or searched twice, or failed as not iterable)
    with pytest.raises(ItmrtError) as caught:
        SearchRequest(**{"k": 5, "shortlist": 10, **keywords}).check()
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
    SearchRequest(k=2**24, shortlist=np.int64(2**24), nprobe=2**24, directions=["i2t", "t2i"]).check()


def test_a_region_index_needs_region_embeddings_options_to_match(world: dict[str, Any]) -> None:
    with pytest.raises(ItmrtError, match="--regions-storage compact is storage of the region index"):
        IndexSpec("flat", regions_storage="compact").check()
    with pytest.raises(ItmrtError, match="--residual-bits must be between 1 and 4"):
        IndexSpec("regions", residual_bits=4.5).check()
    with pytest.raises(ItmrtError, match="--residual-bits must be between 1 and 4"):
        IndexSpec("regions", residual_bits=0.5).check()
    with pytest.raises(ItmrtError, match="--nprobe must be at least 1"):
        SearchRequest(k=1, shortlist=2, nprobe=0).check()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--nprobe", "4"], "--nprobe is for --shortlist-index regions"),
    (["--shortlist-index", "flat", "--candidates", "9", "--exact-pass", "3"],
     "--candidates, --exact-pass are for --shortlist-index regions (not --shortlist-index flat)"),
    (["--shortlist-index", "hnsw", "--region-centroids", "8"], "--region-centroids is for --shortlist-index regions"),
    (["--shortlist-index", "regions", "--residual-bits", "3"], "--residual-bits is for --regions-storage compact"),
])
def test_index_refuses_region_flags_that_would_be_ignored(world: dict[str, Any], capsys: Any, flags: list[str],
                                                          expected: str) -> None:
    # each built a gallery without the region index (or the compact storage) the flags describe, saying nothing
    out, features = world["root"] / "ignored", world["root"] / "features.npy"
    np.save(features, world["features"])
    result = run_cli(capsys, "index", str(world["bundle"]), "--images", str(features),
                     "--out", str(out), "--shard-images", "16", *flags)
    assert result.code == 2 and expected in result.err and result.err.count("\n") == 1, result.err
    assert not out.exists()


def test_an_append_with_region_flags_says_the_gallerys_own_are_used(world: dict[str, Any], capsys: Any) -> None:
    # "add --shortlist-index regions" would only lead to "drop the index options": say the second thing first
    gallery, features = world["root"] / "append-flags", world["root"] / "append-features.npy"
    np.save(features, world["features"][:20])
    index_sharded(world["runtime"], world["features"][:20], gallery, ShardingOptions(16, None, IndexSpec("regions")))
    before = sorted(p.name for p in gallery.iterdir())
    result = run_cli(capsys, "index", str(world["bundle"]), "--images", str(features), "--out", str(gallery),
                     "--append", "--nprobe", "4")
    assert result.code == 2 and result.err.count("\n") == 1, result.err
    assert "recorded index options; drop --nprobe" in result.err, result.err
    assert sorted(p.name for p in gallery.iterdir()) == before


def test_index_embeddings_stores_them_and_refuses_bad_ones(world: dict[str, Any], capsys: Any) -> None:
    root, bundle, embeddings = world["root"], str(world["bundle"]), world["embeddings"]
    runtime = world["runtime"]
    np.save(root / "given.npy", embeddings)
    result = run_cli(capsys, "index", bundle, "--embeddings", str(root / "given.npy"), "--out", str(root / "given"))
    assert result.code == 0, result.err
    np.testing.assert_array_equal(runtime.open_gallery(root / "given").embeddings, embeddings)
    broken = {"shape.npy": embeddings[:, :, :-1], "nan.npy": np.where(np.arange(embeddings.size).reshape(
        embeddings.shape) == 77, np.nan, embeddings).astype(np.float32), "norm.npy": embeddings * 1.5,
        "ints.npy": np.zeros(embeddings.shape, dtype=np.int32)}
    messages = {"shape.npy": "has shape", "nan.npy": "NaN or infinite", "norm.npy": "not of unit length",
                "ints.npy": "give float32 or float16"}
    for name, array in broken.items():
        np.save(root / name, array)
        result = run_cli(capsys, "index", bundle, "--embeddings", str(root / name), "--out", str(root / "bad"),
                         "--shard-images", "20", "--shortlist-index", "regions")
        assert result.code != 0 and messages[name] in result.err and result.err.count("\n") == 1, result.err
        assert not (root / "bad").exists()
        with pytest.raises(ItmrtError, match=messages[name]):
            runtime.index(out=root / "bad", embeddings=array)


def test_audit_reports_recall_and_stage_times_as_markdown_and_json(world: dict[str, Any], capsys: Any) -> None:
    root = world["root"]
    (root / "audit.txt").write_text("\n".join(random_captions(12, seed=21, max_words=9)) + "\n")
    out, table = root / "audit.json", root / "audit.md"
    result = run_cli(capsys, "audit", str(world["gallery"]), "--captions", str(root / "audit.txt"), "--sample", "6",
                     "--shortlist", "45", "--nprobe", "1000", "--out", str(out), "--markdown", str(table),
                     "--overwrite")
    assert result.code == 0, result.err
    report = json.loads(out.read_text())
    assert report["captions_sampled"] == 6 and report["index"] == "regions"
    assert report["recall_at_10"] == 1.0 and report["top1_agreement"] == 1.0  # K and nprobe cover everything
    assert {"encode_captions", "exhaustive", "index_candidates", "index_rerank"} <= set(report["ms_per_caption"])
    assert table.read_text() == result.out and "| regions | 45 | 1000 | recorded | 1.0 | 1.0 |" in result.out
    result = run_cli(capsys, "audit", str(world["gallery"]), "--captions", str(root / "audit.txt"), "--sample", "6",
                     "--shortlist", "10", "--nprobe", "1000", "--budget", "45", "--refine", "0", "--out", str(out),
                     "--overwrite")  # every image reranked in one call: exhaustive's answer again
    assert result.code == 0, result.err
    report = json.loads(out.read_text())
    assert report["budget"] == 45 and report["prefilter"] == "recorded"
    assert report["recall_at_10"] == 1.0 and report["pairs_scored"]["index"] == 6 * 45


def test_audit_refuses_a_shortlist_smaller_than_k_as_infer_does(world: dict[str, Any], capsys: Any) -> None:
    # --shortlist 3 --top-k 7 was raised to 7 without a word: the report measured another K than the one asked
    root = world["root"]
    (root / "short.txt").write_text("\n".join(random_captions(4, seed=22, max_words=9)) + "\n")
    out = root / "short.json"
    result = run_cli(capsys, "audit", str(world["gallery"]), "--captions", str(root / "short.txt"), "--shortlist",
                     "3", "--top-k", "7", "--out", str(out))
    assert result.code == 2 and result.err == "error: --shortlist 3 is smaller than --top-k 7; the shortlist must " \
        "hold at least k candidates\n" and not out.exists()
    shards = open_shards(world["gallery"], threads=1, warn=quiet)
    with pytest.raises(ItmrtError, match="--shortlist 3 is smaller than --top-k 7"):
        audit(shards, random_captions(4, seed=22), 4, k=7, shortlist=3)
    assert audit(shards, random_captions(4, seed=22), 4, k=7)["shortlist_per_shard"] >= 7  # the default holds k


def test_audit_refuses_a_one_folder_gallery_in_one_line(world: dict[str, Any], capsys: Any) -> None:
    root = world["root"]
    single = root / "single_gallery"
    if not single.exists():
        world["runtime"].index(world["features"][:4], single)
    (root / "one.txt").write_text("word1 word2\n")
    result = run_cli(capsys, "audit", str(single), "--captions", str(root / "one.txt"))
    assert result.code == 2 and "one-folder gallery" in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_serve_metrics_carry_the_index_stages(world: dict[str, Any]) -> None:
    pytest.importorskip("prometheus_client")
    from itmrt.serve.metrics import ServiceMetrics
    from itmrt.serve.sharded import ShardedSearcher

    searcher = ShardedSearcher(open_shards(world["gallery"], threads=1, warn=quiet), shortlist=5)
    searcher.top_k(world["captions"], 3)
    assert set(searcher.index_stages) == {"candidates", "rerank"}
    metrics = ServiceMetrics()
    metrics.batch(1, 3, 0.001, 0.002, searcher.index_stages)
    text = metrics.exposition()[0].decode()
    assert 'itmrt_stage_seconds_count{stage="index_rerank"} 1.0' in text


def test_every_stage_of_the_candidate_search_keeps_real_images_and_exact_scores(world: dict[str, Any]) -> None:
    """With refine and the exact pass below the shard size (the defaults are for 100K-image shards), the
    candidates still come out as real rows and the reranked scores are the exhaustive scores of those images."""
    runtime, captions = world["runtime"], world["captions"]
    shards = open_shards(world["gallery"], threads=1, warn=quiet)
    for shard in shards.shards:
        assert shard.regions is not None
        shard.regions.refine = 12
    found = shards.search(captions, SearchRequest(k=4, shortlist=5, nprobe=2, exact_pass=9)).t2i
    full = runtime.score(world["embeddings"], captions)  # [images, captions]
    assert ((found.indices >= 0) & (found.indices < 45)).all()
    for caption in range(len(captions)):
        np.testing.assert_allclose(found.scores[caption], full[found.indices[caption], caption], atol=1e-6)
        assert len(set(found.indices[caption])) == 4


def test_region_shards_copied_into_memory_answer_as_mapped_ones_and_leave_no_file_mapped(
        world: dict[str, Any], tmp_path: Path) -> None:
    """``copy_mb`` (serve's --copy-shards-mb): copied shards read no file while searching; others read only their
    embeddings (by position, checked), compact storage none (its files are copied when it opens); answers equal
    the gallery read from its files."""
    captions = world["captions"]
    request = SearchRequest(k=5, shortlist=8, nprobe=2)
    mapped = open_shards(world["gallery"], threads=1, warn=quiet)
    copied = open_shards(world["gallery"], threads=1, warn=quiet, copy_mb=1024)
    assert copied.in_memory and not mapped.in_memory
    assert all(shard.guard is None for shard in copied.shards)
    assert {path.name for path in mapped.shards[0].guard.states} == {"image_embeddings.npy"}
    same_answer(copied.search(captions, request).t2i, mapped.search(captions, request).t2i, world["family"])
    gallery = tmp_path / "g"
    shutil.copytree(world["gallery"], gallery)
    held = open_shards(gallery, threads=1, warn=quiet, copy_mb=1024)
    for path in gallery.glob("shard-*/*.npy"):
        os.truncate(path, 0)
    same_answer(held.search(captions, request).t2i, mapped.search(captions, request).t2i, world["family"])
    compact = world["root"] / "compact"
    if compact.is_dir():
        kept = open_shards(compact, threads=1, warn=quiet, copy_mb=1024)
        assert kept.in_memory and all(shard.guard is None for shard in kept.shards)


def test_shards_sharing_centroids_share_one_probe_per_caption_and_answer_as_each_searched_alone(
        world: dict[str, Any]) -> None:
    """A build's shards store the same centroids: a search computes each caption's token x centroid product and
    probed centroids once for all of them (one probe per caption in the cache), holds one array of them, and
    answers exactly as each shard searched with its own probes."""
    from itmrt.scale.region_search import ProbeCache
    from itmrt.scale.shard import merge_answers

    runtime, captions = world["runtime"], world["captions"]
    shards = open_shards(world["gallery"], threads=1, warn=quiet)
    indexes = [shard.regions for shard in shards.shards]
    assert len({index.centroids_key for index in indexes}) == 1
    assert all(index.centroids is indexes[0].centroids for index in indexes)
    request = SearchRequest(k=5, shortlist=6, nprobe=2)
    probes = ProbeCache()
    together = merge_answers([shard.search(runtime, captions, request, probes) for shard in shards.shards],
                             request, len(captions))
    assert len(probes._found) == len(captions)  # one probe per caption, not one per caption and shard
    alone = merge_answers([shard.search(runtime, captions, request) for shard in shards.shards],
                          request, len(captions))
    same_top_k(together.t2i, alone.t2i)
    same_top_k(shards.search(captions, request).t2i, alone.t2i)
    other = open_shards(world["gallery"], threads=1, warn=quiet).shards[1].regions
    other.centroids = other.centroids + np.float32(0.5)  # another content: another key, its own probe
    other._centroids_key = None
    assert other.centroids_key != indexes[0].centroids_key
    probes.get(other, captions, 0, 2, lambda a, b: a @ b.T)
    assert len(probes._found) == len(captions) + 1


def test_the_prefilter_keeps_the_probed_images_with_the_largest_centroid_gains() -> None:
    from itmrt.scale.region_search import select_probes

    rng = np.random.default_rng(9)
    index, codes, sims = small_region_index(rng)
    nearest, values, floor = select_probes(sims, 5)
    hits, best, _ = index.probe(sims, 5)
    same = index.probe(sims, 5, prefilter=len(hits))  # no fewer kept than reached: nothing is left out
    np.testing.assert_array_equal(same[0], hits)
    np.testing.assert_array_equal(same[1], best)
    gains = np.zeros(300)
    for word in range(7):  # the definition: each probed list adds its similarity over the word's floor
        for centroid, value in zip(nearest[word], values[word]):
            gains[np.unique(np.flatnonzero((codes == centroid).any(axis=1)))] += value - floor[word]
    kept, estimated, _ = index.probe(sims, 5, prefilter=20)
    expected = np.sort(np.argsort(-gains, kind="stable")[:20])
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(estimated, best[:, np.searchsorted(hits, kept)])


def test_a_search_with_a_prefilter_and_a_smaller_refine_keeps_real_images_and_exact_scores(
        world: dict[str, Any]) -> None:
    runtime, captions = world["runtime"], world["captions"]
    shards = open_shards(world["gallery"], threads=1, warn=quiet)
    full = runtime.score(world["embeddings"], captions)
    found = shards.search(captions, SearchRequest(k=4, shortlist=5, nprobe=3, refine=8, prefilter=9,
                                                 exact_pass=0, union=0)).t2i
    assert ((found.indices >= 0) & (found.indices < 45)).all()
    for caption in range(len(captions)):
        np.testing.assert_allclose(found.scores[caption], full[found.indices[caption], caption], atol=1e-6)
    everything = SearchRequest(k=6, shortlist=EVERYTHING, nprobe=EVERYTHING, prefilter=EVERYTHING, refine=0)
    same_answer(shards.search(captions, everything).t2i, runtime.rank(world["embeddings"], captions, top_k=6).t2i,
                world["family"])
    with pytest.raises(ItmrtError, match="--prefilter must be at least 0"):
        shards.search(captions, SearchRequest(k=4, shortlist=5, prefilter=-1))


def test_serve_computes_the_reranks_constants_at_warm_up_so_the_first_request_after_ready_does_not(
        world: dict[str, Any]) -> None:
    """``itmrt serve GALLERY --shortlist K`` on a region-indexed gallery: the warm-up (before the service says
    ready) searches every shard once as a query will, which computes each shard's cached per-image constants;
    the first real request (HTTP, 127.0.0.1) then computes none and answers as the shards do in this process."""
    from itmrt.serve.client import ServiceClient
    from itmrt.serve.server import ServeOptions, Service

    from serve_helpers import running

    options = ServeOptions(port=0, configure_logging=False, threads=1, shortlist=5)
    with running(Service(world["gallery"], options=options)) as live, ServiceClient(live.url) as client:
        runtime = live.batcher.searcher.shards.runtime
        assert runtime.one_caption is not None and runtime.one_caption.builds == 3  # at warm-up, one per shard
        captions = random_captions(1, seed=31, max_words=8)
        found = client.search(captions, 4)
        assert runtime.one_caption.builds == 3, "the first request after ready computed constants"
        local = open_shards(world["gallery"], threads=1, warn=quiet)
        reference = local.search(local.runtime.encode_captions(captions), SearchRequest(k=4, shortlist=5)).t2i
        np.testing.assert_array_equal(found.indices, reference.indices)


def test_a_top_k_over_the_services_budget_is_a_400_naming_it(world: dict[str, Any]) -> None:
    """``itmrt serve --budget 5``: a request for top_k 10 failed inside the search ("--budget must be at least
    --top-k") and was answered 500; it is the client's to fix: 400 naming the budget. Within it: answered."""
    import httpx

    from itmrt.serve.server import ServeOptions, Service

    from serve_helpers import running

    options = ServeOptions(port=0, configure_logging=False, threads=1, shortlist=5, regions={"budget": 5})
    with running(Service(world["gallery"], options=options)) as live:
        def ask(top_k: int) -> httpx.Response:
            document = {"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [1], "data": ["a dog"]}],
                        "parameters": {"top_k": top_k}}
            return httpx.post(live.url + "/v2/models/text_to_image/infer", json=document, timeout=30)

        refused = ask(10)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "top_k must be an integer from 1 to 5 (this service's --budget), not 10"
        assert ask(5).status_code == 200


def test_a_budget_reranks_the_gallerys_best_estimates_together_and_everything_is_exhaustive(
        world: dict[str, Any]) -> None:
    """``budget``: each shard's best images by estimate, the gallery's ``budget`` best of those scored exactly
    in one call; with every centroid probed and every image kept it is exhaustive scoring's answer."""
    runtime, captions = world["runtime"], world["captions"]
    shards = open_shards(world["gallery"], threads=1, warn=quiet)
    reference = runtime.rank(world["embeddings"], captions, top_k=6).t2i
    everything = shards.search(captions, SearchRequest(k=6, shortlist=6, nprobe=EVERYTHING, budget=EVERYTHING,
                                                       refine=0))
    np.testing.assert_array_equal(everything.t2i.indices, reference.indices)
    np.testing.assert_allclose(everything.t2i.scores, reference.scores, rtol=0, atol=1e-6)
    few = shards.search(captions, SearchRequest(k=4, shortlist=4, nprobe=2, budget=8))
    assert few.pairs == len(captions) * 8 and set(few.stage_seconds) == {"candidates", "rerank"}
    full = runtime.score(world["embeddings"], captions)
    for caption in range(len(captions)):
        assert len(set(few.t2i.indices[caption])) == 4
        np.testing.assert_allclose(few.t2i.scores[caption], full[few.t2i.indices[caption], caption], atol=1e-6)
    for wrong, words in ((SearchRequest(k=4, shortlist=4, budget=3), "must be at least --top-k"),
                         (SearchRequest(k=4, budget=8), "--budget applies"),
                         (SearchRequest(k=4, shortlist=4, budget=8, directions=BOTH), "--budget applies")):
        with pytest.raises(ItmrtError, match=words):
            shards.search(captions, wrong)


def test_infer_and_serve_take_the_region_flags_and_answer_as_the_api(world: dict[str, Any], capsys: Any) -> None:
    """--nprobe, --refine, --prefilter (and --exact-pass, --union; --budget for serve, which searches text to image
    only) were options of `audit` and the Python API only; `infer` and `serve` now pass them to every shard, with
    the API's answer; misuse is one line."""
    from itmrt.serve.sharded import ShardedSource

    root, gallery = world["root"], world["gallery"]
    captions = random_captions(3, seed=40, max_words=9)
    (root / "flags.txt").write_text("\n".join(captions) + "\n")
    fields = {"nprobe": 2, "refine": 8, "prefilter": 20}
    shards = open_shards(gallery, threads=1, warn=quiet)
    encoded = shards.runtime.encode_captions(captions)
    want = shards.search(encoded, SearchRequest(k=4, shortlist=5, **fields)).t2i
    pooled = shards.search(encoded, SearchRequest(k=4, shortlist=5, budget=12, **fields)).t2i
    out = root / "flags.jsonl"
    result = run_cli(capsys, "infer", str(gallery), "--captions", str(root / "flags.txt"), "--top-k", "4",
                     "--shortlist", "5", "--nprobe", "2", "--refine", "8", "--prefilter", "20",
                     "--out", str(out), "--overwrite")
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in out.read_text().splitlines() if '"caption"' in line]
    got = np.array([line["images"] for line in lines[: len(captions)]])
    np.testing.assert_array_equal(got, want.indices)
    searcher, _warm, _retire = ShardedSource(gallery, {"threads": 1}, "refuse", quiet, shortlist=5,
                                             regions={**fields, "budget": 12}).open()
    try:
        np.testing.assert_array_equal(searcher.top_k(encoded, 4).indices, pooled.indices)
    finally:
        searcher.close()
    # --direction t2i: the caption lines only, and --budget with them
    for extra, wanted in (([], want), (["--budget", "12"], pooled)):
        result = run_cli(capsys, "infer", str(gallery), "--captions", str(root / "flags.txt"), "--top-k", "4",
                         "--shortlist", "5", "--nprobe", "2", "--refine", "8", "--prefilter", "20",
                         "--direction", "t2i", *extra, "--out", str(out), "--overwrite")
        assert result.code == 0, result.err
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["query"] for line in lines] == ["caption"] * len(captions)
        np.testing.assert_array_equal(np.array([line["images"] for line in lines]), wanted.indices)
    single = root / "single_gallery"
    if not single.exists():
        world["runtime"].index(world["features"][:4], single)
    refusals = {
        ("infer", str(gallery), "--refine", "8"): "add --shortlist",
        ("infer", str(single), "--shortlist", "2", "--top-k", "2", "--nprobe", "2"):
            "--nprobe search a sharded gallery's region index",
        ("serve", str(single), "--refine", "8"): "region-index flags search a sharded gallery",
        ("serve", str(gallery), "--budget", "5"): "add --shortlist",
        ("infer", str(gallery), "--shortlist", "10", "--budget", "12"): "`itmrt infer --direction t2i`",
    }
    for args, words in refusals.items():
        extra = ["--captions", str(root / "flags.txt"), "--out", str(root / "x.jsonl")] if args[0] == "infer" else []
        result = run_cli(capsys, *args, *extra)
        assert result.code == 2 and words in result.err and result.err.count("\n") == 1, (args, result.err)


@pytest.mark.parametrize("bits", [1, 2, 2.5, 4])
def test_the_residual_stage_reads_each_regions_centroid_plus_its_residual_levels(
        world: dict[str, Any], bits: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compact storage with every dimension at 1, 2 or 4 bits: each word's best over an image's regions of
    ``u . (c + l)`` (levels not re-normalised), through numba and 8-bit integers (codes through the levels' fitted
    line at 1 and 2 bits, the levels themselves at 4) and through numpy; mixed bits: the decoded vectors. Against
    the levels read back by the codec's own unpacking."""
    from itmrt.scale import residual_stage
    from itmrt.scale.region_search import ProbeCache, stored_best_similarities, token_gemm

    runtime, captions = world["runtime"], world["captions"]
    gallery = world["root"] / f"residual-{bits}"
    if not gallery.is_dir():
        spec = IndexSpec("regions", regions_storage="compact", residual_bits=bits)
        index_sharded(runtime, world["features"], gallery, ShardingOptions(16, None, spec))
    shard = open_shards(gallery, threads=1, warn=quiet).shards[0]
    stored, product = shard.gallery.embeddings, token_gemm(1)
    rows = np.array([0, 2, 3, 7, 11, 15])
    uniform = bits != 2.5
    levels = np.take_along_axis(stored.codec.buckets[None, None], stored.codec.codes(
        np.asarray(stored.residuals[rows]))[..., None].astype(np.intp), axis=-1)[..., 0]
    vectors = stored.centroids[np.asarray(stored.codes[rows], dtype=np.intp)] + levels
    if not uniform:
        vectors = np.asarray(stored[rows])
    assert (stored.codec.affine_levels() is not None) == (bits in (1, 2))
    if bits == 1:  # two levels lie on a line: the fit is exact
        intercept, slope = stored.codec.affine_levels()
        np.testing.assert_allclose(intercept[:, None] + slope[:, None] * np.arange(2), stored.codec.buckets[:, :2],
                                   atol=1e-7)
    for caption in range(3):
        probe = ProbeCache(shared=False).get(shard.regions, captions, caption, 2, product)
        want = np.einsum("md,rjd->mrj", probe.tokens, vectors).max(axis=2)
        got = stored_best_similarities(probe, stored, rows, product)
        np.testing.assert_allclose(got, want, atol=0.02 if uniform else 1e-5)
        if uniform:  # blocks of 1-4 images split over 1-3 threads: the same similarities
            for threads, block in ((1, 1), (2, 4), (3, 1), (3, 2)):
                np.testing.assert_array_equal(
                    residual_stage.residual_best_similarities(probe, stored, rows, product, threads, block), got)
            assert residual_stage.residual_kernels() is not None  # the integer path was the one measured
            with monkeypatch.context() as patched:
                patched.setattr(residual_stage, "residual_kernels", lambda: None)
                np.testing.assert_allclose(stored_best_similarities(probe, stored, rows, product), want, atol=1e-5)


def test_the_residual_stage_reads_codes_through_a_line_only_where_the_levels_lie_near_one() -> None:
    """2-bit levels evenly spaced: codes through the fitted line (exact here), the words' products with the
    codes; levels far from a line (a skewed residual): the levels' own table, through their 8-bit values."""
    pytest.importorskip("numba")
    from itmrt.runtime.compact_regions import AFFINE_FIT_LIMIT
    from itmrt.scale import residual_kernels, residual_stage

    even = ResidualCodec(np.tile([-0.15, -0.05, 0.05, 0.15], (8, 1)), np.full(8, 2))
    intercept, slope = even.affine_levels()
    np.testing.assert_allclose(intercept[:, None] + slope[:, None] * np.arange(4), even.buckets, atol=1e-7)
    bent = ResidualCodec(np.tile([-0.1, -0.099, 0.099, 0.1], (8, 1)), np.full(8, 2))
    levels = bent.buckets.astype(np.float64)
    fitted = levels.mean(axis=1, keepdims=True) + np.outer(levels @ (np.arange(4) - 1.5) / 5, np.arange(4) - 1.5)
    assert np.sqrt(np.square(levels - fitted).mean() / np.square(levels).mean()) > AFFINE_FIT_LIMIT
    assert bent.affine_levels() is None and bent.integer_levels() is not None
    tokens = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert residual_stage.integer_words(tokens, even, residual_kernels).zero == 0  # codes
    assert residual_stage.integer_words(tokens, bent, residual_kernels).zero == 128  # 8-bit levels
    rng = np.random.default_rng(1)
    for bits, depth in ((2, 66), (1, 13), (2, 8), (4, 10)):  # dimensions that leave a last byte part empty
        codec = ResidualCodec(np.sort(rng.standard_normal((depth, 1 << bits)), axis=1) * 0.05, np.full(depth, bits))
        codes = rng.integers(1 << bits, size=(5, depth))
        packed = pack(codes.astype(np.uint8), bits)
        tokens = rng.standard_normal((3, depth)).astype(np.float32)
        ready = residual_stage.integer_words(tokens, codec, residual_kernels)
        expanded = np.empty((len(packed), ready.columns), dtype=np.uint8)
        ready.expand(np.ascontiguousarray(packed), expanded)
        got = (expanded.astype(np.int64) - ready.zero) @ ready.words.astype(np.int64) * ready.scale + ready.offset
        line = codec.affine_levels()
        levels = codec.buckets[np.arange(depth), codes] if line is None else line[0] + line[1] * codes
        want = levels @ tokens.T  # the 8-bit words (and levels, at 4 bits) are within a percent or two of it
        np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())


def compact_gallery(world: dict[str, Any]) -> Path:
    """The fixture's images as a 3-shard gallery with compact storage at 2 bits (made once per module)."""
    gallery = world["root"] / "residual-2"
    if not gallery.is_dir():
        spec = IndexSpec("regions", regions_storage="compact", residual_bits=2)
        index_sharded(world["runtime"], world["features"], gallery, ShardingOptions(16, None, spec))
    return gallery


def test_rescoring_keeps_the_images_with_the_best_residual_estimates_and_everything_is_exhaustive(
        world: dict[str, Any]) -> None:
    from itmrt.scale.region_search import ProbeCache, _top_rows, stored_best_similarities, token_gemm
    from itmrt.scale.shard import score_estimate

    runtime, captions = world["runtime"], world["captions"]
    gallery = compact_gallery(world)
    shards = open_shards(gallery, threads=1, warn=quiet)
    full = shards.search(captions, SearchRequest(k=5))
    found = shards.search(captions, SearchRequest(k=5, shortlist=EVERYTHING, nprobe=EVERYTHING, rescore=EVERYTHING))
    same_answer(found.t2i, full.t2i, world["family"])
    shard, product, estimate = shards.shards[0], token_gemm(1), score_estimate(runtime)
    everything = np.arange(shard.regions.images)
    kept = shard.regions.image_candidates(captions, estimate, 2, 3, 1, shard.gallery.embeddings, EVERYTHING)
    for caption in range(len(captions)):
        probe = ProbeCache(shared=False).get(shard.regions, captions, caption, 2, product)
        scores = estimate.scores(stored_best_similarities(probe, shard.gallery.embeddings, everything, product),
                                 probe.tokens, product)
        np.testing.assert_array_equal(kept[caption], _top_rows(scores, everything, 3))
    with pytest.raises(ItmrtError, match="--rescore must be at least 0"):
        SearchRequest(k=5, shortlist=5, rescore=-1).check()


def test_the_default_rescore_splits_one_budget_per_query_over_the_compact_shards(world: dict[str, Any]) -> None:
    from itmrt.scale.regions import DEFAULT_RESCORE, MIN_POOLED_RESCORE_SHARE, MIN_RESCORE_SHARE, POOLED_RESCORE

    gallery = compact_gallery(world)
    compact = open_shards(gallery, threads=1, warn=quiet).shards
    assert len(compact) == 3
    for shard in compact:
        assert shard.regions.default_rescore(None, shard.gallery.embeddings) == DEFAULT_RESCORE // 3
        assert shard.regions.default_rescore(7, shard.gallery.embeddings) == 7
        shard.regions.shards = 20  # a share below MIN_RESCORE_SHARE: that many, not fewer
        assert shard.regions.default_rescore(None, shard.gallery.embeddings) == MIN_RESCORE_SHARE
        assert shard.regions.default_rescore(None, shard.gallery.embeddings, pooled=True) == POOLED_RESCORE // 20
        shard.regions.shards = 40  # a budget's pooled share has its own floor
        assert shard.regions.default_rescore(None, shard.gallery.embeddings, pooled=True) == \
            MIN_POOLED_RESCORE_SHARE
    for shard in open_shards(world["gallery"], threads=1, warn=quiet).shards:  # exact storage: none unless asked
        assert shard.regions.default_rescore(None, shard.gallery.embeddings) == 0


def test_a_budget_on_compact_storage_pools_each_shards_residual_estimates(world: dict[str, Any]) -> None:
    """On compact storage each shard offers a search with a budget the images its residual stage re-estimated
    (at most the budget), with those estimates: the pooled choice compares the same estimate across shards;
    with everything probed, re-estimated and kept, the answer is exhaustive scoring's."""
    from itmrt.scale.budget import shard_estimates
    from itmrt.scale.region_search import ProbeCache, stored_best_similarities, token_gemm
    from itmrt.scale.shard import score_estimate

    runtime, captions = world["runtime"], world["captions"]
    gallery = compact_gallery(world)
    shards = open_shards(gallery, threads=1, warn=quiet)
    full = shards.search(captions, SearchRequest(k=5))
    everything = shards.search(captions, SearchRequest(k=5, shortlist=5, nprobe=EVERYTHING, budget=EVERYTHING,
                                                       rescore=EVERYTHING, refine=0))
    np.testing.assert_array_equal(everything.t2i.indices, full.t2i.indices)  # scored in one call: float rounding
    np.testing.assert_allclose(everything.t2i.scores, full.t2i.scores, rtol=0, atol=1e-6)
    request = SearchRequest(k=3, shortlist=3, nprobe=2, budget=8, rescore=4)
    estimate, product = score_estimate(runtime), token_gemm(1)
    for shard in shards.shards:
        rows, estimates = shard_estimates(shard, runtime, captions, request, None)
        assert rows.shape == (len(captions), 4)  # the 4 re-estimated, not the budget's 8
        for caption in range(len(captions)):
            probe = ProbeCache(shared=False).get(shard.regions, captions, caption, 2, product)
            mine = rows[caption] - shard.record.first
            residual = estimate.scores(stored_best_similarities(probe, shard.gallery.embeddings, mine, product),
                                       probe.tokens, product)
            np.testing.assert_allclose(estimates[caption], residual, rtol=0, atol=1e-5)
    assert shards.search(captions, request).pairs == len(captions) * 8


def test_the_default_refine_is_the_recorded_one_lowered_to_a_share_of_one_budget_per_query(
        world: dict[str, Any]) -> None:
    from itmrt.scale.regions import MIN_REFINE_SHARE, REFINE_BUDGET

    for shard in open_shards(world["gallery"], threads=1, warn=quiet).shards:
        assert shard.regions.shards > 1
        shard.regions.refine = 1024
        shard.regions.shards = 2  # 1024 a shard: the recorded value stands
        assert shard.regions.default_refine(None) == 1024
        assert shard.regions.default_refine(33) == 33
        shard.regions.refine = 4096
        shard.regions.shards = 4
        assert shard.regions.default_refine(None) == REFINE_BUDGET // 4
        shard.regions.shards = 20
        assert shard.regions.default_refine(None) == MIN_REFINE_SHARE
        shard.regions.refine = 100  # a recorded refine below the share is kept
        assert shard.regions.default_refine(None) == 100


def test_infer_and_audit_take_rescore_and_answer_as_the_api(world: dict[str, Any], capsys: Any) -> None:
    root = world["root"]
    gallery = root / "residual-2"
    if not gallery.is_dir():
        spec = IndexSpec("regions", regions_storage="compact", residual_bits=2)
        index_sharded(world["runtime"], world["features"], gallery, ShardingOptions(16, None, spec))
    listed = infer_answers_as_the_api(capsys, gallery, random_captions(3, seed=41, max_words=9), "rescore", 4, 4, 9)
    report = root / "rescore-audit.json"
    result = run_cli(capsys, "audit", str(gallery), "--captions", str(listed), "--sample", "3",
                     "--top-k", "4", "--shortlist", "4", "--rescore", "9", "--out", str(report), "--overwrite")
    assert result.code == 0, result.err
    assert json.loads(report.read_text())["rescore"] == 9


def test_the_search_keeps_the_same_top_rows_as_streaming_top_k_ties_included() -> None:
    from itmrt.runtime.tiled import StreamingTopK
    from itmrt.scale.region_search import _top_rows

    rng = np.random.default_rng(0)
    for _ in range(500):
        n, k = int(rng.integers(1, 60)), int(rng.integers(1, 70))
        scores = rng.integers(0, 6, size=n).astype(np.float32) / 4  # many ties: broken by the lower row
        rows = rng.permutation(1000)[:n].astype(np.int64)
        best = StreamingTopK(1, min(k, n))
        best.update(slice(None), scores[None, :], rows)
        np.testing.assert_array_equal(_top_rows(scores, rows, k), best.indices[0])
    with pytest.raises(ItmrtError):
        _top_rows(np.array([1.0, np.nan], dtype=np.float32), np.array([0, 1]), 1)
