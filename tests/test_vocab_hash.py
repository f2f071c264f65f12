"""A model itmrt trains records its vocabulary's hash; export and evaluation refuse another vocabulary for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itmrt.errors import VocabularyError
from itmrt.export.bundle import ExportOptions, export_bundle
from itmrt.families.checkpoints import load_checkpoint
from itmrt.families.released import load_released_checkpoint, save_released_checkpoint
from itmrt.models.native import VOCAB_SHA256, recorded_vocab_sha256, save_native
from itmrt.synthetic.region_features import make_synthetic_dataset
from itmrt.text.vocab import Vocabulary
from itmrt.train.trainer import TrainConfig, train

from cli_helpers import run_cli

SMALL_EXPORT = ExportOptions(max_batch=8, max_length=16, parity_batch_images=3, parity_batch_captions=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, vocabulary) of a one-epoch NAAF trained on tiny synthetic data."""
    root = tmp_path_factory.mktemp("vocab-hash")
    data = make_synthetic_dataset(root / "data", {"train": 16, "dev": 4}, seed=2, img_dim=16)
    config = TrainConfig(family="naaf", data_dir=str(data), out_dir=str(root / "run"), epochs=1, batch_size=8,
                         embed_size=8, word_dim=4, max_val_images=4, seed=3)
    return train(config, log=lambda _m: None).last_checkpoint, data / "vocab.json"


def _shuffled(vocab: Path, out: Path) -> Path:
    """The same words with two ordinary words' indices swapped: the same size, another vocabulary."""
    word2idx = json.loads(vocab.read_text())["word2idx"]
    first, second = sorted((w for w in word2idx if not w.startswith("<")), key=word2idx.get)[:2]
    word2idx[first], word2idx[second] = word2idx[second], word2idx[first]
    out.write_text(json.dumps({"word2idx": word2idx}))
    return out


def test_training_records_the_vocabulary_hash(trained: tuple[Path, Path]) -> None:
    checkpoint, vocab = trained
    model = load_released_checkpoint(checkpoint)
    assert model.opt[VOCAB_SHA256] == Vocabulary.from_json(vocab).sha256
    assert recorded_vocab_sha256(model) == Vocabulary.from_json(vocab).sha256


def test_export_refuses_another_vocabulary_of_the_same_size(trained: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, vocab = trained
    with pytest.raises(VocabularyError, match="not the vocabulary the model was trained with"):
        export_bundle(checkpoint, _shuffled(vocab, tmp_path / "shuffled.json"), tmp_path / "bundle", SMALL_EXPORT)
    assert not (tmp_path / "bundle").exists()
    said: list[str] = []
    export_bundle(checkpoint, vocab, tmp_path / "bundle", SMALL_EXPORT, log=said.append)
    assert "the vocabulary matches the hash recorded in the checkpoint" in said


def test_cli_export_refuses_it_in_one_line(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    checkpoint, vocab = trained
    shuffled = _shuffled(vocab, tmp_path / "shuffled.json")
    result = run_cli(capsys, "export", str(checkpoint), "--vocab", str(shuffled), "--out", str(tmp_path / "b"))
    err = result.err
    assert result.code == 2 and err.startswith("error: vocabulary ") and "trained with" in err
    assert len(err.splitlines()) == 1


def test_a_checkpoint_without_a_hash_says_the_vocabulary_cannot_be_checked(trained: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    checkpoint, vocab = trained
    model = load_released_checkpoint(checkpoint)
    del model.opt[VOCAB_SHA256]  # as the authors' released checkpoints are
    released = save_released_checkpoint(tmp_path / "released.pth.tar", model)
    said: list[str] = []
    export_bundle(released, _shuffled(vocab, tmp_path / "shuffled.json"), tmp_path / "bundle", SMALL_EXPORT,
                  log=said.append)
    assert any("cannot be checked" in line for line in said)


def test_native_checkpoints_keep_the_hash(trained: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, vocab = trained
    native = save_native(tmp_path / "model.safetensors", load_released_checkpoint(checkpoint))
    assert recorded_vocab_sha256(load_checkpoint(native)) == Vocabulary.from_json(vocab).sha256
    with pytest.raises(VocabularyError, match="trained with"):
        export_bundle(native, _shuffled(vocab, tmp_path / "shuffled.json"), tmp_path / "bundle", SMALL_EXPORT)


def test_eval_refuses_another_vocabulary_too(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    checkpoint, vocab = trained
    args = [str(checkpoint), "--data", str(vocab.parent), "--split", "dev", "--no-progress"]
    shuffled = run_cli(capsys, "eval", *args, "--vocab", str(_shuffled(vocab, tmp_path / "shuffled.json")))
    assert shuffled.code == 2 and "not the vocabulary the model was trained with" in shuffled.err
    assert run_cli(capsys, "eval", *args, "--vocab", str(vocab)).code == 0
