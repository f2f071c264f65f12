"""`itmrt explain`: NAAF's score taken apart per word adds up to what the bundle's scorer returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from itmrt.demo import shipped_model
from itmrt.errors import ItmrtError
from itmrt.metrics.mismatched_words import comparisons
from itmrt.runtime import load
from itmrt.runtime.explain import explain, naaf_word_terms
from itmrt.synthetic.region_features import make_synthetic_dataset, vocabulary_json
from itmrt.text.vocab import Vocabulary
from itmrt.train.recipes import SHIPPED_FILES, SMALL_REGION_DATA

from cli_helpers import run_cli
from runtime_helpers import make_bundle, random_captions, region_features

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def random_naaf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain")
    bundle, checkpoint, vocab = make_bundle(root / "model")
    np.save(root / "feats.npy", region_features(6, seed=3))
    return {"root": root, "bundle": bundle, "checkpoint": checkpoint, "vocab": vocab, "feats": root / "feats.npy"}


@pytest.fixture(scope="module")
def shipped_naaf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped NAAF exported, and a small split drawn like its training data (12 images, 60 captions)."""
    checkpoint = shipped_model(SHIPPED_FILES["naaf"])
    if checkpoint is None:
        pytest.skip("naaf_small.pth.tar is not in itmrt/assets")
    from itmrt.export.bundle import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("explain_shipped")
    data = make_synthetic_dataset(root / "data", {"test": 12}, seed=SMALL_REGION_DATA["seed"],
                                  img_dim=SMALL_REGION_DATA["img_dim"])
    vocab = root / "vocab.json"
    Vocabulary(vocabulary_json()["word2idx"]).to_json(vocab)
    export_bundle(checkpoint, vocab, root / "bundle", ExportOptions())
    return {"root": root, "bundle": root / "bundle", "data": data}


def _every_pair_sums_to_the_scorer(bundle: Path, features: np.ndarray, captions: list[str], scorer: str) -> int:
    runtime = load(bundle, scorer=scorer, warn=lambda _m: None)
    embeddings = runtime.encode_images(features)
    matrix = runtime.score(embeddings, runtime.encode_captions(captions))
    fired = 0
    for c, caption in enumerate(captions):
        for i in range(len(embeddings)):
            result = explain(runtime, embeddings, i, caption)
            parts = sum(w.negative + w.aggregated + w.relevance for w in result.words)
            assert parts == pytest.approx(result.score, abs=1e-12)
            assert abs(result.score - matrix[i, c]) <= 1e-5, (i, c, result.score, matrix[i, c])
            assert abs(result.scorer_score - matrix[i, c]) <= 1e-5
            fired += sum(w.negative_fired for w in result.words)
    return fired


def test_contributions_sum_to_the_scorer_on_every_pair_of_a_test_split(shipped_naaf: dict[str, Path]) -> None:
    """The acceptance check: every (image, caption) of a small synthetic test split, the shipped model, 1e-5."""
    from itmrt.data.precomp import PrecompSplit

    split = PrecompSplit.open(shipped_naaf["data"], "test")
    assert split.num_images * len(split.captions) == 12 * 60
    _every_pair_sums_to_the_scorer(shipped_naaf["bundle"], np.asarray(split.images), list(split.captions), "graph")


def test_contributions_sum_to_the_graph_and_fused_scorers_with_negative_terms(random_naaf: dict[str, Path]) -> None:
    """Random weights put many words below the threshold: the negative terms take part in the sums here."""
    pytest.importorskip("numba")
    captions = random_captions(8, seed=5, max_words=9) + ["word1 word1 word1 word2"]
    features = np.load(random_naaf["feats"])
    fired = _every_pair_sums_to_the_scorer(random_naaf["bundle"], features, captions, "fused")
    fired += _every_pair_sums_to_the_scorer(random_naaf["bundle"], features, captions, "graph")
    assert fired > 0


def test_the_word_the_image_lacks_is_the_one_that_scores_lower(shipped_naaf: dict[str, Path]) -> None:
    """B's caption names X: against image A (which lacks X) X's best similarity and its contribution drop.

    On the shipped model X stays above the frozen threshold (thres_safe), so the drop comes from the
    positive terms; the negative branch is reported, not required.
    """
    meta = json.loads((shipped_naaf["data"] / "test_meta.json").read_text())
    runtime = load(shipped_naaf["bundle"], warn=lambda _m: None)
    from itmrt.data.precomp import PrecompSplit

    split = PrecompSplit.open(shipped_naaf["data"], "test")
    embeddings = runtime.encode_images(np.asarray(split.images))
    found = comparisons(meta)["own_image"]
    assert len(found) >= 5
    lower = 0
    for (b, caption), (a, _) in zip(zip(*found.right), zip(*found.wrong)):
        text = meta["captions"][caption]["text"]
        extra = meta["images"][a]["extra"]
        on_a = {w.word: w for w in explain(runtime, embeddings, int(a), text).words}
        on_b = {w.word: w for w in explain(runtime, embeddings, int(b), text).words}
        assert not on_b[extra].negative_fired  # B holds X
        lower += on_a[extra].best_similarity < on_b[extra].best_similarity and on_a[extra].total < on_b[extra].total
    assert lower >= 0.9 * len(found)


def test_ablation_drops_exactly_the_negative_terms_and_matches_torch(random_naaf: dict[str, Path]) -> None:
    import torch

    from itmrt.families.naaf.model import NAAFScorer

    runtime = load(random_naaf["bundle"], scorer="graph", warn=lambda _m: None)
    embeddings = runtime.encode_images(np.load(random_naaf["feats"]))
    caption = "word3 word7 word9 word11 word2"
    full = explain(runtime, embeddings, 2, caption)
    ablated = explain(runtime, embeddings, 2, caption, negative_branch=False)
    assert ablated.negative_branch is False and not any(w.negative_fired or w.negative for w in ablated.words)
    assert ablated.score == pytest.approx(full.score - sum(w.negative for w in full.words), abs=1e-12)
    assert ablated.scorer_score == pytest.approx(full.scorer_score)  # the deployed scorer is the full model
    encoded = runtime.encode_captions([caption])
    scorer = NAAFScorer(full.threshold, full.details["lambda_softmax"], full.details["intra_factor"],
                        negative_branch=False)
    with torch.no_grad():
        reference = scorer(torch.from_numpy(embeddings[2:3]), torch.from_numpy(encoded.vectors[None]),
                           torch.from_numpy(encoded.lengths.astype(np.int64)))
    assert abs(float(reference[0, 0]) - ablated.score) <= 1e-5


def test_word_terms_follow_the_definitions_on_a_hand_made_case() -> None:
    """Two words, two regions: word 0 matches region 0 above t; word 1 matches nothing (negative fires)."""
    tokens = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    regions = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    terms = naaf_word_terms(tokens, regions, threshold=0.5, lambda_softmax=20.0, intra_factor=5.0)
    np.testing.assert_allclose(terms.row_max[0], [0.5, -0.5])
    # q = softmax(5 * U U^T) r: the words are orthogonal, so each keeps most of its own r.
    w_self = np.exp(5.0) / (np.exp(5.0) + 1.0)
    q0 = 0.5 * w_self - 0.5 * (1 - w_self)
    np.testing.assert_allclose(terms.decision[0], [q0, -q0])
    assert terms.fired[0].tolist() == [False, True]
    np.testing.assert_allclose(terms.negative[0], [0.0, -0.5])
    np.testing.assert_allclose(terms.aggregated[0], [1.0, 0.0], atol=1e-7)  # vhat = region 0 exactly; none for word 1
    assert terms.relevance[0, 0] > 0.99 and abs(terms.relevance[0, 1]) < 1e-6


def test_unknown_and_cut_words_are_labelled_as_the_encoder_saw_them(random_naaf: dict[str, Path]) -> None:
    runtime = load(random_naaf["bundle"], scorer="graph", max_length=5, warn=lambda _m: None)
    result = explain(runtime, np.load(random_naaf["feats"]), 0, "word1 zebra word2 word3 word4")
    assert [w.word for w in result.words] == ["<start>", "word1", "zebra (<unk>)", "word2", "<end>"]
    assert abs(result.score - result.scorer_score) <= 1e-5


def test_explain_refuses_what_it_cannot_explain(random_naaf: dict[str, Path], tmp_path: Path) -> None:
    runtime = load(random_naaf["bundle"], warn=lambda _m: None)
    with pytest.raises(ItmrtError, match="out of range: there are 6 images"):
        explain(runtime, np.load(random_naaf["feats"]), 6, "word1")
    for blank in ("", "   \t"):
        with pytest.raises(ItmrtError, match="caption to explain is empty"):
            explain(runtime, np.load(random_naaf["feats"]), 0, blank)
    scan_bundle, _, _ = make_bundle(tmp_path / "scan", family="scan",
                                    opt={"vocab_size": 50, "img_dim": 64, "embed_size": 32, "word_dim": 16})
    with pytest.raises(ItmrtError, match="holds a scan model"):
        explain(load(scan_bundle, warn=lambda _m: None), np.load(random_naaf["feats"]), 0, "word1")


def test_cli_prints_the_table_and_writes_png_and_json(random_naaf: dict[str, Path], tmp_path: Path,
                                                      capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "matrix.png", tmp_path / "why.json"
    args = ["explain", str(random_naaf["bundle"]), "--images", str(random_naaf["feats"]), "--image", "4",
            "--caption", "word5 word6 word7", "--png", str(png), "--json", str(out)]
    result = run_cli(capsys, *args)
    assert result.code == 0, result.err
    assert "word6" in result.out and "score (sum of the contributions)" in result.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.read_text())
    assert saved["image"] == 4 and len(saved["words"]) == 5
    assert sum(w["total"] for w in saved["words"]) == pytest.approx(saved["score"])
    assert abs(saved["score"] - saved["scorer_score"]) <= 1e-5
    again = run_cli(capsys, *args)
    assert again.code == 2 and again.err.startswith("error: ") and "--overwrite" in again.err
    assert len(again.err.strip().splitlines()) == 1


def test_cli_reads_a_gallery_and_says_when_the_index_is_out_of_range(random_naaf: dict[str, Path], tmp_path: Path,
                                                                     capsys) -> None:  # type: ignore[no-untyped-def]
    gallery = tmp_path / "gallery"
    assert run_cli(capsys, "index", str(random_naaf["bundle"]), "--images", str(random_naaf["feats"]),
                   "--out", str(gallery)).code == 0
    from_gallery = run_cli(capsys, "explain", str(random_naaf["bundle"]), "--images", str(gallery), "--image", "1",
                           "--caption", "word5 word6")
    from_features = run_cli(capsys, "explain", str(random_naaf["bundle"]), "--images", str(random_naaf["feats"]),
                            "--image", "1", "--caption", "word5 word6")
    assert from_gallery.code == 0 and from_gallery.out.splitlines()[1:] == from_features.out.splitlines()[1:]
    wrong = run_cli(capsys, "explain", str(random_naaf["bundle"]), "--images", str(gallery), "--image", "9",
                    "--caption", "word5")
    assert wrong.code == 2 and "--image 9 is out of range" in wrong.err


def test_explain_runs_without_torch(random_naaf: dict[str, Path]) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from itmrt.runtime import load\n"
        "from itmrt.runtime.explain import explain\n"
        f"rt = load({str(random_naaf['bundle'])!r}, scorer='graph', warn=lambda m: None)\n"
        f"r = explain(rt, np.load({str(random_naaf['feats'])!r}), 0, 'word1 word2')\n"
        "assert abs(r.score - r.scorer_score) <= 1e-5\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
