"""``export_bundle``: every family end to end, the frozen threshold, manifest, errors, atomicity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import itmrt.export.bundle as bundle_module
from itmrt.bundle.check import check_bundle
from itmrt.errors import CheckpointError, ItmrtError, VocabularyError
from itmrt.export.bundle import ExportOptions, export_bundle
from itmrt.export.sample_parity import ParityResult
from itmrt.families.checkpoints import load_checkpoint
from itmrt.families.cmpm.model import CMPMModel
from itmrt.families.naaf.model import naaf_scores_loop
from itmrt.families.released import matcher_from_opt, save_native, save_released_checkpoint
from itmrt.families.scan.model import scan_scores_loop
from itmrt.text.vocab import Vocabulary
from itmrt.train.losses import triplet_loss

VOCAB = 50
REGIONS = 10
OPTIONS = ExportOptions(num_regions=REGIONS, max_batch=16, max_length=12)
THRES_SAFE = 0.1234567


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_opt(**extra: Any) -> dict[str, Any]:
    return {"vocab_size": VOCAB, "img_dim": 64, "embed_size": 32, "word_dim": 16, **extra}


MATCHER_CASES = {
    "naaf-plain-basic": ("naaf", base_opt(thres_safe=THRES_SAFE, precomp_enc_text_type="basic")),
    "naaf-glove-weight_norm": ("naaf", base_opt(thres_safe=THRES_SAFE, precomp_enc_type="weight_norm")),
    "scan-t2i": ("scan", base_opt(cross_attn="t2i", bi_gru=True)),
    "scan-i2t": ("scan", base_opt(cross_attn="i2t", agg_func="Mean", lambda_softmax=4.0)),
}


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.json"
    Vocabulary.from_words(f"word{i}" for i in range(VOCAB - 4)).to_json(path)
    return path


def trained_a_little(matcher: Any, steps: int = 10) -> None:
    """Move the encoders' weights off their initialisation with a few triplet-loss steps.

    The loss uses a cheap global score (cosine of mean region and mean real-token
    embeddings) so the steps take milliseconds; what matters here is that the
    exported weights are no longer the initialiser's.
    """
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(8, REGIONS, 64, generator=generator).abs()
    tokens = torch.randint(4, VOCAB, (8, 9), generator=generator)
    lengths = torch.tensor([9, 3, 7, 2, 5, 9, 4, 6])
    optimizer = torch.optim.Adam([p for p in matcher.parameters() if p.requires_grad], lr=1e-2)
    matcher.train()
    for _ in range(steps):
        optimizer.zero_grad()
        image_global = torch.nn.functional.normalize(matcher.encode_images(features).mean(dim=1), dim=-1)
        caption_sum = matcher.encode_captions(tokens, lengths).sum(dim=1) / lengths.unsqueeze(1)
        caption_global = torch.nn.functional.normalize(caption_sum, dim=-1)
        triplet_loss(image_global @ caption_global.t()).backward()
        optimizer.step()
    matcher.eval()


def make_matcher_checkpoint(folder: Path, case: str, trained: bool = False) -> Path:
    family, opt = MATCHER_CASES[case]
    torch.manual_seed(0)
    matcher = matcher_from_opt(opt, family)
    if trained:
        before = matcher.image_encoder.fc.bias.detach().clone()
        trained_a_little(matcher)
        assert (matcher.image_encoder.fc.bias - before).abs().max() > 1e-3
    path = folder / f"{case}.pth.tar"
    save_released_checkpoint(path, matcher)
    return path


def make_cmpm_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    model = CMPMModel(VOCAB, 16, 12, 32, width_mult=0.25, image_size=32)
    for module in model.modules():  # data-derived BatchNorm statistics, as a trained model has
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model.encode_image(torch.randn(16, 3, 32, 32))
    path = folder / "cmpm.safetensors"
    save_native(path, model.eval())
    return path


def ort_scores(bundle: Path, images: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])

    image_input = "images" if images.ndim == 4 else "region_features"
    image_emb = session("image_encoder.onnx").run(None, {image_input: images})[0]
    caption_emb = session("text_encoder.onnx").run(None, {"token_ids": tokens, "lengths": lengths})[0]
    feeds = {"image_embeddings": image_emb, "caption_embeddings": caption_emb}
    if image_input == "region_features":
        feeds["lengths"] = lengths
    return session("scorer.onnx").run(None, feeds)[0]


def mixed_batch(seed: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # one <start> <end> only: no tied captions
    lengths = np.array(
        [12, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3, 7], dtype=np.int32
    )
    tokens = np.zeros((len(lengths), 12), dtype=np.int32)
    for row, length in enumerate(lengths):
        tokens[row, 0], tokens[row, length - 1] = 1, 2
        tokens[row, 1 : length - 1] = rng.integers(4, VOCAB, length - 2)
    images = np.abs(rng.standard_normal((13, REGIONS, 64))).astype(np.float32)
    return images, tokens, lengths


def assert_top10_identical(a: np.ndarray, b: np.ndarray) -> None:
    for axis in (0, 1):
        np.testing.assert_array_equal(
            np.argsort(-a, axis=axis, kind="stable").take(np.arange(10), axis=axis),
            np.argsort(-b, axis=axis, kind="stable").take(np.arange(10), axis=axis),
        )


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("case", list(MATCHER_CASES))
def test_cross_attention_bundle_matches_literal_reference(
    tmp_path: Path, vocab_file: Path, case: str, trained: bool
) -> None:
    checkpoint = make_matcher_checkpoint(tmp_path, case, trained)
    out = tmp_path / "bundle"
    lines: list[str] = []
    manifest = export_bundle(checkpoint, vocab_file, out, OPTIONS, log=lines.append)
    assert any(line.startswith("parity (ONNX Runtime CPU vs PyTorch)") for line in lines)
    assert max(manifest["parity"]["max_abs_error"].values()) <= 1e-5
    assert manifest["parity"]["top10_identical"] is True
    assert sorted(manifest["parity"]["sample"]["lengths"]) [0] == 2

    images, tokens, lengths = mixed_batch()
    scores = ort_scores(out, images, tokens, lengths)
    model = load_checkpoint(checkpoint)
    with torch.no_grad():
        image_emb = model.encode_images(torch.from_numpy(images)).double()
        caption_emb = model.encode_captions(torch.from_numpy(tokens).long(), torch.from_numpy(lengths).long()).double()
        if model.family == "naaf":
            literal = naaf_scores_loop(image_emb, caption_emb, lengths, float(model.scorer.threshold))
        else:
            s = model.scorer
            literal = scan_scores_loop(
                image_emb, caption_emb, lengths, s.cross_attn, s.raw_feature_norm, s.agg_func, s.lambda_softmax,
                s.lambda_lse
            )
    assert np.abs(scores - literal.numpy()).max() <= 1e-5
    assert_top10_identical(scores, literal.numpy())
    assert check_bundle(out).ok


def test_cmpm_bundle(tmp_path: Path, vocab_file: Path) -> None:
    checkpoint = make_cmpm_checkpoint(tmp_path)
    manifest = export_bundle(checkpoint, vocab_file, tmp_path / "bundle", OPTIONS)
    errors = manifest["parity"]["max_abs_error"]
    assert errors["text_encoder"] <= 1e-5 and errors["scorer"] <= 1e-5
    assert errors["image_encoder"] <= 1e-4 and errors["end_to_end"] <= 2e-5  # CNN float32 rounding, see graphs test
    assert manifest["parity"]["top10_identical"] is True
    assert manifest["family"] == "cmpm" and manifest["threshold"] is None
    assert manifest["graphs"]["image_encoder"]["inputs"][0] == {
        "name": "images", "dtype": "float32", "shape": ["batch_images", 3, 32, 32]
    }
    assert check_bundle(tmp_path / "bundle").ok


def scorer_initializers(bundle: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    model = onnx.load(str(bundle / "scorer.onnx"))
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    return inits, [value.name for value in model.graph.input]


def test_threshold_is_frozen_and_can_be_overridden(tmp_path: Path, vocab_file: Path) -> None:
    checkpoint = make_matcher_checkpoint(tmp_path, "naaf-glove-weight_norm")
    frozen = export_bundle(checkpoint, vocab_file, tmp_path / "frozen", OPTIONS)
    inits, inputs = scorer_initializers(tmp_path / "frozen")
    assert inputs == ["image_embeddings", "caption_embeddings", "lengths"]
    assert inits["naaf_threshold"].dtype == np.float32 and inits["naaf_threshold"] == np.float32(THRES_SAFE)
    assert frozen["threshold"]["source"] == "checkpoint thres_safe"
    assert frozen["threshold"]["checkpoint_value"] == THRES_SAFE
    assert np.float32(frozen["threshold"]["value"]) == np.float32(THRES_SAFE)
    assert frozen["lambda_softmax"]["value"] == 20.0 and frozen["intra_factor"]["value"] == 5.0

    override = export_bundle(
        checkpoint, vocab_file, tmp_path / "override", ExportOptions(threshold=0.3, num_regions=REGIONS)
    )
    inits, _ = scorer_initializers(tmp_path / "override")
    assert inits["naaf_threshold"] == np.float32(0.3)
    assert override["threshold"]["source"] == "--threshold override"
    assert override["threshold"]["checkpoint_value"] == THRES_SAFE

    images, tokens, lengths = mixed_batch()
    at_checkpoint = ort_scores(tmp_path / "frozen", images, tokens, lengths)
    at_override = ort_scores(tmp_path / "override", images, tokens, lengths)
    assert np.abs(at_checkpoint - at_override).max() > 1e-3
    model = load_checkpoint(checkpoint)
    with torch.no_grad():
        image_emb = model.encode_images(torch.from_numpy(images))
        caption_emb = model.encode_captions(torch.from_numpy(tokens).long(), lengths.tolist())
        expected = naaf_scores_loop(image_emb.double(), caption_emb.double(), lengths, float(np.float32(0.3)))
    assert np.abs(at_override - expected.numpy()).max() <= 1e-5


def test_manifest_describes_the_bundle(tmp_path: Path, vocab_file: Path) -> None:
    checkpoint = make_matcher_checkpoint(tmp_path, "naaf-plain-basic")
    out = tmp_path / "bundle"
    export_bundle(
        checkpoint, vocab_file, out, ExportOptions(num_regions=REGIONS, opset=18, max_batch=64, max_length=40)
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["image_encoder.onnx", "text_encoder.onnx", "scorer.onnx", "vocab.json", "manifest.json"]
    )
    assert manifest["schema_version"] == 1 and manifest["family"] == "naaf" and manifest["opset"] == 18
    assert manifest["dims"] == {
        "img_dim": 64, "embed_size": 32, "word_dim": 16, "vocab_size": VOCAB, "num_regions": REGIONS,
        "num_layers": 1, "bidirectional": True,
    }
    text = manifest["graphs"]["text_encoder"]
    assert text["inputs"] == [
        {"name": "token_ids", "dtype": "int32", "shape": ["batch_captions", "max_length"]},
        {"name": "lengths", "dtype": "int32", "shape": ["batch_captions"]},
    ]
    assert text["outputs"] == [
        {"name": "caption_embeddings", "dtype": "float32", "shape": ["batch_captions", "max_length", 32]}
    ]
    assert text["shape_ranges"] == {
        "batch_captions": {"min": 1, "opt": 32, "max": 64},
        "max_length": {"min": 1, "opt": 20, "max": 40},
    }
    assert manifest["graphs"]["scorer"]["outputs"][0]["shape"] == ["batch_images", "batch_captions"]
    assert manifest["graphs"]["image_encoder"]["shape_ranges"]["num_regions"] == {
        "min": REGIONS, "opt": REGIONS, "max": REGIONS
    }
    assert set(manifest["files"]) == {"image_encoder.onnx", "text_encoder.onnx", "scorer.onnx", "vocab.json"}
    assert manifest["vocab"]["size"] == VOCAB and manifest["vocab"]["pad_id"] == 0
    assert set(manifest["versions"]) >= {"itmrt", "torch", "onnx", "onnxruntime"}
    import hashlib

    assert manifest["source_checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert onnx.load(str(out / "scorer.onnx")).opset_import[0].version == 18


def test_check_bundle_detects_tampering(tmp_path: Path, vocab_file: Path) -> None:
    checkpoint = make_matcher_checkpoint(tmp_path, "scan-t2i")
    out = tmp_path / "bundle"
    export_bundle(checkpoint, vocab_file, out, OPTIONS)
    assert check_bundle(out).ok
    with open(out / "vocab.json", "a", encoding="utf-8") as handle:
        handle.write(" ")
    result = check_bundle(out)
    assert result.problems == [
        "file 'vocab.json': sha256 differs from the manifest (the file was changed after export)"
    ]
    (out / "manifest.json").unlink()
    with pytest.raises(ItmrtError, match="has no manifest.json"):
        check_bundle(out)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_wrong_vocabulary_size_is_one_line_error(tmp_path: Path) -> None:
    checkpoint = make_matcher_checkpoint(tmp_path, "naaf-plain-basic")
    small = tmp_path / "small_vocab.json"
    Vocabulary.from_words(["a", "b"]).to_json(small)
    with pytest.raises(VocabularyError) as exc:
        export_bundle(checkpoint, small, tmp_path / "bundle", OPTIONS)
    assert "has 6 words but the checkpoint's embedding has 50 rows" in one_line(exc)
    assert not (tmp_path / "bundle").exists()


def test_missing_files_are_one_line_errors(tmp_path: Path, vocab_file: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        export_bundle(tmp_path / "nope.pth.tar", vocab_file, tmp_path / "bundle", OPTIONS)
    assert "nope.pth.tar does not exist" in one_line(exc)
    checkpoint = make_matcher_checkpoint(tmp_path, "scan-i2t")
    with pytest.raises(VocabularyError) as exc:
        export_bundle(checkpoint, tmp_path / "nope.json", tmp_path / "bundle", OPTIONS)
    assert "nope.json does not exist" in one_line(exc)
    with pytest.raises(ItmrtError) as exc:
        export_bundle(checkpoint, vocab_file, tmp_path / "bundle", ExportOptions(threshold=0.3, num_regions=REGIONS))
    assert "--threshold applies to NAAF models only" in one_line(exc)


def test_existing_target_folder(tmp_path: Path, vocab_file: Path) -> None:
    naaf = make_matcher_checkpoint(tmp_path, "naaf-plain-basic")
    scan = make_matcher_checkpoint(tmp_path, "scan-t2i")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ItmrtError) as exc:
            export_bundle(naaf, vocab_file, other, ExportOptions(num_regions=REGIONS, overwrite=overwrite))
        assert "non-empty folder that is not an itmrt bundle" in one_line(exc)
    assert (other / "notes.txt").read_text() == "keep me"

    out = tmp_path / "bundle"
    export_bundle(naaf, vocab_file, out, OPTIONS)
    with pytest.raises(ItmrtError) as exc:
        export_bundle(scan, vocab_file, out, OPTIONS)
    assert "already holds a bundle; pass --overwrite" in one_line(exc)
    assert json.loads((out / "manifest.json").read_text())["family"] == "naaf"
    export_bundle(
        scan, vocab_file, out, ExportOptions(num_regions=REGIONS, max_batch=16, max_length=12, overwrite=True)
    )
    assert json.loads((out / "manifest.json").read_text())["family"] == "scan"
    assert check_bundle(out).ok
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or retired folders left

    empty = tmp_path / "empty"
    empty.mkdir()
    export_bundle(naaf, vocab_file, empty, OPTIONS)
    assert (empty / "manifest.json").is_file()


def test_failed_parity_leaves_no_bundle(tmp_path: Path, vocab_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = make_matcher_checkpoint(tmp_path, "naaf-plain-basic")
    real_check = bundle_module.check_parity

    def off_by_a_lot(*args: Any, **kwargs: Any) -> ParityResult:
        result = real_check(*args, **kwargs)
        result.max_abs_error["scorer"] = 0.5
        return result

    monkeypatch.setattr(bundle_module, "check_parity", off_by_a_lot)
    with pytest.raises(ItmrtError) as exc:
        export_bundle(checkpoint, vocab_file, tmp_path / "bundle", OPTIONS)
    assert "parity check failed: scorer differs from PyTorch by 0.5 > tolerance 0.0001" in one_line(exc)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name]


def test_interrupted_write_leaves_nothing_complete(
    tmp_path: Path, vocab_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = make_matcher_checkpoint(tmp_path, "naaf-plain-basic")

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(checkpoint, vocab_file, tmp_path / "bundle", OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name]
