"""Native TensorRT backend: a clear error where TensorRT is absent; parity with ORT where it is present."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import make_bundle, random_captions, region_features

from itmrt.errors import ItmrtError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt and pycuda are installed here")
def test_missing_tensorrt_is_a_one_line_error(tmp_path: Path) -> None:
    from itmrt.runtime.backend_trt import TrtBackend

    engine = tmp_path / "scorer.fp32.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(ItmrtError, match="needs the tensorrt and pycuda packages"):
        TrtBackend(engine)


def build_engine(onnx_path: Path, out: Path, profile: dict[str, tuple[tuple[int, ...], ...]]) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    shapes = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        shapes.set_shape(name, low, opt, high)
    config.add_optimization_profile(shapes)
    out.write_bytes(bytes(builder.build_serialized_network(network, config)))


@pytest.mark.skipif(not HAVE_TRT, reason="tensorrt / pycuda not installed (no GPU on this machine)")
def test_trt_scorer_matches_ort(tmp_path: Path) -> None:
    from itmrt.runtime import load
    from itmrt.runtime.backend_trt import TrtBackend

    bundle = make_bundle(tmp_path)[0]
    runtime = load(bundle)
    images = runtime.encode_images(region_features(6))
    captions = runtime.encode_captions(random_captions(9))
    batch, lengths = captions.padded(np.arange(9))
    d = images.shape[-1]
    engine = tmp_path / "scorer.fp32.engine"
    build_engine(bundle / "scorer.onnx", engine, {
        "image_embeddings": ((1, 10, d), (8, 10, d), (16, 10, d)),
        "caption_embeddings": ((1, 1, d), (8, 8, d), (16, 12, d)),
        "lengths": ((1,), (8,), (16,)),
    })
    trt_backend = TrtBackend(engine)
    feeds = {"image_embeddings": images, "caption_embeddings": batch, "lengths": lengths.astype(np.int32)}
    expected = runtime.backends["scorer"].run(feeds)[0]
    for _ in range(2):  # buffers are reused across calls
        np.testing.assert_allclose(trt_backend.run(feeds)[0], expected, atol=1e-4)
    with pytest.raises(ItmrtError, match="optimisation profile"):
        trt_backend.run(dict(feeds, image_embeddings=np.zeros((17, 10, d), np.float32)))
