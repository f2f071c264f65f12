"""The fused CPU scorer (GEMM + numba pass) against the ONNX scorer graph and the PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

from itmrt.bundle.names import NAAF_INTRA_FACTOR, NAAF_LAMBDA, NAAF_THRESHOLD  # noqa: E402
from itmrt.families.naaf.graphs import naaf_scorer_graph  # noqa: E402
from itmrt.runtime.backends import OrtBackend, SessionSettings  # noqa: E402
from itmrt.runtime.encoders import CaptionEmbeddings  # noqa: E402
from itmrt.runtime.fused import CONSTANT_KEYS, FusedNaafScorer  # noqa: E402
from itmrt.runtime.tiled import score_tiled  # noqa: E402

D, N = 48, 9


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / (np.sqrt((x * x).sum(-1, keepdims=True)) + 1e-8)).astype(np.float32)


def _data(seed: int, n_img: int = 5, n_cap: int = 7, longest: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, padded captions (padding filled with noise, so inertness is tested) and lengths 1..longest."""
    rng = np.random.default_rng(seed)
    images = _unit(rng.standard_normal((n_img, N, D)).astype(np.float32) + 0.2)
    captions = _unit(rng.standard_normal((n_cap, longest, D)).astype(np.float32) + 0.2)
    lengths = rng.integers(1, longest + 1, size=n_cap).astype(np.int32)
    lengths[0] = longest
    lengths[1] = 2
    for c, m in enumerate(lengths):
        captions[c, m:] = rng.standard_normal((longest - m, D))
    return images, captions, lengths


def _graph(tmp_path: Path, threshold: float, lam: float = 20.0) -> Path:
    path = tmp_path / f"scorer_{threshold}_{lam}.onnx"
    path.write_bytes(naaf_scorer_graph(D, threshold, lam, 5.0, 17).SerializeToString())
    return path


def _feeds(images: np.ndarray, captions: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    return {"image_embeddings": images, "caption_embeddings": captions, "lengths": lengths}


def test_constant_keys_match_the_export() -> None:
    assert CONSTANT_KEYS == (NAAF_THRESHOLD, NAAF_LAMBDA, NAAF_INTRA_FACTOR)


@pytest.mark.parametrize("threshold", [0.0, 0.15, 0.3, 0.6])
def test_fused_equals_the_scorer_graph(tmp_path: Path, threshold: float) -> None:
    images, captions, lengths = _data(int(threshold * 100))
    path = _graph(tmp_path, threshold)
    expected = OrtBackend(path, SessionSettings(providers=["cpu"])).run(_feeds(images, captions, lengths))[0]
    fused = FusedNaafScorer.from_graph(path, threads=1)
    got = fused.run(_feeds(images, captions, lengths))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # The thresholds really split words between the branches (else the test would not cover both).
    sims = np.einsum("cld,ird->iclr", captions, images)
    best = sims.max(-1)
    real = np.arange(captions.shape[1])[None, :] < lengths[:, None]
    above = (best > threshold)[:, real]
    if threshold in (0.15, 0.3):
        assert above.any() and (~above).any()


def test_fused_equals_the_pytorch_reference(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from itmrt.families.naaf.model import naaf_scores_loop

    images, captions, lengths = _data(7)
    fused = FusedNaafScorer(0.2, 20.0, 5.0, threads=1)
    got = fused.run(_feeds(images, captions, lengths))[0]
    with torch.no_grad():
        expected = naaf_scores_loop(
            torch.from_numpy(images), torch.from_numpy(captions), lengths.tolist(), 0.2, 20.0, 5.0
        )
    np.testing.assert_allclose(got, np.asarray(expected).reshape(got.shape), atol=1e-5, rtol=0)


def test_many_tokens_span_several_chunks_of_lanes(tmp_path: Path) -> None:
    """More tokens than one CHUNK of vector lanes, not a multiple of it: the last chunk overlaps the one
    before, and captions straddle chunk boundaries."""
    from itmrt.runtime.fused_kernels import CHUNK

    images, captions, lengths = _data(13, n_img=6, n_cap=29, longest=12)
    assert lengths.sum() > 2 * CHUNK and lengths.sum() % CHUNK
    path = _graph(tmp_path, 0.15)
    expected = OrtBackend(path, SessionSettings(providers=["cpu"])).run(_feeds(images, captions, lengths))[0]
    got = FusedNaafScorer.from_graph(path, threads=2).run(_feeds(images, captions, lengths))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_padding_is_inert_and_captions_are_independent(tmp_path: Path) -> None:
    images, captions, lengths = _data(3)
    fused = FusedNaafScorer(0.1, 20.0, 5.0, threads=1)
    together = fused.run(_feeds(images, captions, lengths))[0]
    for c, m in enumerate(lengths):
        alone = fused.run(_feeds(images, captions[c : c + 1, :m], lengths[c : c + 1]))[0]
        np.testing.assert_allclose(alone[:, 0], together[:, c], atol=1e-6, rtol=0)


def test_tiled_driver_matches_the_graph_scorer_and_its_top_k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, captions, lengths = _data(11, n_img=13, n_cap=17)
    path = _graph(tmp_path, 0.1)
    pieces = [captions[c, :m] for c, m in enumerate(lengths)]
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    encoded = CaptionEmbeddings(np.concatenate(pieces), lengths, offsets)
    graph = score_tiled(
        OrtBackend(path, SessionSettings(providers=["cpu"])), images, encoded, top_k=4, keep_scores=True
    )
    fused = FusedNaafScorer.from_graph(path, threads=2).score_tiles(
        images, encoded, top_k=4, keep_scores=True, tile=(4, 5)
    )
    assert fused.tiles == 4 * 4 and fused.scores is not None and graph.scores is not None
    np.testing.assert_allclose(fused.scores, graph.scores, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(fused.t2i.indices, graph.t2i.indices)
    np.testing.assert_array_equal(fused.i2t.indices, graph.i2t.indices)
    # Captions stored out of order (a take()) still score as themselves.
    shuffled = encoded.take(np.arange(len(lengths))[::-1])
    again = FusedNaafScorer.from_graph(path, threads=1).score_tiles(images, shuffled, keep_scores=True)
    assert again.scores is not None
    np.testing.assert_allclose(again.scores, fused.scores[:, ::-1], atol=1e-6, rtol=0)
    # Top-k merged in several strips of image tiles (a strip of 8 images here) gives the same rankings.
    import itmrt.runtime.fused as fused_module

    monkeypatch.setattr(fused_module, "STRIP_BYTES", 8 * 5 * 4)
    strips = FusedNaafScorer.from_graph(path, threads=1).score_tiles(images, encoded, top_k=4, tile=(4, 5))
    np.testing.assert_array_equal(strips.t2i.indices, graph.t2i.indices)
    np.testing.assert_array_equal(strips.i2t.indices, graph.i2t.indices)
    np.testing.assert_allclose(strips.i2t.scores, graph.i2t.scores, atol=1e-5, rtol=0)


def test_grams_and_intra_weights_in_position_major_layout() -> None:
    images, captions, lengths = _data(5)
    fused = FusedNaafScorer(0.0, 20.0, 5.0, threads=1)
    np.testing.assert_allclose(fused.grams(images), images @ images.transpose(0, 2, 1), atol=1e-5)
    first = np.arange(len(lengths)) * captions.shape[1]
    tile = fused.caption_tile(captions.reshape(-1, D), first, lengths)
    layout, tokens = tile.layout, tile.tokens
    # Longest first; column offsets[k] + p holds token k of the caption at sorted place p, no padding.
    assert list(layout.lengths) == sorted(lengths, reverse=True)
    assert layout.offsets[-1] == lengths.sum() and len(tokens) >= layout.offsets[-1]
    # The intra weights are ragged: exactly m^2 entries per caption.
    assert tile.intra.size == int((lengths.astype(np.int64) ** 2).sum())
    for place, c in enumerate(layout.order):
        m = int(lengths[c])
        for k in range(m):
            np.testing.assert_array_equal(tokens[layout.offsets[k] + place], captions[c, k])
        u = captions[c, :m].astype(np.float64)
        logits = 5.0 * u @ u.T
        expected = np.exp(logits - logits.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
        got = np.array([[tile.intra[tile.pairs[k, other] + place] for other in range(m)] for k in range(m)])
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_large_lambda_and_all_negative_words(tmp_path: Path) -> None:
    """lambda = 50 pushes exp far past float32 without the shift; a threshold above every similarity leaves no
    positive."""
    images, captions, lengths = _data(9)
    for threshold, lam in ((0.05, 50.0), (2.0, 20.0)):
        path = _graph(tmp_path, threshold, lam)
        expected = OrtBackend(path, SessionSettings(providers=["cpu"])).run(_feeds(images, captions, lengths))[0]
        got = FusedNaafScorer.from_graph(path, threads=1).run(_feeds(images, captions, lengths))[0]
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_bad_inputs_and_non_naaf_graphs(tmp_path: Path) -> None:
    from itmrt.errors import ItmrtError
    from itmrt.families.cmpm.graphs import cosine_scorer_graph

    cosine = tmp_path / "cosine.onnx"
    cosine.write_bytes(cosine_scorer_graph(D, 17).SerializeToString())
    with pytest.raises(ItmrtError, match="NAAF"):
        FusedNaafScorer.from_graph(cosine)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(_graph(tmp_path, 0.0).read_bytes()[:50])
    with pytest.raises(ItmrtError, match="export the bundle again"):
        FusedNaafScorer.from_graph(broken)
    images, captions, lengths = _data(1)
    with pytest.raises(ItmrtError, match="lengths"):
        FusedNaafScorer(0.0, 20.0, 5.0, threads=1).run(_feeds(images, captions, lengths * 0))


def test_runtime_scorer_choice(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from itmrt.errors import ItmrtError
    from itmrt.runtime import load

    from tests.runtime_helpers import make_bundle, random_captions, region_features

    bundle, _, _ = make_bundle(tmp_path)
    graph = load(bundle, threads=1, scorer="graph")
    fused = load(bundle, threads=1)  # "auto": numba is importable and the backend is ORT on the CPU
    assert graph.scorer_kind == "graph" and fused.scorer_kind == "fused"
    images = graph.encode_images(region_features(6))
    captions = graph.encode_captions(random_captions(9, min_words=3))
    np.testing.assert_allclose(fused.score(images, captions), graph.score(images, captions), atol=1e-5, rtol=0)
    with pytest.raises(ItmrtError, match="scorer"):
        load(bundle, scorer="fastest")
    from itmrt.runtime.api import _fused_scorer

    with pytest.raises(ItmrtError, match="fp32"):
        _fused_scorer(graph.bundle, "fused", "ort", "int8", graph.backends["scorer"], None)
    assert _fused_scorer(graph.bundle, "auto", "ort", "int8", graph.backends["scorer"], None) is None


def test_scorers_on_several_threads_at_once_get_their_own_answers(tmp_path: Path) -> None:
    """The kernels release the interpreter lock, so two threads could enter numba's parallel layer at once (which
    it does not allow: it aborts the process); the scorer holds a lock of its own around every kernel call."""
    from concurrent.futures import ThreadPoolExecutor

    from itmrt.runtime import fused_kernels

    assert all(kernel.targetoptions.get("nogil") for kernel in fused_kernels.kernels())  # type: ignore[attr-defined]
    images, captions, lengths = _data(21, n_img=40, n_cap=12)
    path = _graph(tmp_path, 0.1)
    scorers = [FusedNaafScorer.from_graph(path, threads=2) for _ in range(3)]
    feeds = [_feeds(images * scale, captions, lengths) for scale in (1.0, 0.8, 1.2)]
    alone = [scorer.run(feed)[0] for scorer, feed in zip(scorers, feeds, strict=True)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda number: scorers[number % 3].run(feeds[number % 3])[0], range(30)))
    for number, got in enumerate(together):
        np.testing.assert_array_equal(got, alone[number % 3])
