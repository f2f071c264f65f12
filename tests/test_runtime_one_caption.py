"""The one-caption scorer: its answers equal the batched scorers' (indices and scores), and its cached per-image
constants follow the gallery's content."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.runtime.encoders import CaptionEmbeddings
from itmrt.runtime.one_caption import (
    FEW_CAPTIONS,
    NaafParameters,
    OneCaptionScorer,
    ScanParameters,
    constants_bytes,
)

from runtime_helpers import make_bundle, random_captions, region_features

SCAN_OPT = {"vocab_size": 50, "img_dim": 64, "embed_size": 32, "word_dim": 16}
FAMILIES = {
    "naaf": ("naaf", None),
    "scan-t2i": ("scan", {**SCAN_OPT, "cross_attn": "t2i"}),
    "scan-i2t": ("scan", {**SCAN_OPT, "cross_attn": "i2t", "raw_feature_norm": "softmax", "agg_func": "Mean"}),
}
N_IMAGES = 150  # several blocks of BLOCK_IMAGES


@pytest.fixture(scope="module", params=list(FAMILIES))
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family, opt = FAMILIES[request.param]
    return make_bundle(tmp_path_factory.mktemp(request.param), family=family, opt=opt)[0]


@pytest.mark.parametrize("warm", [False, True], ids=["numpy", "warmed"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_caption_answers_equal_the_batched_answers(bundle: Path, tmp_path: Path, dtype: str, warm: bool) -> None:
    batched = load(bundle, scorer="graph", threads=1)
    runtime = load(bundle, threads=2)  # "auto": the one-caption scorer for a few captions
    assert batched.one_caption is None and runtime.one_caption is not None
    if warm:  # a warmed NAAF runtime scores the per-word steps with the compiled kernel
        pytest.importorskip("numba")
        runtime.warmup()
        assert runtime.one_caption.kernel_loaded == (runtime.bundle.family == "naaf")
    else:
        assert not runtime.one_caption.kernel_loaded
    assert runtime.one_caption.reranks_build_constants == warm  # a warmed runtime's reranks cache constants
    gallery = runtime.index(region_features(N_IMAGES, seed=1), tmp_path / "gallery", dtype=dtype)
    captions = random_captions(2 * FEW_CAPTIONS + 3, seed=5, max_words=10)  # more than a few: batched
    want = batched.search_text_to_image(captions, gallery, k=8)
    for number, caption in enumerate(captions[:6]):
        got = runtime.search_text_to_image([caption], gallery, k=8)
        np.testing.assert_array_equal(got.indices[0], want.indices[number])
        np.testing.assert_allclose(got.scores[0], want.scores[number], rtol=0, atol=1e-5)
    few = runtime.search_text_to_image(captions[:5], gallery, k=8)  # a few at once: the same
    np.testing.assert_array_equal(few.indices, want.indices[:5])
    full = runtime.score(gallery, runtime.encode_captions(captions[:3]))
    np.testing.assert_allclose(full, batched.score(gallery, batched.encode_captions(captions[:3])), atol=1e-5)
    assert runtime.one_caption.builds == 1  # every call above read the same cached constants


def test_rows_score_a_subset_in_the_order_given(bundle: Path, tmp_path: Path) -> None:
    runtime = load(bundle, threads=1)
    gallery = runtime.index(region_features(40, seed=2), tmp_path / "gallery")
    encoded = runtime.encode_captions(random_captions(2, seed=7))
    everything = runtime.score_images(gallery, encoded)
    rows = np.array([31, 4, 17, 4, 0])
    np.testing.assert_array_equal(runtime.score_images(gallery, encoded, rows), everything[rows])


def test_a_reranks_few_images_are_split_over_the_threads_with_the_same_scores(bundle: Path, tmp_path: Path) -> None:
    one, two = load(bundle, threads=1), load(bundle, threads=2)
    gallery = one.index(region_features(60, seed=3), tmp_path / "gallery")
    encoded = one.encode_captions(random_captions(1, seed=8))
    rows = np.random.default_rng(0).permutation(60)[:30]
    expected = one.score_images(gallery, encoded, rows)
    assert two.one_caption is not None
    blocks: list[tuple[int, int]] = []
    original = two.one_caption._map_blocks

    def counted(total: int, work: Any, size: int | None = None) -> None:
        def each(worker: Any, start: int, stop: int) -> None:
            blocks.append((start, stop))
            work(worker, start, stop)

        original(total, each, size)

    two.one_caption._map_blocks = counted  # type: ignore[method-assign]
    np.testing.assert_allclose(two.score_images(gallery, encoded, rows), expected, rtol=0, atol=1e-6)
    assert sorted(blocks) == [(0, 15), (15, 30)]  # one block a thread, not the 30 images in one


def test_shortlist_rerank_equals_full_scoring_when_the_shortlist_holds_everything(bundle: Path, tmp_path: Path) -> None:
    runtime = load(bundle, threads=1)
    gallery = runtime.index(region_features(60, seed=3), tmp_path / "gallery")
    captions = random_captions(3, seed=9)
    full = runtime.search_text_to_image(captions, gallery, k=5)
    listed = runtime.search_text_to_image(captions, gallery, k=5, shortlist=60)
    np.testing.assert_array_equal(listed.indices, full.indices)
    np.testing.assert_allclose(listed.scores, full.scores, atol=1e-6)


def test_constants_are_rebuilt_when_the_gallery_content_changes(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "naaf")[0]
    runtime, fresh_features = load(bundle, threads=1), region_features(30, seed=11)
    captions = random_captions(1, seed=4)
    old = runtime.search_text_to_image(captions, runtime.index(region_features(30, seed=10), tmp_path / "g"), k=30)
    # The same path, new content: a new gallery written over the old one.
    replaced = runtime.index(fresh_features, tmp_path / "g", overwrite=True)
    new = runtime.search_text_to_image(captions, replaced, k=30)
    assert runtime.one_caption is not None and runtime.one_caption.builds == 2
    expected = load(bundle, scorer="graph", threads=1).search_text_to_image(captions, replaced, k=30)
    np.testing.assert_array_equal(new.indices, expected.indices)
    np.testing.assert_allclose(new.scores, expected.scores, atol=1e-5)
    assert not np.allclose(np.sort(old.scores), np.sort(new.scores))
    # The same content again (reopened, another object): no rebuild.
    runtime.search_text_to_image(captions, runtime.open_gallery(tmp_path / "g"), k=3)
    assert runtime.one_caption.builds == 2


def test_constants_budget_bounds_the_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((20, 6, 8)).astype(np.float32)
    captions = CaptionEmbeddings(rng.standard_normal((4, 8)).astype(np.float32), np.array([4], np.int32),
                                 np.array([0, 4]))
    parameters = NaafParameters(0.1, 20.0, 5.0)
    one = constants_bytes(parameters, 20, 6)
    scorer = OneCaptionScorer(parameters, threads=1, budget_bytes=one)
    plain = scorer.score(images, captions)
    np.testing.assert_array_equal(scorer.score(images, captions, key=("a",)), plain)
    scorer.score(images * 2, captions, key=("b",))  # evicts "a": one gallery's constants fit the budget
    assert list(scorer._cache) == [("b",)]
    small = OneCaptionScorer(parameters, threads=1, budget_bytes=one - 1)  # too large to keep: per call
    np.testing.assert_array_equal(small.score(images, captions, key=("a",)), plain)
    assert small.builds == 0 and not small._cache
    # A rerank (rows) never evicts: the shards of a large gallery would rebuild each other's constants per query.
    rows = np.array([3, 17, 0])
    np.testing.assert_array_equal(scorer.score(images * 3, captions, key=("c",), rows=rows),
                                  scorer.score(images * 3, captions)[rows])
    assert list(scorer._cache) == [("b",)] and scorer.builds == 2
    np.testing.assert_array_equal(scorer.score(images * 2, captions, key=("b",), rows=rows),
                                  scorer.score(images * 2, captions)[rows])  # a cached gallery's are used
    assert scorer.builds == 2


def test_a_workers_scratch_stays_one_array_a_name_whatever_the_block_sizes_and_caption_lengths() -> None:
    """A long-running scorer sees every block size and caption length its requests have: its workers keep one
    reused array per name (grown to the largest asked for), not one per shape, and answer as a fresh scorer."""
    rng = np.random.default_rng(3)
    images = rng.standard_normal((40, 6, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=2, keepdims=True)
    kept = OneCaptionScorer(NaafParameters(0.1, 20.0, 5.0), threads=1)
    for words in (1, 5, 2, 9, 3, 12, 4):
        captions = CaptionEmbeddings(rng.standard_normal((words, 8)).astype(np.float32), np.array([words], np.int32),
                                     np.array([0, words]))
        for rows in (None, np.arange(words + 1), np.arange(0, 40, 3)):
            fresh = OneCaptionScorer(NaafParameters(0.1, 20.0, 5.0), threads=1)
            np.testing.assert_array_equal(kept.score(images, captions, rows=rows),
                                          fresh.score(images, captions, rows=rows))
    scratch = kept._workers[0].scratch
    assert len(scratch) == 4, sorted(scratch)
    assert max(array.size for array in scratch.values()) == 40 * 6 * 12


def test_a_one_shot_search_of_a_small_gallery_imports_no_numba(tmp_path: Path) -> None:
    """One caption against a small gallery in a fresh process (as ``itmrt infer`` runs it): nothing imports numba
    (0.3-0.4 s before the first answer), whose kernels pay only for large calls."""
    import subprocess
    import sys

    bundle = make_bundle(tmp_path / "naaf")[0]
    gallery = load(bundle, threads=1).index(region_features(40, seed=3), tmp_path / "g")
    code = ("import sys\nfrom itmrt.runtime import load\n"
            f"runtime = load({str(bundle)!r}, threads=1)\n"
            f"found = runtime.search_text_to_image([{random_captions(1, seed=2)[0]!r}], "
            f"runtime.open_gallery({str(gallery.path)!r}), k=5)\n"
            "assert found.indices.shape == (1, 5), found.indices.shape\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_rerank_computes_a_gallerys_constants_once_they_pay_or_in_a_warmed_runtime() -> None:
    """A rerank of a few rows computes their constants in the call, not the whole gallery's (at 1M images that
    was 16 s before one caption's first answer), until the reranks have asked for as many rows as the gallery
    holds; a warmed runtime (a service) caches them at once."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal((30, 6, 8)).astype(np.float32)
    captions = CaptionEmbeddings(rng.standard_normal((3, 8)).astype(np.float32), np.array([3], np.int32),
                                 np.array([0, 3]))
    scorer, rows = OneCaptionScorer(NaafParameters(0.1, 20.0, 5.0), threads=1), np.array([7, 2, 29])
    once = scorer.score(images, captions, key=("g",), rows=rows)
    np.testing.assert_array_equal(once, scorer.score(images, captions)[rows])
    for _ in range(8):  # 27 of the 30 rows asked for
        np.testing.assert_array_equal(scorer.score(images, captions, key=("g",), rows=rows), once)
    assert scorer.builds == 0 and not scorer._cache
    np.testing.assert_array_equal(scorer.score(images, captions, key=("g",), rows=rows), once)  # 30: they pay
    assert scorer.builds == 1 and list(scorer._cache) == [("g",)]
    warmed = OneCaptionScorer(NaafParameters(0.1, 20.0, 5.0), threads=1)
    warmed.reranks_build_constants = True  # what Runtime.warmup sets
    np.testing.assert_array_equal(warmed.score(images, captions, key=("g",), rows=rows), once)
    assert warmed.builds == 1


@pytest.mark.parametrize("cross_attn, raw_norm, agg", list(itertools.product(
    ["t2i", "i2t"], ["softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm"],
    ["LogSumExp", "Mean", "Max", "Sum"])))
def test_every_scan_option_matches_the_reference(cross_attn: str, raw_norm: str, agg: str) -> None:
    torch = pytest.importorskip("torch")
    from itmrt.families.scan.model import scan_scores

    images, padded, lengths, captions = _random_problem(seed=3)
    want = scan_scores(torch.from_numpy(images), torch.from_numpy(padded), torch.from_numpy(lengths), cross_attn,
                       raw_norm, agg, 9.0, 6.0).numpy()
    got = OneCaptionScorer(ScanParameters(cross_attn, raw_norm, agg, 9.0, 6.0), threads=1, block_images=7)
    np.testing.assert_allclose(got.score(images, captions), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "kernel"])
@pytest.mark.parametrize("threshold", [-0.2, 0.05, 0.3])  # every word above it, some, almost none
@pytest.mark.parametrize("lam", [20.0, 60.0])  # the relevance softmax unshifted (lambda <= 40), and max-shifted
def test_naaf_matches_the_reference_on_float32_and_float16(threshold: float, lam: float, compiled: bool) -> None:
    torch = pytest.importorskip("torch")
    from itmrt.families.naaf.model import naaf_scores

    images, padded, lengths, captions = _random_problem(seed=4)
    scorer = OneCaptionScorer(NaafParameters(threshold, lam, 5.0), threads=2, block_images=7)
    if compiled:  # blocks of 7 images: the kernel's 64 lanes mostly padding
        pytest.importorskip("numba")
        assert scorer.load_kernels() and scorer.kernel_loaded
    for stored in (images, images.astype(np.float16)):
        want = naaf_scores(torch.from_numpy(stored.astype(np.float32)), torch.from_numpy(padded),
                           torch.from_numpy(lengths), threshold, lam, 5.0).numpy()
        np.testing.assert_allclose(scorer.score(stored, captions), want, rtol=0, atol=1e-5)


def test_bad_inputs_are_one_line_errors() -> None:
    images, _padded, _lengths, captions = _random_problem(seed=5)
    scorer = OneCaptionScorer(NaafParameters(0.1, 20.0, 5.0), threads=1)
    with pytest.raises(ItmrtError, match="region embeddings"):
        scorer.score(images[:, 0], captions)
    with pytest.raises(ItmrtError, match="differ in size"):
        scorer.score(images[:, :, :8], captions)
    with pytest.raises(ItmrtError, match="token-level"):
        scorer.score(images, CaptionEmbeddings(np.zeros((1, 16), np.float32), np.array([1], np.int32)))


@pytest.mark.parametrize(("rows", "problem"), [
    (np.array([3, -1]), "within 0..29"),  # numpy wrapped it around to the last image
    (np.array([30]), "within 0..29"),  # an IndexError from numpy
    (np.array([2**64 - 1], dtype=np.uint64), "within 0..29"),  # -1 once cast to int64
    (np.array([1.7]), "integers"),  # truncated to row 1
    (np.array([True, False]), "integers"),  # read as rows 1 and 0
    (np.array([[0, 1], [2, 3]]), "1-D"),  # ONNX Runtime's "Invalid rank"
    (3, "1-D"),  # len() of unsized object
    (["a"], "integers"),
    ([[1], [2, 3]], "1-D"),  # ragged
])
def test_rows_outside_the_images_or_not_image_numbers_are_one_line_errors(rows: Any, problem: str) -> None:
    images, _padded, _lengths, captions = _random_problem(seed=5)
    scorer = OneCaptionScorer(NaafParameters(0.1, 20.0, 5.0), threads=1)
    with pytest.raises(ItmrtError, match=problem):
        scorer.score(images, captions, key=("g",), rows=rows)
    want = scorer.score(images, captions)
    np.testing.assert_array_equal(scorer.score(images, captions, rows=[np.int32(29), 0, 29]), want[[29, 0, 29]])
    assert scorer.score(images, captions, rows=[]).shape == (0, 3)


def _random_problem(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """30 unit-norm images of 9 regions and 3 captions of 1, 6 and 11 words (d 16): padded and back to back."""
    rng = np.random.default_rng(seed)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    images = unit(rng.standard_normal((30, 9, 16)))
    lengths = np.array([1, 6, 11], dtype=np.int64)
    words = [unit(rng.standard_normal((m, 16))) for m in lengths]
    padded = np.zeros((3, 11, 16), dtype=np.float32)
    for c, w in enumerate(words):
        padded[c, : len(w)] = w
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return images, padded, lengths, CaptionEmbeddings(np.concatenate(words), lengths.astype(np.int32), offsets)


def test_a_few_captions_are_encoded_on_one_thread_with_the_same_embeddings(bundle: Path) -> None:
    runtime = load(bundle, threads=2)
    assert runtime.text_encoder.small_backend is not None
    captions = random_captions(FEW_CAPTIONS + 4, seed=8, max_words=10)  # over FEW_CAPTIONS: the two-thread session
    many = runtime.encode_captions(captions)
    for number in (0, 7):
        one = runtime.encode_captions([captions[number]])  # the one-thread session
        start = int(many.offsets[number])
        np.testing.assert_allclose(one.vectors, many.vectors[start : start + int(many.lengths[number])], atol=1e-6)
    assert load(bundle, threads=1).text_encoder.small_backend is None  # one thread already: no second session


def test_a_warmed_runtime_encodes_the_two_gru_directions_side_by_side_bit_for_bit(bundle: Path) -> None:
    from itmrt.runtime.gru_directions import DirectionsBackend, split_bidirectional

    runtime = load(bundle, threads=2)
    captions = random_captions(5, seed=9, max_words=12)
    one_thread = [runtime.encode_captions(captions[:count]) for count in (1, 5)]
    runtime.warmup()
    bidirectional = split_bidirectional(runtime.bundle.graph_file("text_encoder", "fp32")) is not None
    assert bidirectional == (runtime.bundle.family == "naaf")  # the SCAN models here have a one-direction GRU
    assert isinstance(runtime.text_encoder.small_backend, DirectionsBackend) == bidirectional
    for before, count in zip(one_thread, (1, 5), strict=True):
        after = runtime.encode_captions(captions[:count])
        np.testing.assert_array_equal(after.vectors, before.vectors)  # the same kernels on the same inputs
        np.testing.assert_array_equal(after.offsets, before.offsets)
    runtime.close()
    # A graph without a bidirectional GRU is not cut.
    assert split_bidirectional(runtime.bundle.graph_file("image_encoder", "fp32")) is None


def test_calls_from_several_threads_get_their_own_answers() -> None:
    from concurrent.futures import ThreadPoolExecutor

    images, _padded, _lengths, captions = _random_problem(seed=6)
    scorer = OneCaptionScorer(NaafParameters(0.1, 20.0, 5.0), threads=1, block_images=4)
    alone = [scorer.score(images * scale, captions) for scale in (1.0, 0.5, 2.0)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda scale: scorer.score(images * scale, captions), [1.0, 0.5, 2.0] * 4))
    for number, got in enumerate(together):
        np.testing.assert_array_equal(got, alone[number % 3])


def test_the_compiled_kernel_scores_many_words_and_captions_as_numpy_does() -> None:
    """Blocks of more than 64 images (a full lane group and a partial one), captions of 1 to 70 words."""
    pytest.importorskip("numba")
    from itmrt.runtime.one_caption import naaf_block, query_captions

    rng = np.random.default_rng(11)
    lengths = np.array([1, 16, 17, 70], dtype=np.int32)
    words = rng.standard_normal((int(lengths.sum()), 24)).astype(np.float32)
    words /= np.linalg.norm(words, axis=1, keepdims=True)
    captions = CaptionEmbeddings(words, lengths, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    images = rng.standard_normal((100, 11, 24)).astype(np.float32)
    images /= np.linalg.norm(images, axis=2, keepdims=True)
    for threshold, lam in ((0.05, 20.0), (-0.5, 60.0), (0.4, 9.0)):
        parameters = NaafParameters(threshold, lam, 4.0)
        query = query_captions(captions, parameters)
        sims = np.einsum("bjd,td->bjt", images, query.tokens).astype(np.float32)
        grams = np.einsum("bjd,bkd->bjk", images, images).astype(np.float32)
        scorer = OneCaptionScorer(parameters, threads=1)
        assert scorer.load_kernels()
        np.testing.assert_allclose(scorer._naaf(sims, grams, query), naaf_block(sims, grams, query, parameters),
                                   rtol=0, atol=1e-5)
    assert not OneCaptionScorer(ScanParameters("t2i", "clipped_l2norm", "LogSumExp", 9.0, 6.0)).load_kernels()


def test_the_compiled_kernel_releases_the_interpreter_lock() -> None:
    """While one thread is inside the kernel, another keeps running Python: no long gap between its clock readings
    (with the lock held for the call, one gap would last the whole call)."""
    pytest.importorskip("numba")
    import threading
    import time

    from itmrt.runtime.one_caption import query_captions

    rng = np.random.default_rng(12)
    lengths = np.array([30] * 5, dtype=np.int32)
    words = rng.standard_normal((150, 8)).astype(np.float32)
    captions = CaptionEmbeddings(words, lengths, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    parameters = NaafParameters(0.1, 20.0, 4.0)
    scorer = OneCaptionScorer(parameters, threads=1)
    assert scorer.load_kernels()
    query = query_captions(captions, parameters)
    sims = rng.standard_normal((6000, 36, 150)).astype(np.float32)
    grams = np.ones((6000, 36, 36), dtype=np.float32)
    took: list[float] = []

    def score() -> None:
        started = time.perf_counter()
        scorer._naaf(sims, grams, query)
        took.append(time.perf_counter() - started)

    worker = threading.Thread(target=score)
    readings = [time.perf_counter()]
    worker.start()
    while worker.is_alive():
        readings.append(time.perf_counter())
    worker.join()
    assert took[0] > 0.1  # long enough to tell
    assert np.diff(readings).max() < took[0] / 2


@pytest.mark.parametrize("family", ["naaf", "scan"])
def test_float16_galleries_score_the_same_with_the_similarity_kernel(family: str) -> None:
    """A scorer that loaded its kernels multiplies float16 storage with the compiled kernel (NAAF and SCAN alike):
    the same scores as the cast-then-GEMM graph, through blocks and two workers."""
    pytest.importorskip("numba")
    from itmrt.runtime import region_kernels

    if not region_kernels.available():
        pytest.skip("this CPU has no hardware half-float conversion: the scorer keeps ONNX Runtime's cast")
    images, _padded, _lengths, captions = _random_problem(seed=8)
    parameters: Any = (NaafParameters(0.05, 20.0, 5.0) if family == "naaf"
                       else ScanParameters("t2i", "clipped_l2norm", "LogSumExp", 9.0, 6.0))
    stored = images.astype(np.float16)
    plain = OneCaptionScorer(parameters, threads=2, block_images=7)
    compiled = OneCaptionScorer(parameters, threads=2, block_images=7)
    compiled.load_kernels()
    assert compiled.region_kernels_loaded and not plain.region_kernels_loaded
    np.testing.assert_allclose(compiled.score(stored, captions), plain.score(stored, captions), rtol=0, atol=1e-5)
    rows = np.array([5, 0, 29, 5])
    np.testing.assert_allclose(compiled.score(stored, captions, rows=rows), plain.score(stored, captions)[rows],
                               rtol=0, atol=1e-5)


def test_a_large_float16_call_loads_the_similarity_kernel_without_a_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-shot command never warms up; past :data:`LARGE_CALL_VALUES` the kernels pay for their loading, so
    the scorer loads them then: a call reading that many float16 values (not a smaller one, nor float32
    storage where no per-image constant is needed: SCAN i2t), a call computing that many values' constants in
    the call (float32 storage too), or building that many values' Gram matrices."""
    pytest.importorskip("numba")
    from itmrt.runtime import one_caption, region_kernels

    if not region_kernels.available():
        pytest.skip("this CPU has no hardware half-float conversion: the scorer keeps ONNX Runtime's cast")
    images, _padded, _lengths, captions = _random_problem(seed=9)
    monkeypatch.setattr(one_caption, "LARGE_CALL_VALUES", images.size)
    scorer = OneCaptionScorer(NaafParameters(0.05, 20.0, 5.0), threads=1)
    want = scorer.score(images.astype(np.float16)[:-1], captions)  # one image short of the threshold
    assert not scorer.region_kernels_loaded
    i2t = OneCaptionScorer(ScanParameters("i2t", "softmax", "Mean", 9.0, 6.0), threads=1)
    i2t.score(images, captions)  # float32 storage and region norms: the graph's GEMM needs no cast, nor Gram
    assert not i2t.region_kernels_loaded
    got = scorer.score(images.astype(np.float16), captions)
    assert scorer.region_kernels_loaded and not scorer.kernel_loaded  # the per-word steps stay numpy's
    np.testing.assert_allclose(got[:-1], want, rtol=0, atol=1e-5)
    from_float32 = OneCaptionScorer(NaafParameters(0.05, 20.0, 5.0), threads=1)
    want = from_float32.score(images[:-1], captions)  # short of the threshold: the graph's Gram matrices
    assert not from_float32.region_kernels_loaded
    np.testing.assert_allclose(from_float32.score(images, captions)[:-1], want, rtol=0, atol=1e-5)
    assert from_float32.region_kernels_loaded  # its constants' place taken in the call
    # Building a gallery's Gram matrices over as many values loads them too, whatever the storage.
    building = OneCaptionScorer(NaafParameters(0.05, 20.0, 5.0), threads=1)
    building.reranks_build_constants = True
    kept = building.score(images, captions, key=("g",))
    assert building.region_kernels_loaded and building.builds == 1
    np.testing.assert_allclose(kept, scorer.score(images, captions), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["naaf", "scan-t2i"])
@pytest.mark.parametrize("pairs", [0, 10**6], ids=["gram-in-the-call", "direct"])
def test_a_call_without_cached_constants_sums_the_attended_vectors_directly(
        family: str, pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-shot call over a large gallery (region kernels loaded, NAAF's per-word steps in numpy, nothing
    cached) sums each word's attended vector directly, never computing a Gram matrix, while the weighted pairs
    are few (:data:`DIRECT_PAIRS_PER_IMAGE`), and through the block's Gram matrices past that: both give the
    reference's scores, NAAF at thresholds that weigh every region, some or almost none, float32 and float16."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("numba")
    from itmrt.families.naaf.model import naaf_scores
    from itmrt.families.scan.model import scan_scores
    from itmrt.runtime import one_caption, region_kernels

    if not region_kernels.available():
        pytest.skip("this CPU has no hardware half-float conversion: the scorer keeps ONNX Runtime's cast")
    monkeypatch.setattr(one_caption, "LARGE_CALL_VALUES", 1)  # every call is a one-shot's large call
    monkeypatch.setattr(one_caption, "DIRECT_PAIRS_PER_IMAGE", pairs)
    grams = {"calls": 0}
    original = one_caption._Worker.grams

    def counted(self: Any, images: np.ndarray, kernel: Any = None) -> np.ndarray:
        grams["calls"] += 1
        return original(self, images, kernel)

    monkeypatch.setattr(one_caption._Worker, "grams", counted)
    images, padded, lengths, captions = _random_problem(seed=12)
    settings = [-0.2, 0.05, 0.3] if family == "naaf" else [None]
    for threshold in settings:
        if family == "naaf":
            scorer = OneCaptionScorer(NaafParameters(threshold, 20.0, 5.0), threads=2, block_images=7)
        else:
            scorer = OneCaptionScorer(ScanParameters("t2i", "clipped_l2norm", "LogSumExp", 9.0, 6.0), threads=2,
                                      block_images=7)
        for stored in (images, images.astype(np.float16)):
            values = torch.from_numpy(stored.astype(np.float32))
            if family == "naaf":
                want = naaf_scores(values, torch.from_numpy(padded), torch.from_numpy(lengths), threshold, 20.0,
                                   5.0).numpy()
            else:
                want = scan_scores(values, torch.from_numpy(padded), torch.from_numpy(lengths), "t2i",
                                   "clipped_l2norm", "LogSumExp", 9.0, 6.0).numpy()
            np.testing.assert_allclose(scorer.score(stored, captions), want, rtol=0, atol=1e-5)
            assert scorer.region_kernels_loaded and not scorer.kernel_loaded
    assert (grams["calls"] == 0) == (pairs > 0), grams


def test_a_gallery_scanned_once_gets_no_constants_and_one_scanned_again_keeps_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a warm-up (a one-shot command) the first scan of a gallery sums the attended vectors directly and
    caches nothing; its second scan builds the constants and later scans reuse them; a warmed runtime (a
    service) builds them on the first. Every scan gives the same scores."""
    pytest.importorskip("numba")
    from itmrt.runtime import one_caption, region_kernels

    if not region_kernels.available():
        pytest.skip("this CPU has no hardware half-float conversion: the scorer keeps ONNX Runtime's cast")
    monkeypatch.setattr(one_caption, "LARGE_CALL_VALUES", 1)  # every call is a one-shot's large call
    images, _padded, _lengths, captions = _random_problem(seed=13)
    stored = images.astype(np.float16)
    once = OneCaptionScorer(NaafParameters(0.05, 20.0, 5.0), threads=2, block_images=7)
    first = once.score(stored, captions, key=("g",))
    assert once.builds == 0 and once.region_kernels_loaded
    np.testing.assert_allclose(once.score(stored, captions, key=("g",)), first, rtol=0, atol=1e-5)
    assert once.builds == 1
    once.score(stored, captions, key=("g",))
    assert once.builds == 1
    warmed = OneCaptionScorer(NaafParameters(0.05, 20.0, 5.0), threads=2, block_images=7)
    warmed.reranks_build_constants = True
    np.testing.assert_allclose(warmed.score(stored, captions, key=("g",)), first, rtol=0, atol=1e-5)
    assert warmed.builds == 1
