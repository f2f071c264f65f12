"""The deployed scorer graph's own negative-branch decisions on the mismatched word, read from inside the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from itmrt.data.precomp import PrecompSplit
from itmrt.demo import shipped_model
from itmrt.metrics.mismatched_words import comparisons, read_meta
from itmrt.runtime import load
from itmrt.runtime.explain import explain
from itmrt.synthetic.region_features import make_synthetic_dataset, vocabulary_json
from itmrt.text.vocab import Vocabulary
from itmrt.train.recipes import SHIPPED_FILES, SMALL_REGION_DATA


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("decisions") / "data", {"test": 16},
                                  seed=SMALL_REGION_DATA["seed"], img_dim=SMALL_REGION_DATA["img_dim"])


def _bundle(folder: Path, threshold: float | None) -> Path:
    from itmrt.export.bundle import ExportOptions, export_bundle

    checkpoint = shipped_model(SHIPPED_FILES["naaf"])
    if checkpoint is None:
        pytest.skip("naaf_small.pth.tar is not in itmrt/assets")
    vocab = folder / "vocab.json"
    Vocabulary(vocabulary_json()["word2idx"]).to_json(vocab)
    export_bundle(checkpoint, vocab, folder / "bundle", ExportOptions(threshold=threshold))
    return folder / "bundle"


@pytest.mark.parametrize("threshold", [None, 0.48])
def test_graph_decisions_on_the_mismatched_word_agree_with_explain(data: Path, tmp_path: Path,
                                                                   threshold: float | None) -> None:
    """At the frozen thres_safe and at the training threshold (0.48: there X fires against the image lacking it)."""
    from itmrt.reports.mismatch import mismatched_word_decisions

    runtime = load(_bundle(tmp_path, threshold), scorer="graph", warn=lambda _m: None)
    meta = read_meta(data, "test")
    own_image = comparisons(meta)["own_image"]
    split = PrecompSplit.open(data, "test")
    found = mismatched_word_decisions(runtime, split.images, meta, own_image)
    assert found.x_on_lacking.size == len(own_image) > 0
    embeddings = runtime.encode_images(np.asarray(split.images))
    for k, ((_b, caption), (a, _)) in enumerate(zip(zip(*own_image.right), zip(*own_image.wrong))):
        extra = meta["images"][int(a)]["extra"]
        on_a = next(w for w in explain(runtime, embeddings, int(a), meta["captions"][int(caption)]["text"]).words
                    if w.word == extra)
        assert found.x_on_lacking[k] == on_a.negative_fired
        margin = on_a.best_similarity - runtime.bundle.manifest.threshold.value
        assert found.x_margin_on_lacking[k] == pytest.approx(margin, abs=1e-5)
    assert not found.x_on_holding.any()
    if threshold is not None:
        assert found.x_on_lacking.mean() >= 0.5 and found.summary()["x_fired_on_lacking_image_%"] >= 50.0
    assert found.flips(found) == {"x_on_lacking": 0, "x_on_holding": 0}
