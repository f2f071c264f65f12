"""The runtime API: torch-free import, encoders, galleries, backend selection and bad-input errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import itmrt
from itmrt.errors import DataError, ItmrtError
from itmrt.runtime import load, read_gallery
from itmrt.runtime.backends import OrtBackend
from itmrt.runtime.encoders import length_buckets
from itmrt.text.vocab import CaptionTooLongError

from runtime_helpers import make_bundle, make_cmpm_bundle, random_captions, region_features


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("api"))[0]


@pytest.fixture(scope="module")
def runtime(bundle: Path):  # type: ignore[no-untyped-def]
    return load(bundle, threads=1)


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import itmrt, itmrt.runtime, itmrt.runtime.backend_trt\n"
        "assert itmrt.load is itmrt.runtime.load\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    done = subprocess.run([sys.executable, "-c", "import itmrt, sys; print('onnxruntime' in sys.modules)"],
                          check=True, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False"  # `import itmrt` alone loads no backend


def test_itmrt_load_is_the_runtime_loader() -> None:
    assert itmrt.load is load
    with pytest.raises(AttributeError):
        itmrt.no_such_thing  # noqa: B018


def test_length_buckets_sort_and_cut() -> None:
    batches = length_buckets(np.array([5, 2, 9, 2, 7]), 2)
    assert [b.tolist() for b in batches] == [[1, 3], [0, 4], [2]]


def test_bucketed_encoding_equals_one_caption_at_a_time(runtime) -> None:  # type: ignore[no-untyped-def]
    captions = random_captions(11, seed=3)
    together = runtime.encode_captions(captions)
    assert together.lengths.tolist() == [len(c.split()) + 2 for c in captions]
    for k, caption in enumerate(captions):
        alone = runtime.encode_captions([caption])
        np.testing.assert_allclose(together.padded([k])[0], alone.padded([0])[0], atol=1e-6)


def test_long_captions_truncate_with_warning_or_refuse(bundle: Path) -> None:
    messages: list[str] = []
    rt = load(bundle, threads=1, max_length=5, warn=messages.append)
    encoded = rt.encode_captions(["word1 word2", "word1 word2 word3 word4 word5 word6"])
    assert encoded.lengths.tolist() == [4, 5]
    assert len(messages) == 1 and "truncated" in messages[0] and "caption 2" in messages[0]
    strict = load(bundle, threads=1, max_length=5, on_long="refuse")
    with pytest.raises(CaptionTooLongError, match="caption 2 has 8 tokens"):
        strict.encode_captions(["word1", "word1 word2 word3 word4 word5 word6"])
    with pytest.raises(ItmrtError, match="on-long"):
        load(bundle, threads=1, on_long="drop").encode_captions(["word1"])


def test_search_api_agrees_with_full_scores(runtime) -> None:  # type: ignore[no-untyped-def]
    features, captions = region_features(8, seed=4), random_captions(6, seed=5)
    images = runtime.encode_images(features)
    scores = runtime.score(images, runtime.encode_captions(captions))
    assert scores.shape == (8, 6) and scores.dtype == np.float32
    hits = runtime.search_text_to_image(captions, images, k=3)
    np.testing.assert_array_equal(hits.indices, np.argsort(-scores.T, axis=1, kind="stable")[:, :3])
    back = runtime.search_image_to_text(images, captions, k=2)
    np.testing.assert_array_equal(back.indices, np.argsort(-scores, axis=1, kind="stable")[:, :2])


def test_gallery_round_trip_and_foreign_bundle(runtime, bundle: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    features = region_features(9, seed=6)
    gallery = runtime.index(features, tmp_path / "gallery")
    reopened = read_gallery(tmp_path / "gallery", verify=True)
    assert isinstance(reopened.embeddings, np.memmap)
    np.testing.assert_array_equal(np.asarray(reopened.embeddings), runtime.encode_images(features))
    assert reopened.manifest["bundle"]["manifest_sha256"] == runtime.bundle.manifest_sha256
    captions = random_captions(5, seed=7)
    np.testing.assert_array_equal(
        runtime.search_text_to_image(captions, gallery, k=4).indices,
        runtime.search_text_to_image(captions, runtime.encode_images(features), k=4).indices,
    )
    with pytest.raises(ItmrtError, match="already holds a gallery"):
        runtime.index(features, tmp_path / "gallery")
    other = load(make_bundle(tmp_path / "other", seed=1)[0], threads=1)
    with pytest.raises(ItmrtError, match="made with another bundle"):
        other.open_gallery(tmp_path / "gallery")
    with pytest.raises(ItmrtError, match="made with another bundle"):
        other.search_text_to_image(captions, reopened)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_feature_dims_must_match_the_bundle(runtime) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="axis 2 is 65, not 64"):
        runtime.encode_images(np.zeros((2, 10, 65), np.float32))
    with pytest.raises(DataError, match="exported for 10..10"):
        runtime.encode_images(np.zeros((2, 12, 64), np.float32))
    with pytest.raises(DataError, match="3-d input"):
        runtime.encode_images(np.zeros((2, 64), np.float32))


def test_backend_and_precision_choices(bundle: Path) -> None:
    with pytest.raises(ItmrtError, match="precision fp16 is not in bundle"):
        load(bundle, precision="fp16")
    with pytest.raises(ItmrtError, match="unknown precision"):
        load(bundle, precision="fp8")
    with pytest.raises(ItmrtError, match="'cuda' is not available"):
        load(bundle, providers=["cuda"])
    with pytest.raises(ItmrtError, match="no TensorRT fp32 engine"):
        load(bundle, backend="trt")
    with pytest.raises(ItmrtError, match="unknown backend"):
        load(bundle, backend="tvm")
    assert load(bundle, providers=["cpu"], threads=1).backends["scorer"].providers == ["CPUExecutionProvider"]


def test_truncated_graph_is_one_line_error(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = (copy / "scorer.onnx").read_bytes()
    (copy / "scorer.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ItmrtError, match="does not match the sha256") as caught:
        load(copy)
    assert "\n" not in str(caught.value)
    with pytest.raises(ItmrtError, match="ONNX Runtime cannot load") as caught:
        OrtBackend(copy / "scorer.onnx")
    assert "\n" not in str(caught.value)


def test_cmpm_with_the_released_max_over_padding_is_not_bucketed(tmp_path: Path) -> None:
    """Its caption embeddings depend on the batch's padding: the runtime keeps the captions' order and one
    width, as the reference does, so its embeddings are the reference's (bucketing by length would change them)."""
    import torch

    from itmrt.families.checkpoints import load_checkpoint
    from itmrt.runtime import load

    bundle = make_cmpm_bundle(tmp_path, max_over_padding=True)
    runtime = load(bundle, batch_size=2)  # several batches: bucketed, each would be padded to its own longest
    captions = random_captions(6, seed=4, min_words=1, max_words=8)
    encoded = runtime.encode_captions(captions)
    model = load_checkpoint(tmp_path / "cmpm.safetensors")
    tokens, lengths = runtime.vocab.encode_batch(captions)
    with torch.no_grad():
        expected = model.encode_captions(
            torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64))
        )
    np.testing.assert_allclose(encoded.vectors, expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["naaf", "cmpm"])
def test_warmup_runs_every_component_on_tiny_inputs(tmp_path: Path, family: str) -> None:
    from itmrt.runtime import load

    bundle = make_cmpm_bundle(tmp_path) if family == "cmpm" else make_bundle(tmp_path, family)[0]
    runtime = load(bundle)
    assert runtime.warmup() > 0
    captions = random_captions(3, seed=2)
    images = runtime.encode_images(region_features(4) if family != "cmpm" else
                                   np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    # Warm-up leaves no state behind: the same scores as a runtime that was never warmed up - bit for bit, but
    # where a warmed NAAF runtime scores a few captions with the compiled kernel (a different summation order).
    cold = load(bundle)
    warm_scores = runtime.score(images, runtime.encode_captions(captions))
    cold_scores = cold.score(images, cold.encode_captions(captions))
    if runtime.one_caption is not None and runtime.one_caption.kernel_loaded:
        np.testing.assert_allclose(warm_scores, cold_scores, rtol=0, atol=1e-6)
    else:
        assert np.array_equal(warm_scores, cold_scores)


def test_released_cmpm_pads_every_batch_alike(tmp_path: Path) -> None:
    """CMPM's released max over padding: an embedding must not depend on how the captions were cut into batches."""
    bundle = make_cmpm_bundle(tmp_path, max_over_padding=True)
    captions = random_captions(7, seed=3, min_words=1, max_words=8)
    assert not load(bundle).text_encoder.bucket
    one_batch = load(bundle).encode_captions(captions).vectors
    small_batches = load(bundle, batch_size=2).encode_captions(captions).vectors
    np.testing.assert_allclose(small_batches, one_batch, atol=1e-6)
