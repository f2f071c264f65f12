"""Sign-bit sketches of every region (:mod:`itmrt.scale.sketches`): the scan's distances against a plain count,
built where a shard's regions fit its centroids poorly, searched instead of the probed lists, exact when every
image is kept, hashed like the rest of the index, and ``--region-sketch`` checked in one line."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.scale import IndexSpec, SearchRequest, ShardingOptions, index_sharded, open_shards
from itmrt.scale.region_search import ScoreEstimate, token_gemm
from itmrt.scale.sketches import (
    _least_distances_numpy,
    encode_both,
    encode_sketches,
    least_distances,
    least_distances_of_rows,
    sign_bits,
    sketch_projection,
    sketch_similarities,
)

from cli_helpers import run_cli
from runtime_helpers import make_bundle, random_captions
from scale_helpers import infer_answers_as_the_api, quiet, same_top_k, tampered_file_is_refused

pytest.importorskip("faiss")
pytest.importorskip("numba", reason="the compiled scan against numpy's, and the fused scorer's exact scores")

EVERYTHING = 10**6


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    vectors = rng.standard_normal(shape).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def counted(vectors: np.ndarray, tokens: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``[m, N]`` the least number of sign bits a token and an image's regions disagree on, counted plainly."""
    images, regions, depth = vectors.shape
    stored = (vectors.reshape(-1, depth) @ projection >= 0).reshape(images, regions, -1)
    asked = tokens @ projection >= 0
    return (stored[None] != asked[:, None, None]).sum(axis=-1).min(axis=-1)


@settings(max_examples=25, deadline=None)
@given(images=st.integers(1, 300), regions=st.integers(1, 40), words=st.integers(1, 5),
       bits=st.sampled_from([64, 128, 256, 320]), threads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_the_scan_counts_each_words_least_disagreeing_bits_over_an_images_regions(
        images: int, regions: int, words: int, bits: int, threads: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vectors, tokens = unit(rng, images, regions, 24), unit(rng, words, 24)
    projection = sketch_projection(24, bits, seed)
    sketches = encode_sketches(vectors, projection)
    assert sketches.shape == (bits // 64, regions, images) and sketches.dtype == np.uint64
    query = sign_bits(tokens, projection)
    found = least_distances(sketches, query, threads)
    np.testing.assert_array_equal(found, counted(vectors, tokens, projection))
    np.testing.assert_array_equal(_least_distances_numpy(sketches, query, np.empty_like(found)), found)


@settings(max_examples=25, deadline=None)
@given(images=st.integers(1, 300), regions=st.integers(1, 12), words=st.integers(1, 5),
       bits=st.sampled_from([64, 128]), fine=st.sampled_from([64, 192, 512]), threads=st.integers(1, 3),
       seed=st.integers(0, 2**16), data=st.data())
def test_the_fine_sketch_counts_the_chosen_images_bits_under_the_later_columns(
        images: int, regions: int, words: int, bits: int, fine: int, threads: int, seed: int, data: Any) -> None:
    rng = np.random.default_rng(seed)
    vectors, tokens = unit(rng, images, regions, 24), unit(rng, words, 24)
    projection = sketch_projection(24, bits + fine, seed)
    scan, kept = encode_both(vectors, projection, bits)
    assert kept is not None and kept.shape == (images, regions, fine // 64)
    np.testing.assert_array_equal(scan, encode_sketches(vectors, projection[:, :bits]))
    rows = np.sort(data.draw(st.lists(st.integers(0, images - 1), min_size=1, max_size=images, unique=True)))
    query = sign_bits(tokens, projection)[:, bits // 64 :]
    found = least_distances_of_rows(kept, np.array(rows), query, threads)
    np.testing.assert_array_equal(found, counted(vectors[rows], tokens, projection[:, bits:]))
    with mock.patch("itmrt.scale.sketches.sketch_kernels", return_value=None):  # numpy's fallback, no numba
        np.testing.assert_array_equal(least_distances_of_rows(kept, np.array(rows), query, threads), found)
    assert encode_both(vectors, projection[:, :bits], bits)[1] is None


def test_sketch_similarities_estimate_cosines_best_where_they_are_near() -> None:
    rng = np.random.default_rng(0)
    base = unit(rng, 400, 1024)
    near = unit(rng, 400, 1024) * 0.45 + base  # cosines about 0.9
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    projection = sketch_projection(1024, 256, 1)
    distances = (sign_bits(base, projection)[:, None, :] ^ sign_bits(near, projection)[:, None, :])
    counts = np.array([[bin(int(x)).count("1") for x in row.ravel()] for row in distances]).sum(axis=1)
    estimated = sketch_similarities(counts.astype(np.uint16), 256)
    exact = (base * near).sum(axis=1)
    assert abs(float(np.mean(estimated - exact))) < 0.01  # unbiased in the mean
    assert float(np.sqrt(np.mean((estimated - exact) ** 2))) < 0.05
    assert sketch_similarities(np.array([0, 128, 256], dtype=np.uint16), 256).tolist() == pytest.approx([1, 0, -1])


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Region embeddings with no structure (their centroids fit them poorly) as a 3-shard gallery."""
    root = tmp_path_factory.mktemp("sketches")
    bundle = make_bundle(root / "model")[0]
    runtime = load(bundle, threads=1, warn=quiet)
    probe = runtime.encode_captions(random_captions(1, seed=0, max_words=4))
    depth = probe.vectors.shape[1]
    vectors = unit(np.random.default_rng(5), 48, 10, depth)
    gallery = root / "gallery"
    index_sharded(runtime, None, gallery, ShardingOptions(16, None, IndexSpec("regions", region_centroids=4)),
                  embeddings=vectors)
    return {"root": root, "bundle": bundle, "runtime": runtime, "vectors": vectors, "gallery": gallery,
            "captions": runtime.encode_captions(random_captions(6, seed=9, max_words=8))}


def test_a_poorly_fitting_shard_stores_sketches_and_lists_their_hashes(noise: dict[str, Any]) -> None:
    shards = open_shards(noise["gallery"], threads=1, warn=quiet)
    for shard in shards.shards:
        entry = shard.gallery.manifest.region_index
        assert entry is not None and entry.fit < 0.5
        assert entry.params["sketch_bits"] == 256 and entry.params["fine_bits"] == 512  # exact storage
        assert entry.sketches is not None and entry.projection is not None and entry.fine_sketches is not None
        assert {item.file for item in entry.files()} >= {"region_sketches.npy", "region_projection.npy",
                                                         "region_fine_sketches.npy"}
        assert shard.regions is not None and shard.regions.sketch is not None
        assert shard.regions.sketch.sketches.shape == (4, 10, len(shard.gallery))
        assert shard.regions.sketch.fine is not None and shard.regions.sketch.fine.shape == (len(shard.gallery), 10, 8)
        assert shard.regions.sketch.projection.shape[1] == 256 + 512


def test_a_sketched_shard_re_estimates_its_best_instead_of_scoring_wider_and_says_so(noise: dict[str, Any]) -> None:
    from dataclasses import replace

    from itmrt.scale.region_files import poor_fit_message
    from itmrt.scale.regions import POOR_FIT_EXACT_PASS, POOR_FIT_UNION, SKETCH_RESCORE, fine_counts

    shard = open_shards(noise["gallery"], threads=1, warn=quiet).shards[0]
    index = shard.regions
    assert index is not None and index.poor_fit and index.sketch is not None
    stored = shard.gallery.embeddings
    assert (index.default_exact_pass(None), index.default_union(None), index.default_rescore(None, stored)) == \
        (0, 0, fine_counts(index.images)[1])
    assert (index.default_refine(None), index.default_refine(9)) == (fine_counts(index.images)[0], 9)
    assert fine_counts(index.images) == fine_counts(25_000) == (1000, 200)  # smaller shards: the floors
    assert fine_counts(50_000) == (2000, 200) and fine_counts(10**6) == (40_000, 4000)  # larger: in proportion
    assert (index.default_exact_pass(7), index.default_union(3), index.default_rescore(5, stored)) == (7, 3, 5)
    message = poor_fit_message(shard.gallery, "shard-00000")
    assert message is not None and "256-bit sketch" in message and "512-bit sketch" in message
    assert "best 1000 estimated again" in message and "best 200 re-estimated" in message and "\n" not in message
    index.sketch = replace(index.sketch, fine=None)  # a gallery written before fine sketches
    assert index.default_rescore(None, stored) == SKETCH_RESCORE
    index.sketch = None  # without sketches the wider defaults apply
    assert (index.default_exact_pass(None), index.default_union(None), index.default_rescore(None, stored)) == \
        (POOR_FIT_EXACT_PASS, POOR_FIT_UNION, 0)


def test_the_search_keeps_the_images_with_the_best_sketch_estimates(noise: dict[str, Any]) -> None:
    runtime, captions, vectors = noise["runtime"], noise["captions"], noise["vectors"]
    shards = open_shards(noise["gallery"], threads=1, warn=quiet)
    shard = shards.shards[1]
    index = shard.regions
    assert index is not None and index.sketch is not None
    first, count = shard.record.first, shard.record.images
    estimate = ScoreEstimate.from_bundle(runtime.bundle)
    kept = index.image_candidates(captions, estimate, 1, 5, threads=2, refine=EVERYTHING)  # no fine stage
    refined = index.image_candidates(captions, estimate, 1, 3, threads=2, refine=8)  # the fine sketch's best of 8
    assert captions.offsets is not None
    projection = index.sketch.projection
    for caption in range(len(captions)):
        tokens = np.asarray(captions.vectors[captions.offsets[caption] : captions.offsets[caption + 1]])
        distances = counted(vectors[first : first + count], tokens, projection[:, :256])
        scores = estimate.scores(sketch_similarities(distances.astype(np.uint16), 256), tokens, token_gemm(1))
        order = np.lexsort((np.arange(count), -scores))
        np.testing.assert_array_equal(kept[caption], order[:5])
        chosen = np.sort(order[:8])
        distances = counted(vectors[first + chosen], tokens, projection[:, 256:])
        scores = estimate.scores(sketch_similarities(distances.astype(np.uint16), 512), tokens, token_gemm(1))
        np.testing.assert_array_equal(refined[caption], chosen[np.lexsort((chosen, -scores))[:3]])


def test_keeping_every_image_is_exhaustive_scoring_and_a_copied_image_is_found_first(noise: dict[str, Any]) -> None:
    runtime, captions, vectors = noise["runtime"], noise["captions"], noise["vectors"]
    shards = open_shards(noise["gallery"], threads=1, warn=quiet)
    reference = runtime.rank(vectors, captions, top_k=6)
    same_top_k(shards.search(captions, SearchRequest(k=6, shortlist=EVERYTHING)).t2i, reference.t2i)
    # a caption whose words are regions of image 29 (shard 1): its sketches hold those bits exactly
    words = vectors[29, [0, 3, 5, 8, 9]]
    copied = CaptionEmbeddings(words, np.array([len(words)], dtype=np.int32), np.array([0, len(words)]))
    found = shards.search(copied, SearchRequest(k=1, shortlist=1, exact_pass=1, nprobe=1, union=0))
    assert found.t2i.indices[0, 0] == 29
    assert found.pairs == 3  # one image a shard scored exactly


def test_copied_into_memory_the_sketches_answer_as_mapped_ones(noise: dict[str, Any], tmp_path: Path) -> None:
    gallery = tmp_path / "g"
    shutil.copytree(noise["gallery"], gallery)
    requests = [SearchRequest(k=4, shortlist=6), SearchRequest(k=3, shortlist=3, refine=9, rescore=5)]
    mapped = [open_shards(gallery, threads=1, warn=quiet).search(noise["captions"], r) for r in requests]
    held = open_shards(gallery, threads=1, warn=quiet, copy_mb=64)
    assert held.in_memory
    for path in [*gallery.glob("shard-*/region_sketches.npy"), *gallery.glob("shard-*/region_fine_sketches.npy")]:
        path.write_bytes(b"")
    for request, answer in zip(requests, mapped):
        same_top_k(held.search(noise["captions"], request).t2i, answer.t2i)


def test_a_tampered_or_misshapen_sketch_file_is_refused_in_one_line(noise: dict[str, Any], tmp_path: Path) -> None:
    gallery = tmp_path / "tampered"
    shutil.copytree(noise["gallery"], gallery)
    tampered_file_is_refused(gallery, "shard-00002/region_sketches.npy")
    from itmrt.scale.region_load import checked_sketch

    entry = open_shards(noise["gallery"], threads=1, warn=quiet).shards[0].gallery.manifest.region_index
    projection = np.zeros((entry.dims, 256), dtype=np.float32)
    scan = np.zeros((4, entry.regions, entry.rows), dtype=np.uint64)
    fine = np.zeros((entry.rows, entry.regions, 8), dtype=np.uint64)
    wide = np.zeros((entry.dims, 768), dtype=np.float32)
    assert checked_sketch(gallery, wide, scan, fine, entry).fine_bits == 512  # as built
    for bad in ((projection, scan[:, :, :3], None), (projection[:, :100], scan[:1], None), (projection, scan, fine),
                (wide, scan, fine[:3]), (wide, scan, fine.astype(np.int64)), (wide[:, :704], scan, fine)):
        with pytest.raises(ItmrtError, match="sketches do not fit its projection"):
            checked_sketch(gallery, *bad, entry)
    tampered_file_is_refused(gallery, "shard-00001/region_fine_sketches.npy", at=-9, bit=4)


def test_region_sketch_off_auto_and_bits_build_what_they_say(noise: dict[str, Any]) -> None:
    runtime, vectors, root = noise["runtime"], noise["vectors"], noise["root"]
    settings = (("off", "exact", 0, 0), ("128", "exact", 128, 512), (64, "exact", 64, 512),
                ("256:0", "exact", 256, 0), ("128:64", "exact", 128, 64), ("auto", "compact", 256, 0),
                ("192:128", "compact", 192, 128))
    for setting, storage, bits, fine in settings:
        out = root / f"sketch-{setting}-{storage}".replace(":", "-")
        spec = IndexSpec("regions", region_centroids=4, region_sketch=setting, regions_storage=storage)
        index_sharded(runtime, None, out, ShardingOptions(24, None, spec), embeddings=vectors)
        for shard in open_shards(out, threads=1, warn=quiet).shards:
            assert shard.regions is not None
            sketch = shard.regions.sketch
            assert (sketch.bits if sketch is not None else 0, sketch.fine_bits if sketch is not None else 0) == \
                (bits, fine), setting
            assert (shard.gallery.path / "region_sketches.npy").exists() == bool(bits)
            assert (shard.gallery.path / "region_fine_sketches.npy").exists() == bool(fine)


@pytest.mark.parametrize(("value", "expected"), [
    ("100", "among 64, 128"), ("lots", "takes auto, off, BITS or BITS:FINE"), ("1024", "among 64, 128"),
    ("256:100", "among 64, 128"), ("256:512:64", "takes auto, off, BITS or BITS:FINE"),
    ("256:", "takes auto, off, BITS or BITS:FINE")])
def test_index_refuses_a_region_sketch_it_cannot_build_in_one_line(noise: dict[str, Any], capsys: Any,
                                                                    value: str, expected: str) -> None:
    embeddings = noise["root"] / "vectors.npy"
    np.save(embeddings, noise["vectors"])
    result = run_cli(capsys, "index", str(noise["bundle"]), "--embeddings", str(embeddings), "--out",
                     str(noise["root"] / f"refused-{value}"), "--shard-images", "16", "--shortlist-index", "regions",
                     "--region-sketch", value)
    assert result.code != 0 and expected in result.err and "--region-sketch" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (noise["root"] / f"refused-{value}").exists()
    result = run_cli(capsys, "index", str(noise["bundle"]), "--embeddings", str(embeddings), "--out",
                     str(noise["root"] / "refused-flat"), "--shard-images", "16", "--region-sketch", "256")
    assert result.code != 0 and "--region-sketch is for --shortlist-index regions" in result.err


@pytest.mark.parametrize("threads", [1, 3])
def test_the_exact_re_estimate_reads_float16_storage_as_stored_and_agrees_with_float32(threads: int) -> None:
    from itmrt.scale.region_search import _half_kernels, exact_best_similarities

    if _half_kernels() is None:
        pytest.skip("this CPU has no half-float conversion: the stage casts in numpy")
    rng = np.random.default_rng(threads)
    stored = unit(rng, 70, 10, 40).astype(np.float16)
    tokens = unit(rng, 5, 40)
    rows = np.sort(rng.choice(70, size=41, replace=False))
    want = (tokens @ stored[rows].astype(np.float32).reshape(-1, 40).T).reshape(5, 41, 10).max(axis=2)
    got = exact_best_similarities(tokens, stored, rows, token_gemm(1), block=8, threads=threads)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got.shape == (5, 41) and got.dtype == np.float32


def test_infer_and_audit_search_a_sketched_gallery_as_the_api_does(noise: dict[str, Any], capsys: Any) -> None:
    import json

    root, gallery = noise["root"], noise["gallery"]
    listed = infer_answers_as_the_api(capsys, gallery, random_captions(3, seed=43, max_words=9), "sketched", 3, 3, 6)
    report = root / "sketched-audit.json"
    result = run_cli(capsys, "audit", str(gallery), "--captions", str(listed), "--sample", "3",
                     "--top-k", "4", "--shortlist", "16", "--out", str(report), "--overwrite")
    assert result.code == 0, result.err
    audited = json.loads(report.read_text())
    # every image of every shard kept: the index is exhaustive scoring
    assert audited["recall_at_4"] == 1.0 and audited["top1_agreement"] == 1.0


def test_a_budget_over_sketched_shards_keeps_real_images_exact_scores_and_everything_is_exhaustive(
        noise: dict[str, Any]) -> None:
    runtime, captions, vectors = noise["runtime"], noise["captions"], noise["vectors"]
    shards = open_shards(noise["gallery"], threads=2, warn=quiet)
    reference = runtime.rank(vectors, captions, top_k=5).t2i
    everything = shards.search(captions, SearchRequest(k=5, shortlist=EVERYTHING, budget=EVERYTHING))
    same_top_k(everything.t2i, reference, atol=1e-6)  # two threads: the scorer sums in another order
    few = shards.search(captions, SearchRequest(k=3, shortlist=3, budget=7, rescore=5))
    assert few.pairs == len(captions) * 7
    full = runtime.score(vectors, captions)
    for caption in range(len(captions)):
        assert len(set(few.t2i.indices[caption])) == 3
        np.testing.assert_allclose(few.t2i.scores[caption], full[few.t2i.indices[caption], caption], atol=1e-6)


def test_positional_rows_read_sorted_rows_into_a_kept_buffer_as_take_does(tmp_path: Path) -> None:
    from itmrt.scale.positional import PositionalRows

    stored = unit(np.random.default_rng(2), 30, 4, 8).astype(np.float16)
    np.save(tmp_path / "rows.npy", stored)
    rows = PositionalRows(tmp_path / "rows.npy", "shard test")
    wanted = np.array([0, 1, 2, 7, 9, 10, 29])
    buffer = np.empty((16, 4, 8), dtype=np.float16)
    got = rows.take(wanted, out=buffer[: len(wanted)])
    np.testing.assert_array_equal(got, stored[wanted])
    assert np.shares_memory(got, buffer)
    for bad in (np.array([3, 3]), np.array([5, 2])):  # repeats, or not sorted: only take() without out
        with pytest.raises(ValueError, match="sorted rows without repeats"):
            rows.take(bad, out=buffer[: len(bad)])
    with pytest.raises(ValueError, match="C-contiguous float16"):
        rows.take(wanted, out=np.empty((len(wanted), 4, 8), dtype=np.float32))
    rows.close()


@pytest.mark.parametrize("threshold", [-0.2, 0.0, 0.15])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [128, 256])  # 256: the scan and the estimate in one kernel
def test_the_compiled_naaf_estimate_from_distances_is_numpys(threshold: float, threads: int, bits: int) -> None:
    from itmrt.scale.region_search import RegionSketch

    rng = np.random.default_rng(int(threshold * 100) + 100 + threads)
    vectors, tokens = unit(rng, 301, 9, 32), unit(rng, 7, 32)
    projection = sketch_projection(32, bits, 3)
    sketch = RegionSketch(projection, encode_sketches(vectors, projection))
    estimate = ScoreEstimate("naaf", threshold=threshold, intra_factor=4.0)
    want = estimate.scores(sketch.best_similarities(tokens), tokens, token_gemm(1))
    got = sketch.scores(tokens, estimate, token_gemm(1), threads)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    scan = ScoreEstimate("scan", agg_func="LogSumExp", lambda_lse=6.0)  # other families: numpy's estimate
    np.testing.assert_array_equal(sketch.scores(tokens, scan, token_gemm(1), threads),
                                  scan.scores(sketch.best_similarities(tokens), tokens, token_gemm(1)))


@pytest.mark.parametrize("threads", [1, 2])
def test_the_256_bit_scan_with_the_naaf_estimate_in_one_pass_gives_the_two_kernels_values(threads: int) -> None:
    """``scan_naaf_estimates``: the least distances turned into estimates block by block, bit for bit what the
    scan and then the estimate kernel give (odd word counts, part blocks); a NAAF search of 256-bit sketches
    takes it, and never writes the distances out."""
    from itmrt.scale import sketch_kernels
    from itmrt.scale.region_search import RegionSketch
    from itmrt.scale.sketches import scan_naaf_estimates, similarity_table

    rng = np.random.default_rng(7 + threads)
    table = similarity_table(256)
    for words, images in ((1, 1), (2, 63), (5, 64), (15, 200), (14, 1000)):
        sketches = rng.integers(0, 1 << 62, size=(4, 7, images), dtype=np.uint64) * np.uint64(3)
        query = rng.integers(0, 1 << 62, size=(words, 4), dtype=np.uint64) * np.uint64(3)
        weights = rng.random((words, words)).astype(np.float32)
        weights /= weights.sum(axis=1, keepdims=True)
        want = np.empty(images, dtype=np.float32)
        sketch_kernels.naaf_estimates(least_distances(sketches, query, threads), table, weights, np.float32(0.05),
                                      0, images, want)
        np.testing.assert_array_equal(scan_naaf_estimates(sketches, query, table, weights, 0.05, threads), want)
    assert scan_naaf_estimates(sketches[:2], query[:, :2], table, weights, 0.05) is None  # 128 bits: two passes
    vectors, tokens = unit(rng, 130, 9, 32), unit(rng, 6, 32)
    projection = sketch_projection(32, 256, 5)
    sketch = RegionSketch(projection, encode_sketches(vectors, projection))
    estimate = ScoreEstimate("naaf", threshold=0.05, intra_factor=4.0)
    want_scores = sketch.scores(tokens, estimate, token_gemm(1), threads)
    with mock.patch("itmrt.scale.region_search.least_distances", side_effect=AssertionError("two passes")):
        np.testing.assert_array_equal(sketch.scores(tokens, estimate, token_gemm(1), threads), want_scores)
