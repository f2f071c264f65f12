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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from itmrt.data.precomp import PrecompSplit
from itmrt.errors import DataError, ItmrtError
from itmrt.io import atomic_write_text
from itmrt.models.checkpoint import load_released_checkpoint, save_released_checkpoint
from itmrt.models.evaluate import encode_captions, encode_images, score_matrix
from itmrt.models.matcher import CrossAttentionMatcher
from itmrt.models.naaf import naaf_scores
from itmrt.data.metrics import recall_table
from itmrt.text.vocab import Vocabulary
from itmrt.train.losses import triplet_loss
from itmrt.train.threshold import ThresholdLearner, ThresholdRecord, plot_trajectory

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

    def model_options(self, img_dim: int, vocab_size: int, data_name: str) -> dict[str, Any]:
        """The ``opt`` a released checkpoint of this family carries."""
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
        if self.family == "naaf":
            opt.update(lambda_softmax=20.0 if self.lambda_softmax is None else self.lambda_softmax,
                       thres=0.0, thres_safe=0.0, alpha=self.alpha)
        elif self.family == "scan":
            opt.update(lambda_softmax=9.0 if self.lambda_softmax is None else self.lambda_softmax,
                       bi_gru=self.bi_gru, cross_attn=self.cross_attn, raw_feature_norm=self.raw_feature_norm,
                       agg_func=self.agg_func, lambda_lse=self.lambda_lse)
        else:
            raise ItmrtError(f"itmrt train knows families naaf, scan and cmpm, not {self.family!r}")
        return opt


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


class _TokenisedCaptions:
    """All captions of a split tokenised once, padded to the longest."""

    def __init__(self, vocab: Vocabulary, captions: list[str], source: str = "captions") -> None:
        self.ids, self.lengths = vocab.encode_batch(captions)
        # A vocabulary made for other data turns most words into <unk>: refuse it rather than train on noise.
        words = self.lengths.sum() - 2 * len(self.lengths)
        unknown = int((self.ids == vocab.unk_id).sum())
        if words > 0 and unknown / words > MAX_UNKNOWN_FRACTION:
            raise DataError(
                f"{100 * unknown / words:.0f}% of the words in {source} are not in the vocabulary; "
                "pass the vocabulary made for this data (--vocab)"
            )

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.lengths[rows]
        width = int(lengths.max())
        return torch.from_numpy(self.ids[rows, :width]), torch.from_numpy(lengths)


def _check_data(split: PrecompSplit, vocab: Vocabulary, model: CrossAttentionMatcher | None) -> None:
    if model is None:
        return
    if split.img_dim != model.image_encoder.img_dim:
        raise DataError(
            f"{split.images_path} has {split.img_dim}-d region features but the model being resumed expects "
            f"{model.image_encoder.img_dim}; train on the data it was started on or start a new run"
        )
    if len(vocab) != model.text_encoder.vocab_size:
        raise DataError(
            f"the vocabulary has {len(vocab)} words but the model being resumed has {model.text_encoder.vocab_size}; "
            "use the vocabulary the run was started with"
        )


def _word_maxima(image_emb: torch.Tensor, caption_emb: torch.Tensor) -> torch.Tensor:
    """``[Bi, Bc, L]``: each word's best raw similarity over each image's regions."""
    sims = torch.matmul(caption_emb.unsqueeze(0), image_emb.unsqueeze(1).transpose(-1, -2))
    return sims.amax(dim=-1)


def _training_scores(model: CrossAttentionMatcher, image_emb, caption_emb, lengths, learner) -> torch.Tensor:
    if model.family == "naaf":
        # MODELS.md section 2, last paragraph: opt.thres and no intra-caption propagation.
        return naaf_scores(image_emb, caption_emb, lengths, learner.thres,
                           lambda_softmax=float(model.opt["lambda_softmax"]), propagate=False)
    return model.score(image_emb, caption_emb, lengths)


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


def _sync_thresholds(model: CrossAttentionMatcher, learner: ThresholdLearner) -> None:
    model.opt["thres"] = float(learner.thres)
    model.opt["thres_safe"] = float(learner.thres_safe)
    threshold = model.scorer.threshold
    assert isinstance(threshold, torch.Tensor)  # a NAAFScorer buffer
    threshold.fill_(float(learner.thres_safe))


def train(config: TrainConfig, resume: bool = False, progress: Callable[[str, int], ProgressFn] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train NAAF or SCAN on ``config.data_dir`` (train split) and validate on ``config.val_split``."""
    data_dir = Path(config.data_dir)
    out_dir = Path(config.out_dir)
    vocab_path = Path(config.vocab) if config.vocab else data_dir / "vocab.json"
    if not vocab_path.is_file():
        raise DataError(f"vocabulary {vocab_path} not found; pass --vocab or put vocab.json in the data folder")
    vocab = Vocabulary.from_json(vocab_path)
    train_split = PrecompSplit.open(data_dir, "train")
    val_split = PrecompSplit.open(data_dir, config.val_split)
    if val_split.img_dim != train_split.img_dim:
        raise DataError(f"{config.val_split} features are {val_split.img_dim}-d but train features are {train_split.img_dim}-d")
    device = torch.device(config.device)

    last_path, best_path = out_dir / LAST_CHECKPOINT, out_dir / BEST_CHECKPOINT
    start_epoch, best_rsum, eiters = 0, -math.inf, 0
    history: list[EpochRecord] = []
    learner = ThresholdLearner(alpha=config.alpha)
    optimizer_state = None
    if resume and last_path.is_file():
        model = load_released_checkpoint(last_path)
        if model.family != config.family:
            raise ItmrtError(f"{last_path} holds a {model.family} model, not {config.family}; use another --out")
        _check_data(train_split, vocab, model)
        content = _load_resume_state(last_path)
        start_epoch = int(content["epoch"]) + 1
        best_rsum = float(content["best_rsum"])
        eiters = int(content["Eiters"])
        optimizer_state = content.get("optimizer")
        history = [EpochRecord(**record) for record in json.loads((out_dir / "history.json").read_text())] \
            if (out_dir / "history.json").is_file() else []
        if model.family == "naaf":
            learner = ThresholdLearner(model.opt["thres"], model.opt["thres_safe"], alpha=config.alpha)
            learner.trajectory = [ThresholdRecord(*row) for row in content.get("threshold_trajectory", [])]
        log(f"resuming {config.family} from {last_path} after epoch {start_epoch - 1}")
    else:
        if out_dir.is_dir() and any(out_dir.iterdir()) and not resume:
            raise ItmrtError(f"output folder {out_dir} is not empty; pass --resume to continue that run or choose another --out")
        torch.manual_seed(config.seed)
        opt = config.model_options(train_split.img_dim, len(vocab), data_dir.name)
        model = CrossAttentionMatcher.from_opt(opt, family=config.family)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    captions = _TokenisedCaptions(vocab, train_split.captions, str(train_split.captions_path))
    cpi = train_split.captions_per_image
    n_caps = train_split.num_captions
    steps_per_epoch = max(1, n_caps // config.batch_size)

    for epoch in range(start_epoch, config.epochs):
        lr = config.learning_rate * (0.1 if config.lr_decay_epoch is not None and epoch >= config.lr_decay_epoch else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        generator = np.random.default_rng(config.seed + epoch)
        order = generator.permutation(n_caps)
        advance = progress(f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch) if progress else None
        started, total_loss = time.perf_counter(), 0.0
        for step in range(steps_per_epoch):
            rows = np.sort(order[step * config.batch_size:(step + 1) * config.batch_size])
            tokens, lengths = captions.batch(rows)
            features = torch.from_numpy(np.asarray(train_split.images[rows // cpi], dtype=np.float32))
            image_emb = model.encode_images(features.to(device))
            caption_emb = model.encode_captions(tokens.to(device), lengths)
            scores = _training_scores(model, image_emb, caption_emb, lengths.to(device), learner)
            hardest = config.max_violation and epoch >= config.warmup_epochs
            loss = triplet_loss(scores, margin=config.margin, max_violation=hardest)
            optimizer.zero_grad()
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if model.family == "naaf":
                learner.update_from_batch(scores.detach(), _word_maxima(image_emb.detach(), caption_emb.detach()),
                                          lengths, step=eiters)
            eiters += 1
            total_loss += float(loss.detach())
            if advance:
                advance(1)
        if model.family == "naaf":
            _sync_thresholds(model, learner)
        recall = validate(model, vocab, val_split, config.max_val_images, device)
        record = EpochRecord(epoch, total_loss / steps_per_epoch, time.perf_counter() - started,
                             learner.thres if model.family == "naaf" else None,
                             learner.thres_safe if model.family == "naaf" else None, recall)
        history.append(record)
        thres_text = f" thres={learner.thres:.4f} thres_safe={learner.thres_safe:.4f}" if model.family == "naaf" else ""
        log(f"epoch {epoch + 1}/{config.epochs}: loss {record.loss:.3f}{thres_text} "
            f"{config.val_split} rsum {recall['rsum']:.1f} ({record.seconds:.0f} s)")
        is_best = recall["rsum"] > best_rsum
        best_rsum = max(best_rsum, recall["rsum"])
        model.to("cpu")
        extra: dict[str, Any] = {"optimizer": optimizer.state_dict()}
        if model.family == "naaf":
            extra["threshold_trajectory"] = [list(map(float, r)) for r in learner.trajectory]
        save_released_checkpoint(last_path, model, epoch=epoch, best_rsum=best_rsum, eiters=eiters, extra=extra)
        if is_best:
            save_released_checkpoint(best_path, model, epoch=epoch, best_rsum=best_rsum, eiters=eiters)
        model.to(device)
        atomic_write_text(out_dir / "history.json", json.dumps([asdict(r) for r in history], indent=2) + "\n")
        if model.family == "naaf" and learner.trajectory:
            plot_trajectory(learner.trajectory, out_dir / "thresholds.png")
    return TrainResult(out_dir, best_rsum, history, last_path, best_path)


def _load_resume_state(path: Path) -> dict[str, Any]:
    """The non-model entries of a last checkpoint (epoch, optimizer state, trajectory), loaded safely."""
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        content = torch.load(path, map_location="cpu", weights_only=True)
    return content
