"""Released-layout and native checkpoints: round trips, safe unpickling, one-line errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from itmrt import __version__
from itmrt.errors import CheckpointError
from itmrt.families.checkpoints import load_checkpoint, load_native
from itmrt.families.cmpm.model import CMPMModel
from itmrt.families.matcher import CrossAttentionMatcher
from itmrt.families.released import (
    checkpoint_sha256,
    detect_format,
    load_released_checkpoint,
    matcher_from_opt,
    save_native,
    save_released_checkpoint,
)

VOCAB = 30
IMG_DIM = 12
EMBED = 8


def naaf_opt() -> dict[str, Any]:
    return {
        "data_name": "f30k_precomp", "vocab_size": VOCAB, "img_dim": IMG_DIM, "embed_size": EMBED, "word_dim": 6,
        "num_layers": 1, "precomp_enc_type": "weight_norm", "precomp_enc_text_type": "GloVe",
        "no_imgnorm": False, "no_txtnorm": False, "lambda_softmax": 20.0, "thres": 0.05, "thres_safe": 0.1,
        "alpha": 2.0, "margin": 0.2,
    }


def scan_opt() -> dict[str, Any]:
    return {
        "data_name": "f30k_precomp", "vocab_size": VOCAB, "img_dim": IMG_DIM, "embed_size": EMBED, "word_dim": 6,
        "num_layers": 1, "precomp_enc_type": "basic", "no_imgnorm": False, "no_txtnorm": False, "bi_gru": True,
        "cross_attn": "t2i", "raw_feature_norm": "clipped_l2norm", "agg_func": "LogSumExp",
        "lambda_softmax": 9.0, "lambda_lse": 6.0,
    }


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(3, 5, IMG_DIM, generator=generator)
    tokens = torch.randint(1, VOCAB, (4, 7), generator=generator)
    lengths = torch.tensor([7, 5, 3, 2])
    return features, tokens, lengths


def scores_of(model: CrossAttentionMatcher) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*inputs())


def fresh(opt: dict[str, Any], seed: int = 0) -> CrossAttentionMatcher:
    torch.manual_seed(seed)
    return matcher_from_opt(opt).eval()


def released_content(matcher: CrossAttentionMatcher, opt: Any) -> dict[str, Any]:
    state = [OrderedDict(matcher.image_encoder.state_dict()), OrderedDict(matcher.text_encoder.state_dict())]
    return {"epoch": 3, "model": state, "best_rsum": 101.5, "opt": opt, "Eiters": 900}


def assert_one_line(error: pytest.ExceptionInfo[CheckpointError]) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize(
    ("opt", "family", "image_keys", "text_key"),
    [
        (naaf_opt(), "naaf", {"fc.weight_g", "fc.weight_v", "fc.bias"}, "embed.glove.weight"),
        (scan_opt(), "scan", {"fc.weight", "fc.bias"}, "embed.weight"),
    ],
    ids=["naaf-glove-weight_norm", "scan-plain-basic"],
)
def test_released_round_trip_scores_identically(
    tmp_path: Path, opt: dict[str, Any], family: str, image_keys: set[str], text_key: str
) -> None:
    source = fresh(opt)
    path = tmp_path / "model_best.pth.tar"
    save_released_checkpoint(path, source, epoch=4, best_rsum=300.0, eiters=1234)

    raw = torch.load(path, map_location="cpu", weights_only=False)  # our own file: inspect the layout
    assert set(raw) == {"epoch", "model", "best_rsum", "opt", "Eiters"}
    assert isinstance(raw["opt"], argparse.Namespace)
    assert set(raw["model"][0]) == image_keys
    assert text_key in raw["model"][1] and "rnn.weight_ih_l0" in raw["model"][1]

    loaded = load_released_checkpoint(path)
    assert loaded.family == family
    assert loaded.checkpoint_info == {"epoch": 4, "best_rsum": 300.0, "Eiters": 1234}
    assert loaded.text_encoder.embedding_layout == ("glove" if family == "naaf" else "plain")
    assert loaded.image_encoder.precomp_enc_type == opt["precomp_enc_type"]
    expected = scores_of(source)
    torch.testing.assert_close(scores_of(loaded), expected, rtol=0, atol=0)
    torch.testing.assert_close(scores_of(load_checkpoint(path)), expected, rtol=0, atol=0)
    # A different model really scores differently (the comparison above can fail).
    assert not torch.allclose(scores_of(fresh(opt, seed=1)), expected)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_hand_written_released_checkpoint_with_real_namespace(tmp_path: Path, zip_format: bool) -> None:
    source = fresh(naaf_opt())
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_name", default="f30k_precomp")
    parser.add_argument("--embed_size", type=int, default=1024)
    parser.add_argument("--word_dim", type=int, default=300)
    parser.add_argument("--img_dim", type=int, default=2048)
    parser.add_argument("--precomp_enc_type", default="basic")
    parser.add_argument("--lambda_softmax", type=float, default=20.0)
    parser.add_argument("--thres_safe", type=float, default=0.0)
    parser.add_argument("--no_imgnorm", action="store_true")
    # No vocab_size and no precomp_enc_text_type: both are read from the weights.
    opt = parser.parse_args(
        ["--embed_size", str(EMBED), "--word_dim", "6", "--img_dim", str(IMG_DIM),
         "--precomp_enc_type", "weight_norm", "--thres_safe", "0.1"]
    )
    path = tmp_path / "checkpoint_3.pth.tar"
    torch.save(released_content(source, opt), path, _use_new_zipfile_serialization=zip_format)
    assert detect_format(path) == "torch"

    loaded = load_checkpoint(path)
    assert isinstance(loaded, CrossAttentionMatcher)
    assert loaded.opt["vocab_size"] == VOCAB
    assert loaded.opt["precomp_enc_text_type"] == "GloVe"
    assert "num_layers" in loaded.defaulted_options and "lambda_softmax" not in loaded.defaulted_options
    torch.testing.assert_close(scores_of(loaded), scores_of(source), rtol=0, atol=0)


class _TouchOnUnpickle:
    """A pickle payload: unpickling it runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("where", ["opt", "state_dict"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, where: str) -> None:
    source = fresh(scan_opt())
    marker = tmp_path / "pwned"
    content = released_content(source, argparse.Namespace(**scan_opt()))
    if where == "opt":
        content["opt"] = _TouchOnUnpickle(marker)
    else:
        content["model"][1]["embed.weight"] = _TouchOnUnpickle(marker)
    path = tmp_path / "evil.pth.tar"
    torch.save(content, path)

    with pytest.raises(CheckpointError) as error:
        load_released_checkpoint(path)
    message = assert_one_line(error)
    assert "system" in message and "does not load" in message
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()

    # The payload is real: an unsafe load does run it.
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    source = fresh(scan_opt())
    content = released_content(source, argparse.Namespace(**scan_opt()))
    del content["model"][0]["fc.bias"]
    del content["model"][1]["rnn.bias_hh_l0_reverse"]
    for index in range(6):
        content["model"][1][f"extra.k{index}"] = torch.zeros(1)
    path = tmp_path / "broken.pth.tar"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as error:
        load_released_checkpoint(path)
    message = assert_one_line(error)
    assert "missing key in the image encoder: fc.bias" in message
    assert "missing key in the text encoder: rnn.bias_hh_l0_reverse" in message
    assert "unexpected keys in the text encoder: extra.k0, extra.k1, extra.k2, extra.k3 and 2 more" in message


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    source = fresh(naaf_opt())
    content = released_content(source, argparse.Namespace(**naaf_opt()))
    content["model"][0]["fc.weight_v"] = torch.zeros(EMBED, IMG_DIM - 1)
    path = tmp_path / "misshapen.pth.tar"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as error:
        load_released_checkpoint(path)
    message = assert_one_line(error)
    assert f"fc.weight_v is [{EMBED}, {IMG_DIM - 1}] but the model expects [{EMBED}, {IMG_DIM}]" in message


def test_old_pytorch_weight_g_shape_is_accepted(tmp_path: Path) -> None:
    source = fresh(naaf_opt())
    content = released_content(source, argparse.Namespace(**naaf_opt()))
    content["model"][0]["fc.weight_g"] = content["model"][0]["fc.weight_g"].reshape(1)
    path = tmp_path / "old.pth.tar"
    torch.save(content, path)
    torch.testing.assert_close(scores_of(load_released_checkpoint(path)), scores_of(source), rtol=0, atol=0)


def test_family_detection_and_override(tmp_path: Path) -> None:
    opt = {key: value for key, value in scan_opt().items() if key != "cross_attn"}
    path = tmp_path / "anonymous.pth.tar"
    torch.save(released_content(fresh(scan_opt()), argparse.Namespace(**opt)), path)
    with pytest.raises(CheckpointError) as error:
        load_released_checkpoint(path)
    assert "family='scan'" in assert_one_line(error)
    loaded = load_released_checkpoint(path, family="scan")
    assert loaded.family == "scan" and loaded.opt["cross_attn"] == "t2i"
    assert "cross_attn" in loaded.defaulted_options


def test_bad_files_give_one_line_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.pth.tar"
    save_released_checkpoint(good, fresh(scan_opt()))
    legacy = tmp_path / "legacy.pth"
    torch.save({"opt": argparse.Namespace(a=1), "x": torch.ones(50)}, legacy, _use_new_zipfile_serialization=False)
    native = tmp_path / "good.safetensors"
    save_native(native, fresh(naaf_opt()))
    cases: dict[str, Path] = {"missing": tmp_path / "nope.pth.tar", "folder": tmp_path}
    for name, data in {
        "empty": b"",
        "text": b"this is not a checkpoint\n",
        "truncated_zip": good.read_bytes()[: good.stat().st_size // 2],
        "truncated_legacy": legacy.read_bytes()[: legacy.stat().st_size // 2],
        "truncated_native": native.read_bytes()[: native.stat().st_size // 2],
    }.items():
        cases[name] = tmp_path / f"{name}.bin"
        cases[name].write_bytes(data)
    not_released = tmp_path / "plain_state.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, not_released)
    cases["no_model_entry"] = not_released
    for name, path in cases.items():
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        message = assert_one_line(error)
        assert str(path) in message, name
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_checkpoint(not_released)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cases["truncated_zip"])


@pytest.mark.parametrize("opt", [naaf_opt(), scan_opt()], ids=["naaf", "scan"])
def test_native_round_trip_matcher(tmp_path: Path, opt: dict[str, Any]) -> None:
    source = fresh(opt)
    path = tmp_path / "model.safetensors"
    save_native(path, source)
    assert detect_format(path) == "safetensors"
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    metadata = header["__metadata__"]
    assert metadata["family"] == source.family and metadata["itmrt_version"] == __version__
    assert json.loads(metadata["config"]) == source.opt
    loaded = load_checkpoint(path)
    assert isinstance(loaded, CrossAttentionMatcher) and loaded.opt == source.opt
    torch.testing.assert_close(scores_of(loaded), scores_of(source), rtol=0, atol=0)
    # The content decides, not the file name.
    renamed = tmp_path / "model.pth.tar"
    renamed.write_bytes(path.read_bytes())
    torch.testing.assert_close(scores_of(load_checkpoint(renamed)), scores_of(source), rtol=0, atol=0)


def test_native_round_trip_cmpm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = CMPMModel(vocab_size=40, word_dim=8, lstm_hidden=16, embed_size=12, width_mult=0.25, image_size=64)
    # Give BatchNorm non-trivial running statistics so they are part of what must round-trip.
    source.train()
    with torch.no_grad():
        source.encode_image(torch.randn(4, 3, 64, 64))
    source.eval()
    path = tmp_path / "cmpm.safetensors"
    save_native(path, source)
    loaded = load_native(path)
    assert isinstance(loaded, CMPMModel) and loaded.config == source.config
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    tokens = torch.randint(1, 40, (3, 6), generator=generator)
    lengths = [6, 4, 2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, tokens, lengths), source(images, tokens, lengths), rtol=0, atol=0)


def test_foreign_safetensors_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="not an itmrt checkpoint"):
        load_checkpoint(path)


def test_checkpoint_sha256(tmp_path: Path) -> None:
    path = tmp_path / "m.pth.tar"
    save_released_checkpoint(path, fresh(scan_opt()))
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError):
        checkpoint_sha256(tmp_path / "absent")


def test_numpy_scalars_in_a_released_checkpoint_load_as_python_numbers(tmp_path: Path) -> None:
    import numpy as np

    source = fresh(naaf_opt())
    opt = argparse.Namespace(**{**naaf_opt(), "thres_safe": np.float64(0.1), "embed_size": np.int64(EMBED)})
    content = released_content(source, opt)
    content["best_rsum"] = np.float64(412.5)
    path = tmp_path / "numpy.pth.tar"
    torch.save(content, path)
    loaded = load_released_checkpoint(path)
    assert type(loaded.opt["thres_safe"]) is float and type(loaded.opt["embed_size"]) is int
    assert loaded.checkpoint_info["best_rsum"] == 412.5
    torch.testing.assert_close(scores_of(loaded), scores_of(source), rtol=0, atol=0)
    save_native(tmp_path / "again.safetensors", loaded)  # plain options serialise to JSON


def test_released_option_rules() -> None:
    # NAAF's GloVe text encoder always normalises (the released code ignores no_txtnorm there).
    glove = matcher_from_opt({**naaf_opt(), "no_txtnorm": True})
    plain = matcher_from_opt({**naaf_opt(), "no_txtnorm": True, "precomp_enc_text_type": "basic"})
    assert glove.text_encoder.no_txtnorm is False and glove.text_encoder.embedding_layout == "glove"
    assert plain.text_encoder.no_txtnorm is True and plain.text_encoder.embedding_layout == "plain"
    assert glove.text_encoder.bidirectional and plain.text_encoder.bidirectional
    # SCAN: unidirectional unless bi_gru, plain embedding, released defaults filled in.
    scan = matcher_from_opt({"vocab_size": VOCAB, "cross_attn": "i2t", "embed_size": EMBED, "img_dim": IMG_DIM})
    assert scan.family == "scan" and not scan.text_encoder.bidirectional
    assert scan.opt["lambda_softmax"] == 9.0 and scan.opt["agg_func"] == "LogSumExp"
    assert scan.text_encoder.embedding_layout == "plain"
    with pytest.raises(CheckpointError, match="vocab_size"):
        matcher_from_opt({"thres_safe": 0.1})
