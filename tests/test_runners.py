"""One runner interface (open, infer, close, input metadata): ONNX Runtime and the PyTorch reference run each
component of a bundle from the same feeds and agree; the TensorRT backend is a runner too (its runs need a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from itmrt.bundle.folder import read_bundle  # noqa: E402
from itmrt.bundle.names import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS, LENGTHS, TOKEN_IDS, Component  # noqa: E402
from itmrt.reports.comparator import max_abs_error  # noqa: E402
from itmrt.runtime.backend_trt import TrtBackend  # noqa: E402
from itmrt.runtime.backends import OrtBackend, open_backend  # noqa: E402
from itmrt.runtime.runner import Runner  # noqa: E402

from runtime_helpers import make_bundle, make_cmpm_bundle, region_features  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["naaf", "cmpm"])
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    return make_bundle(folder)[0] if request.param == "naaf" else make_cmpm_bundle(folder)


def _image_input(bundle: Path) -> np.ndarray:
    if read_bundle(bundle).family == "cmpm":
        return np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    return region_features(3, seed=1)


def _caption_feeds(width: int = 7) -> dict[str, np.ndarray]:
    lengths = np.array([width, 2, 5, 4], dtype=np.int32)
    tokens = np.zeros((len(lengths), width), dtype=np.int32)
    rng = np.random.default_rng(2)
    for row, length in enumerate(lengths):
        tokens[row, 0], tokens[row, length - 1] = 1, 2
        tokens[row, 1 : length - 1] = rng.integers(4, 50, length - 2)
    return {TOKEN_IDS: tokens, LENGTHS: lengths}


def test_the_runners_share_one_interface_and_agree_component_by_component(bundle: Path) -> None:
    from itmrt.families.reference import TorchRunner

    info = read_bundle(bundle)
    ort = {name: open_backend(info, name) for name in Component}
    model = TorchRunner.open(info, Component.IMAGE_ENCODER).model
    torch_runners = {name: TorchRunner.open(info, name, model=model) for name in Component}
    for name in Component:
        assert isinstance(ort[name], Runner) and isinstance(torch_runners[name], Runner)
        assert ort[name].inputs() == torch_runners[name].inputs(), name  # the same input metadata
        assert ort[name].output_names == torch_runners[name].output_names

    image_feeds = {ort[Component.IMAGE_ENCODER].input_names[0]: _image_input(bundle)}
    caption_feeds = _caption_feeds()
    outputs = {}
    for label, runners in (("ort", ort), ("torch", torch_runners)):
        images = runners[Component.IMAGE_ENCODER].infer(image_feeds)[IMAGE_EMBEDDINGS]
        captions = runners[Component.TEXT_ENCODER].infer(caption_feeds)[CAPTION_EMBEDDINGS]
        available = {IMAGE_EMBEDDINGS: images, CAPTION_EMBEDDINGS: captions, LENGTHS: caption_feeds[LENGTHS]}
        scorer = runners[Component.SCORER]
        scores = scorer.run({key: available[key] for key in scorer.input_names})[0]
        outputs[label] = (images, captions, scores)
    for ort_out, torch_out in zip(outputs["ort"], outputs["torch"]):
        assert max_abs_error(torch_out, ort_out) < 1e-4
    assert outputs["ort"][2].shape == (3, 4)

    for runner in (*ort.values(), *torch_runners.values()):
        with runner:
            pass  # a runner is a context manager; close() frees what it holds


def test_the_tensorrt_backend_is_a_runner() -> None:
    assert issubclass(TrtBackend, Runner) and issubclass(OrtBackend, Runner)
    assert not getattr(TrtBackend, "__abstractmethods__", None)  # every part of the interface is implemented
