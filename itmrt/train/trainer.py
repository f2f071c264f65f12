"""A small trainer for NAAF and SCAN on precomputed region features.

It trains what itmrt deploys, so that reduced precision is measured on weights
with real margins. Checkpoints are written in the authors' released layout
(``model`` = [image state dict, text state dict], ``opt`` = an
``argparse.Namespace``), so ``itmrt export`` reads a model trained here exactly
as it reads one trained with the authors' code. The learned ``thres`` and
``thres_safe`` live in ``opt``.

Files in the output folder:

- ``checkpoint_last.pth.tar``: the latest epoch, plus ``optimizer`` and
  ``threshold_trajectory`` (plain tensors and numbers, loadable with
  ``weights_only=True``), used by ``resume``;
- ``model_best.pth.tar``: the epoch with the best validation rsum;
- ``history.json``: loss, thresholds and validation recall per epoch;
- ``thresholds.png``: NAAF's threshold trajectory (the seed's plot).

Batches are drawn by a generator seeded with ``seed + epoch``, so a run resumed
after epoch k trains epoch k+1 exactly as the uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmrt.data.precomp import PrecompSplit
from itmrt.errors import DataError, ItmrtError
from itmrt.families import get, names
from itmrt.families.cross_attention import CrossAttentionFamily
from itmrt.families.matcher import CrossAttentionMatcher
from itmrt.families.naaf.threshold import ThresholdLearner, ThresholdRecord, plot_trajectory
from itmrt.families.released import load_released_checkpoint, save_released_checkpoint
from itmrt.metrics.recall import recall_table
from itmrt.models.evaluate import check_vocabulary, encode_captions, encode_images, score_matrix
from itmrt.models.native import VOCAB_SHA256
from itmrt.models.training_loop import EpochLoop, TokenisedCaptions
from itmrt.publish import atomic_write_text, check_empty_folder
from itmrt.text.vocab import Vocabulary
from itmrt.train.losses import triplet_loss

LAST_CHECKPOINT = "checkpoint_last.pth.tar"
BEST_CHECKPOINT = "model_best.pth.tar"

ProgressFn = Callable[[int], None]


@dataclass
class TrainConfig:
    """Options of a NAAF or SCAN training run (names follow the released scripts where they exist)."""

    family: str = "naaf"
    data_dir: str = ""
    out_dir: str = ""
    vocab: str | None = None  # default: DATA/vocab.json
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 5e-4
    lr_decay_epoch: int | None = None  # multiply the rate by 0.1 from this epoch on
    margin: float = 0.2
    max_violation: bool = True
    warmup_epochs: int = 1  # epochs that sum over all negatives before hardest-negative mining starts
    grad_clip: float = 2.0
    embed_size: int = 256
    word_dim: int = 128
    num_layers: int = 1
    bi_gru: bool = True
    precomp_enc_type: str = "basic"
    lambda_softmax: float | None = None  # 20 for NAAF, 9 for SCAN
    alpha: float = 2.0
    cross_attn: str = "t2i"
    raw_feature_norm: str = "clipped_l2norm"
    agg_func: str = "LogSumExp"
    lambda_lse: float = 6.0
    val_split: str = "dev"
    max_val_images: int = 200
    seed: int = 0
    device: str = "cpu"

    def model_options(self, img_dim: int, vocab_size: int, data_name: str,
                      vocab_sha256: str | None = None) -> dict[str, Any]:
        """The ``opt`` a released checkpoint of this family carries (and the vocabulary's hash, when given)."""
        opt: dict[str, Any] = {
            "data_name": data_name,
            "img_dim": img_dim,
            "vocab_size": vocab_size,
            "embed_size": self.embed_size,
            "word_dim": self.word_dim,
            "num_layers": self.num_layers,
            "precomp_enc_type": self.precomp_enc_type,
            "precomp_enc_text_type": "basic",  # trainable embedding: no GloVe table here
            "no_imgnorm": False,
            "no_txtnorm": False,
            "margin": self.margin,
            "max_violation": self.max_violation,
            "grad_clip": self.grad_clip,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "num_epochs": self.epochs,
        }
        if self.lr_decay_epoch is not None:
            opt["lr_update"] = self.lr_decay_epoch  # the released name: the rate drops 10x from this epoch
        if vocab_sha256 is not None:
            opt[VOCAB_SHA256] = vocab_sha256  # export and evaluation refuse any other vocabulary for this model
        opt.update(_cross_attention_family(self.family).training_options(self))
        return opt


def _cross_attention_family(name: str) -> CrossAttentionFamily:
    """The spec of a family this trainer trains (region features, a cross-attention matcher)."""
    spec = get(name)
    if not isinstance(spec, CrossAttentionFamily):
        trained = [n for n in names() if isinstance(get(n), CrossAttentionFamily)]
        raise ItmrtError(f"this trainer trains {', '.join(trained)} (region features), not {name!r}; "
                         "CMPM trains with itmrt.families.cmpm.trainer")
    return spec


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    seconds: float
    thres: float | None
    thres_safe: float | None
    recall: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    out_dir: Path
    best_rsum: float
    history: list[EpochRecord]
    last_checkpoint: Path
    best_checkpoint: Path


MAX_UNKNOWN_FRACTION = 0.5


def _check_data(split: PrecompSplit, vocab: Vocabulary, model: CrossAttentionMatcher) -> None:
    """The data of a resumed run must fit the model being resumed."""
    if split.img_dim != model.image_encoder.img_dim:
        raise DataError(
            f"{split.images_path} has {split.img_dim}-d region features but the model being resumed expects "
            f"{model.image_encoder.img_dim}; train on the data it was started on or start a new run"
        )
    vocab.check_fits(model.text_encoder.vocab_size, "the vocabulary", "the embedding of the model being resumed",
                     "use the vocabulary the run was started with")
    check_vocabulary(model, vocab, "the vocabulary")


def _word_maxima(image_emb: torch.Tensor, caption_emb: torch.Tensor) -> torch.Tensor:
    """``[Bi, Bc, L]``: each word's best raw similarity over each image's regions."""
    sims = torch.matmul(caption_emb.unsqueeze(0), image_emb.unsqueeze(1).transpose(-1, -2))
    return sims.amax(dim=-1)


@torch.no_grad()
def validate(model: CrossAttentionMatcher, vocab: Vocabulary, split: PrecompSplit, max_images: int,
             device: torch.device) -> dict[str, float]:
    """Recall table on the first ``max_images`` images of ``split`` (test-time scoring)."""
    model.eval()
    n_img = min(max_images, split.num_images)
    cpi = split.captions_per_image
    cpu_model = model.to("cpu")
    img = encode_images(cpu_model, split.images[:n_img])
    caps = encode_captions(cpu_model, vocab, split.captions[: n_img * cpi])
    scores = score_matrix(cpu_model, img, caps)
    model.to(device)
    return recall_table(scores, captions_per_image=cpi)


class _ThresholdLearning:
    """A family that learns its threshold (NAAF): updates after each step, copied into the model after each epoch."""

    def __init__(self, learner: ThresholdLearner) -> None:
        self.learner = learner

    @property
    def threshold(self) -> float:
        return float(self.learner.thres)

    def after_step(self, scores: torch.Tensor, image_emb: torch.Tensor, caption_emb: torch.Tensor,
                   lengths: torch.Tensor, step: int) -> None:
        self.learner.update_from_batch(scores.detach(), _word_maxima(image_emb.detach(), caption_emb.detach()),
                                       lengths, step=step)

    def end_epoch(self, model: CrossAttentionMatcher) -> tuple[float | None, float | None, str]:
        """Copy the learned values into the model; return them and their log text."""
        learner = self.learner
        model.opt["thres"] = float(learner.thres)
        model.opt["thres_safe"] = float(learner.thres_safe)
        threshold = model.scorer.threshold
        assert isinstance(threshold, torch.Tensor)  # a NAAFScorer buffer
        threshold.fill_(float(learner.thres_safe))
        return learner.thres, learner.thres_safe, f" thres={learner.thres:.4f} thres_safe={learner.thres_safe:.4f}"

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"threshold_trajectory": [list(map(float, r)) for r in self.learner.trajectory]}

    def plot(self, out_dir: Path) -> None:
        if self.learner.trajectory:
            plot_trajectory(self.learner.trajectory, out_dir / "thresholds.png")


class _NoThreshold:
    """A family without a learned threshold (SCAN)."""

    threshold = 0.0

    def after_step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def end_epoch(self, model: CrossAttentionMatcher) -> tuple[float | None, float | None, str]:
        return None, None, ""

    def checkpoint_extra(self) -> dict[str, Any]:
        return {}

    def plot(self, out_dir: Path) -> None:
        pass


@dataclass
class _Run:
    """Everything a run trains with, whether new or resumed."""

    config: TrainConfig
    family: CrossAttentionFamily
    model: CrossAttentionMatcher
    vocab: Vocabulary
    train_split: PrecompSplit
    val_split: PrecompSplit
    device: torch.device
    threshold: _ThresholdLearning | _NoThreshold
    start_epoch: int = 0
    best_rsum: float = -math.inf
    eiters: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None


def _open_splits(config: TrainConfig) -> tuple[Vocabulary, PrecompSplit, PrecompSplit]:
    data_dir = Path(config.data_dir)
    vocab_path = Path(config.vocab) if config.vocab else data_dir / "vocab.json"
    if not vocab_path.is_file():
        raise DataError(f"vocabulary {vocab_path} not found; pass --vocab or put vocab.json in the data folder")
    train_split = PrecompSplit.open(data_dir, "train")
    val_split = PrecompSplit.open(data_dir, config.val_split)
    if val_split.img_dim != train_split.img_dim:
        raise DataError(
            f"{config.val_split} features are {val_split.img_dim}-d but train features are {train_split.img_dim}-d"
        )
    return Vocabulary.from_json(vocab_path), train_split, val_split


def _resumed_run(run: _Run, last_path: Path, log: Callable[[str], None]) -> _Run:
    config, out_dir = run.config, Path(run.config.out_dir)
    if run.model.family != config.family:
        raise ItmrtError(f"{last_path} holds a {run.model.family} model, not {config.family}; use another --out")
    _check_data(run.train_split, run.vocab, run.model)
    content = _load_resume_state(last_path)
    run.start_epoch = int(content["epoch"]) + 1
    run.best_rsum = float(content["best_rsum"])
    run.eiters = int(content["Eiters"])
    run.optimizer_state = content.get("optimizer")
    history_file = out_dir / "history.json"
    run.history = [EpochRecord(**record) for record in json.loads(history_file.read_text())] \
        if history_file.is_file() else []
    if run.family.learns_threshold:
        learner = ThresholdLearner(run.model.opt["thres"], run.model.opt["thres_safe"], alpha=config.alpha)
        learner.trajectory = [ThresholdRecord(*row) for row in content.get("threshold_trajectory", [])]
        run.threshold = _ThresholdLearning(learner)
    log(f"resuming {config.family} from {last_path} after epoch {run.start_epoch - 1}")
    return run


def _prepare_run(config: TrainConfig, resume: bool, log: Callable[[str], None]) -> _Run:
    """A new run (seeded model from the family's options) or the one in ``out_dir`` resumed."""
    family = _cross_attention_family(config.family)
    vocab, train_split, val_split = _open_splits(config)
    out_dir = Path(config.out_dir)
    last_path = out_dir / LAST_CHECKPOINT
    learner = ThresholdLearner(alpha=config.alpha)
    threshold = _ThresholdLearning(learner) if family.learns_threshold else _NoThreshold()
    if resume and last_path.is_file():
        model = load_released_checkpoint(last_path)
        run = _Run(config, family, model, vocab, train_split, val_split, torch.device(config.device), threshold)
        return _resumed_run(run, last_path, log)
    check_empty_folder(out_dir, resume, "pass --resume to continue the run in it")
    torch.manual_seed(config.seed)
    opt = config.model_options(train_split.img_dim, len(vocab), Path(config.data_dir).name, vocab.sha256)
    model = CrossAttentionMatcher.from_opt(opt, family=config.family)
    return _Run(config, family, model, vocab, train_split, val_split, torch.device(config.device), threshold)


class _RegionTraining(EpochLoop):
    """The NAAF/SCAN epochs: hardest-negative triplet loss on region features, validation, checkpoints."""

    def __init__(
        self, run: _Run, progress: Callable[[str, int], ProgressFn] | None, log: Callable[[str], None]
    ) -> None:
        config, model = run.config, run.model
        self.run_state, self.progress, self.log = run, progress, log
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        if run.optimizer_state is not None:
            optimizer.load_state_dict(run.optimizer_state)
        super().__init__(optimizer, params, config.grad_clip)
        self.captions = TokenisedCaptions(run.vocab, run.train_split.captions, max_unknown=MAX_UNKNOWN_FRACTION,
                                          source=str(run.train_split.captions_path))
        self.steps_per_epoch = max(1, run.train_split.num_captions // config.batch_size)
        self.advance: ProgressFn | None = None
        self._last: tuple[torch.Tensor, ...] = ()

    def epoch_name(self, epoch: int) -> str:
        return str(epoch + 1)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        config = self.run_state.config
        decayed = config.lr_decay_epoch is not None and epoch >= config.lr_decay_epoch
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate * (0.1 if decayed else 1.0)
        self.run_state.model.train()
        order = np.random.default_rng(config.seed + epoch).permutation(self.run_state.train_split.num_captions)
        self.advance = self.progress(
            f"epoch {epoch + 1}/{config.epochs}", self.steps_per_epoch
        ) if self.progress else None
        size = config.batch_size
        return [np.sort(order[step * size:(step + 1) * size]) for step in range(self.steps_per_epoch)]

    def batch_loss(self, epoch: int, rows: np.ndarray) -> torch.Tensor:
        run, config = self.run_state, self.run_state.config
        tokens, lengths = self.captions.batch(rows)
        cpi = run.train_split.captions_per_image
        features = torch.from_numpy(np.asarray(run.train_split.images[rows // cpi], dtype=np.float32))
        image_emb = run.model.encode_images(features.to(run.device))
        caption_emb = run.model.encode_captions(tokens.to(run.device), lengths)
        scores = run.family.training_scores(run.model, image_emb, caption_emb, lengths.to(run.device),
                                            run.threshold.threshold)
        self._last = (scores, image_emb, caption_emb, lengths)
        hardest = config.max_violation and epoch >= config.warmup_epochs
        return triplet_loss(scores, margin=config.margin, max_violation=hardest)

    def after_step(self, epoch: int, number: int, rows: np.ndarray, loss: float) -> None:
        self.run_state.threshold.after_step(*self._last, step=self.run_state.eiters)
        self.run_state.eiters += 1
        if self.advance:
            self.advance(1)

    def end_epoch(self, epoch: int, losses: list[float], started: float) -> None:
        run, config = self.run_state, self.run_state.config
        thres, thres_safe, thres_text = run.threshold.end_epoch(run.model)
        recall = validate(run.model, run.vocab, run.val_split, config.max_val_images, run.device)
        record = EpochRecord(epoch, sum(losses) / self.steps_per_epoch, time.perf_counter() - started, thres,
                             thres_safe, recall)
        run.history.append(record)
        self.log(f"epoch {epoch + 1}/{config.epochs}: loss {record.loss:.3f}{thres_text} "
                 f"{config.val_split} rsum {recall['rsum']:.1f} ({record.seconds:.0f} s)")
        is_best = recall["rsum"] > run.best_rsum
        run.best_rsum = max(run.best_rsum, recall["rsum"])
        self._save(epoch, is_best)

    def _save(self, epoch: int, is_best: bool) -> None:
        run, out_dir = self.run_state, Path(self.run_state.config.out_dir)
        run.model.to("cpu")
        extra: dict[str, Any] = {"optimizer": self.optimizer.state_dict(), **run.threshold.checkpoint_extra()}
        counters = {"epoch": epoch, "best_rsum": run.best_rsum, "eiters": run.eiters}
        save_released_checkpoint(out_dir / LAST_CHECKPOINT, run.model, extra=extra, **counters)
        if is_best:
            save_released_checkpoint(out_dir / BEST_CHECKPOINT, run.model, **counters)
        run.model.to(run.device)
        atomic_write_text(out_dir / "history.json", json.dumps([asdict(r) for r in run.history], indent=2) + "\n")
        run.threshold.plot(out_dir)


def train(config: TrainConfig, resume: bool = False, progress: Callable[[str, int], ProgressFn] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train NAAF or SCAN on ``config.data_dir`` (train split) and validate on ``config.val_split``."""
    run = _prepare_run(config, resume, log)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run.model.to(run.device)
    _RegionTraining(run, progress, log).run(range(run.start_epoch, config.epochs))
    return TrainResult(out_dir, run.best_rsum, run.history, out_dir / LAST_CHECKPOINT, out_dir / BEST_CHECKPOINT)


def _load_resume_state(path: Path) -> dict[str, Any]:
    """The non-model entries of a last checkpoint (epoch, optimizer state, trajectory), loaded safely."""
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        content = torch.load(path, map_location="cpu", weights_only=True)
    return content
