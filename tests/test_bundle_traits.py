"""A bundle describes itself: export records what the runtime needs (``traits``) in the manifest, an older manifest
without them reads through the built-in families' table, and a bundle opens and is searched in a process where
itmrt's torch side (and torch) cannot be imported."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from itmrt.bundle.manifest import read_manifest  # noqa: E402
from itmrt.bundle.names import IMAGES, REGION_FEATURES  # noqa: E402
from itmrt.bundle.traits import BUILTIN_TRAITS, bundle_traits  # noqa: E402
from itmrt.errors import ItmrtError  # noqa: E402
from itmrt.families import get  # noqa: E402

from runtime_helpers import make_bundle, make_cmpm_bundle, random_captions, region_features  # noqa: E402

SCRIPT = Path(__file__).with_name("search_without_torch.py")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("traits")
    return {
        "naaf": make_bundle(root / "naaf")[0],
        "scan": make_bundle(root / "scan", family="scan",
                            opt={"vocab_size": 50, "img_dim": 64, "embed_size": 32, "word_dim": 16})[0],
        "cmpm": make_cmpm_bundle(root / "cmpm"),
        "cmpm_max_over_padding": make_cmpm_bundle(root / "cmpm_mop", max_over_padding=True),
    }


def _without_traits(bundle: Path, target: Path) -> Path:
    """A copy of ``bundle`` whose manifest is as an itmrt before ``traits`` wrote it."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    del manifest["traits"]
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def test_export_records_the_traits_of_each_family(bundles: dict[str, Path]) -> None:
    recorded = {name: read_manifest(path).traits for name, path in bundles.items()}
    assert all(traits is not None for traits in recorded.values())
    naaf, scan, cmpm, padded = (recorded[k] for k in ("naaf", "scan", "cmpm", "cmpm_max_over_padding"))
    assert (naaf.image_input, naaf.token_level, naaf.scorer, naaf.fused_scorer) == (REGION_FEATURES, True, "naaf", True)
    assert (scan.image_input, scan.token_level, scan.scorer) == (REGION_FEATURES, True, "scan")
    assert not scan.fused_scorer
    assert (cmpm.image_input, cmpm.token_level, cmpm.scorer, cmpm.caption_buckets) == (IMAGES, False, "cosine", True)
    assert padded.caption_buckets is False  # a caption's embedding depends on its batch's padding
    for name, path in bundles.items():
        manifest = read_manifest(path)
        assert manifest.traits == get(manifest.family).runtime_traits(manifest), name


def test_an_older_manifest_reads_the_builtin_table_which_agrees_with_the_specs(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    for name, path in bundles.items():
        old = read_manifest(_without_traits(path, tmp_path / name))
        assert old.traits is None and "traits" not in old.to_json()
        assert bundle_traits(old) == read_manifest(path).traits, name
    assert set(BUILTIN_TRAITS) == {"naaf", "scan", "cmpm"}


def test_an_older_manifest_of_a_family_outside_the_table_is_refused_in_one_line(bundles: dict[str, Path]) -> None:
    manifest = dataclasses.replace(read_manifest(bundles["naaf"]), family="tiny", traits=None)
    with pytest.raises(ItmrtError, match="records no 'traits' and 'tiny' is not a built-in family; export the bundle"):
        bundle_traits(manifest)


def test_an_older_bundle_scores_as_it_did(bundles: dict[str, Path], tmp_path: Path) -> None:
    from itmrt.runtime import load

    features, captions = region_features(6), random_captions(9)
    scores = {}
    for label, path in (("new", bundles["naaf"]), ("old", _without_traits(bundles["naaf"], tmp_path / "old"))):
        runtime = load(path, threads=1, scorer="graph")
        scores[label] = runtime.score(runtime.encode_images(features), runtime.encode_captions(captions))
        runtime.close()
    np.testing.assert_array_equal(scores["new"], scores["old"])


@pytest.mark.parametrize("old", [False, True], ids=["manifest-with-traits", "older-manifest"])
def test_a_bundle_opens_and_is_searched_where_the_torch_side_cannot_be_imported(
    bundles: dict[str, Path], tmp_path: Path, old: bool
) -> None:
    from itmrt.runtime import load

    bundle = _without_traits(bundles["naaf"], tmp_path / "old") if old else bundles["naaf"]
    features, captions = region_features(7, seed=3), random_captions(5, seed=4)
    np.save(tmp_path / "features.npy", features)
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(bundle), str(tmp_path / "features.npy"), str(tmp_path / "captions.txt"),
         str(tmp_path / "out"), "--block-torch-side"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["torch_side_imported"] == [] and found["images"] == 7
    runtime = load(bundle, threads=1)
    expected = runtime.search_text_to_image(captions, runtime.encode_images(features), k=3)
    assert found["top3"] == expected.indices.tolist()
    np.testing.assert_allclose(found["scores"], expected.scores, rtol=1e-6, atol=1e-6)
