"""``itmrt parity`` on a CMPM bundle (global embeddings, images in pixels): the shipped model's graphs against its
PyTorch reference and against the bundle's own fp32 graphs, recall matched by identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from itmrt.data.images import ImageCaptionSplit  # noqa: E402
from itmrt.metrics.recall import identity_recall_table
from itmrt.reports.parity_report import ParityOptions, run_parity  # noqa: E402
from itmrt.reports.runtime_variants import parse_variants  # noqa: E402
from itmrt.synthetic.identity_images import make_synthetic_image_dataset  # noqa: E402

from cli_helpers import run_cli  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "itmrt" / "assets"

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not (ASSETS / "cmpm_small.safetensors").is_file(), reason="no shipped CMPM in itmrt/assets"),
]


@pytest.fixture(scope="module")
def cmpm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from itmrt.export.bundle import ExportOptions, export_bundle

    folder = tmp_path_factory.mktemp("cmpm_parity")
    data = make_synthetic_image_dataset(folder / "data", {"test": 16}, seed=7, image_size=64)
    bundle = folder / "bundle"
    export_bundle(ASSETS / "cmpm_small.safetensors", data / "vocab.json", bundle,
                  ExportOptions(max_batch=32, max_length=24))
    return bundle, data


def test_a_cmpm_bundle_gets_a_parity_report_against_pytorch(cmpm: tuple[Path, Path]) -> None:
    bundle, data = cmpm
    run = run_parity(bundle, data, ParityOptions(against="torch", variants=parse_variants("ort:fp32"), threads=1))
    entry = run.report["variants"][0]
    assert run.report["bundle"]["family"] == "cmpm" and run.report["reference"]["against"] == "torch"
    assert entry["status"] == "ok" and entry["passed"], entry.get("checks")
    assert entry["tensors"]["end_to_end"]["max_abs"] <= 1e-4 and entry["decisions"] is None
    split = ImageCaptionSplit.open(data, "test")
    reference = run.matrices["scores_reference.npy"]
    assert reference.shape == (split.num_images, len(split.captions))
    expected = identity_recall_table(reference, split.image_labels, split.caption_labels)
    assert run.report["reference"]["recall"] == expected and expected["rsum"] > 300  # the shipped model is trained
    got = identity_recall_table(run.matrices[entry["scores_file"]], split.image_labels, split.caption_labels)
    assert entry["recall"] == got


def test_itmrt_parity_no_longer_refuses_a_cmpm_bundle(cmpm: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bundle, data = cmpm
    result = run_cli(capsys, "parity", str(bundle), "--data", str(data), "--against", "ort:fp32", "--variants",
                     "ort:fp32", "--max-images", "8", "--no-plots", "--no-progress", "--report", str(tmp_path / "r"))
    assert result.code == 0, result.err
    assert "ort:fp32: pass" in result.out
    assert np.load(tmp_path / "r" / "scores_reference.npy").shape[0] == 8
