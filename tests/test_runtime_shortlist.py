"""Shortlist retrieval: global vectors, candidates, reranking == full scoring restricted to the candidates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from itmrt.cli.app import main
from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.runtime.shortlist import (
    caption_global_vectors,
    group_queries,
    image_global_vectors,
    top_candidates,
)

from runtime_helpers import make_bundle, random_captions, region_features

N_IMAGES, N_CAPTIONS = 30, 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("shortlist")
    bundle = make_bundle(root / "model")[0]
    runtime = load(bundle, threads=1)
    features = region_features(N_IMAGES, seed=21)
    captions = random_captions(N_CAPTIONS, seed=22, max_words=10)
    images = runtime.encode_images(features)
    encoded = runtime.encode_captions(captions)
    full = runtime.score(images, encoded)  # [images, captions]
    return {"root": root, "bundle": bundle, "runtime": runtime, "features": features, "captions": captions,
            "images": images, "encoded": encoded, "full": full}


def _l2(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def test_global_vectors_are_normalised_means_of_real_tokens_and_regions(setup) -> None:  # type: ignore[no-untyped-def]
    encoded, images = setup["encoded"], setup["images"]
    got = caption_global_vectors(encoded)
    for q in (0, 7, N_CAPTIONS - 1):
        tokens = encoded.vectors[encoded.offsets[q] : encoded.offsets[q] + encoded.lengths[q]]
        np.testing.assert_allclose(got[q], _l2(_l2(tokens).mean(axis=0)), atol=1e-6)
    # a non-contiguous selection (take) gives the same vectors
    picked = encoded.take([5, 2, 9])
    np.testing.assert_allclose(caption_global_vectors(picked), got[[5, 2, 9]], atol=1e-6)
    np.testing.assert_allclose(image_global_vectors(images, batch=7), _l2(_l2(images).mean(axis=1)), atol=1e-6)


def test_top_candidates_match_a_full_sort_with_ties_by_lower_index() -> None:
    rng = np.random.default_rng(0)
    queries, items = rng.standard_normal((9, 5)).astype(np.float32), rng.standard_normal((23, 5)).astype(np.float32)
    items[11] = items[4]  # an exact tie: the lower index must come first
    got = top_candidates(queries, items, 6, block_bytes=4 * 23 * 2)  # two queries per block
    scores = queries @ items.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :6]
    assert np.array_equal(got, expected)


def test_groups_cover_every_query_once_and_bound_the_union() -> None:
    rng = np.random.default_rng(1)
    candidates = np.stack([rng.choice(50, size=6, replace=False) for _ in range(70)])
    groups = group_queries(candidates, union_factor=2, max_group=16, call_overhead_pairs=0)
    assert sorted(np.concatenate(groups).tolist()) == list(range(70))
    for group in groups:
        assert len(group) <= 16
        assert len(group) == 1 or len(np.unique(candidates[group])) <= 12
    # a per-call overhead makes fewer, larger groups, and lowers the total cost it counts
    def cost(gs: list[np.ndarray], overhead: int) -> int:
        return sum(overhead + len(np.unique(candidates[g])) * len(g) for g in gs)

    costly = group_queries(candidates, union_factor=2, max_group=70, call_overhead_pairs=200)
    assert sorted(np.concatenate(costly).tolist()) == list(range(70))
    assert len(costly) < len(groups)
    assert cost(costly, 200) < cost(groups, 200)


def test_shortlist_of_everything_equals_full_scoring(setup) -> None:  # type: ignore[no-untyped-def]
    runtime, images, encoded = setup["runtime"], setup["images"], setup["encoded"]
    full = runtime.rank(images, encoded, top_k=10)
    short = runtime.rank(images, encoded, top_k=10, shortlist=max(N_IMAGES, N_CAPTIONS))
    assert short.scores is None
    for a, b in ((full.t2i, short.t2i), (full.i2t, short.i2t)):
        assert np.array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_caption_embeddings_with_unsigned_offsets_rank_as_signed_ones(setup) -> None:  # type: ignore[no-untyped-def]
    # a hand-made set with uint64 lengths and offsets passed check_caption_embeddings; a rerank's take() then made
    # float token rows (np.arange of two uint64s) and failed as IndexError "arrays used as indices must be..."
    from itmrt.runtime.encoders import CaptionEmbeddings

    runtime, images, encoded = setup["runtime"], setup["images"], setup["encoded"]
    unsigned = CaptionEmbeddings(encoded.vectors, encoded.lengths.astype(np.uint64), encoded.offsets.astype(np.uint64))
    want = runtime.rank(images, encoded, top_k=3, shortlist=6)
    got = runtime.rank(images, unsigned, top_k=3, shortlist=6)
    for a, b in ((want.t2i, got.t2i), (want.i2t, got.i2t)):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_small_shortlist_reranks_exactly_the_global_candidates(setup) -> None:  # type: ignore[no-untyped-def]
    runtime, images, encoded, full = setup["runtime"], setup["images"], setup["encoded"], setup["full"]
    k, shortlist = 4, 7
    caption_vectors, image_vectors = caption_global_vectors(encoded), image_global_vectors(images)
    result = runtime.rank(images, encoded, top_k=k, shortlist=shortlist)
    for direction, queries, items, matrix in (
        ("t2i", caption_vectors, image_vectors, full.T),
        ("i2t", image_vectors, caption_vectors, full),
    ):
        found = getattr(result, direction)
        candidates = top_candidates(queries, items, shortlist)
        assert found.indices.shape == (len(queries), k)
        for q in range(len(queries)):
            assert set(found.indices[q].tolist()) <= set(candidates[q].tolist())
            # the best k of the candidates by the real scorer, with the real scores
            wanted = candidates[q][np.lexsort((candidates[q], -matrix[q, candidates[q]]))][:k]
            assert found.indices[q].tolist() == wanted.tolist()
            np.testing.assert_allclose(found.scores[q], matrix[q, wanted], atol=1e-5)
    # the shortlist changed something somewhere (otherwise this test could not tell it from full scoring)
    assert not np.array_equal(result.t2i.indices, runtime.rank(images, encoded, top_k=k).t2i.indices)


def test_search_api_with_shortlist_and_gallery_cache(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runtime, captions = setup["runtime"], setup["captions"]
    gallery = runtime.index(setup["features"], tmp_path / "gallery")
    on_gallery = runtime.search_text_to_image(captions, gallery, k=3, shortlist=6)
    on_array = runtime.search_text_to_image(captions, setup["images"], k=3, shortlist=6)
    assert np.array_equal(on_gallery.indices, on_array.indices)
    assert len(runtime._gallery_vectors) == 1
    again = runtime.search_text_to_image(captions[:5], gallery, k=3, shortlist=6)
    assert np.array_equal(again.indices, on_array.indices[:5])
    assert len(runtime._gallery_vectors) == 1
    i2t = runtime.search_image_to_text(gallery, captions, k=2, shortlist=5)
    full_i2t = runtime.rank(setup["images"], setup["encoded"], top_k=2, shortlist=5).i2t
    assert np.array_equal(i2t.indices, full_i2t.indices)


def test_shortlist_smaller_than_k_is_a_one_line_error(setup) -> None:  # type: ignore[no-untyped-def]
    runtime = setup["runtime"]
    with pytest.raises(ItmrtError, match="shortlist 3 is smaller than --top-k 5") as info:
        runtime.rank(setup["images"], setup["encoded"], top_k=5, shortlist=3)
    assert "\n" not in str(info.value)
    with pytest.raises(ItmrtError, match="full matrix"):
        runtime.rank(setup["images"], setup["encoded"], top_k=5, shortlist=8, keep_scores=True)


def _cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_cli_shortlist(setup, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "feats.npy", setup["features"])
    (tmp_path / "caps.txt").write_text("\n".join(setup["captions"]) + "\n")
    common = ["infer", setup["bundle"], "--captions", tmp_path / "caps.txt", "--images", tmp_path / "feats.npy",
              "--top-k", "5",
              "--threads", "1"]
    assert _cli([*common, "--out", tmp_path / "full.jsonl"], capsys) == (0, "")
    assert _cli([*common, "--shortlist", N_CAPTIONS, "--out", tmp_path / "short.jsonl"], capsys)[0] == 0
    full = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    short = [json.loads(line) for line in (tmp_path / "short.jsonl").read_text().splitlines()]
    assert [r.get("images", r.get("captions")) for r in full] == [r.get("images", r.get("captions")) for r in short]
    code, err = _cli([*common, "--shortlist", "3", "--out", tmp_path / "bad.jsonl"], capsys)
    assert code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    assert "smaller than --top-k" in err and not (tmp_path / "bad.jsonl").exists()


def test_shortlist_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import itmrt.runtime.shortlist, itmrt.runtime.api\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
