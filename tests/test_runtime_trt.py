"""Native TensorRT backend: a clear error where TensorRT is absent; where it is present, engines built by the
production path (``build_engines``: strongly typed network, TF32 cleared, the manifest's profile) match ORT."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from itmrt.errors import ItmrtError

from runtime_helpers import make_bundle, random_captions, region_features

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt and pycuda are installed here")
def test_missing_tensorrt_is_a_one_line_error(tmp_path: Path) -> None:
    from itmrt.runtime.backend_trt import TrtBackend

    engine = tmp_path / "scorer.fp32.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(ItmrtError, match="needs the tensorrt and pycuda packages"):
        TrtBackend(engine)


@pytest.mark.skipif(not HAVE_TRT, reason="tensorrt / pycuda not installed (no GPU on this machine)")
def test_trt_engines_from_the_build_path_match_ort(tmp_path: Path) -> None:
    from itmrt.engine.build import EngineOptions, build_engines
    from itmrt.runtime import load

    bundle = make_bundle(tmp_path)[0]
    manifest = build_engines(bundle, "fp32", EngineOptions(workspace_mb=256))
    entry = manifest["engines"]["fp32"]["scorer"]
    assert entry["builder"]["clear_flags"] == ["TF32"] and entry["tf32"] == {"enabled": False}
    assert entry["device_memory_bytes"] > 0 and entry["layer_info"]["summary"]["detailed"]
    reference = load(bundle, scorer="graph")
    images = reference.encode_images(region_features(6))
    captions = reference.encode_captions(random_captions(9))
    batch, lengths = captions.padded(np.arange(9))
    feeds = {"image_embeddings": images, "caption_embeddings": batch, "lengths": lengths.astype(np.int32)}
    expected = reference.backends["scorer"].run(feeds)[0]
    with load(bundle, backend="trt") as runtime:
        scorer = runtime.backends["scorer"]
        for _ in range(2):  # buffers are reused across calls
            np.testing.assert_allclose(scorer.run(feeds)[0], expected, atol=1e-4)
        assert getattr(scorer, "gpu_seconds") > 0  # noqa: B009 (the Backend protocol has no gpu_seconds)
        d = images.shape[-1]
        with pytest.raises(ItmrtError, match="optimisation profile"):
            scorer.run(dict(feeds, image_embeddings=np.zeros((17, 10, d), np.float32)))
    with pytest.raises(ItmrtError, match="was closed"):
        scorer.run(feeds)
