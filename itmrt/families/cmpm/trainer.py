"""Training CMPM (optionally + CMPC) on images with captions and identity labels.

Data: an :mod:`itmrt.data.images` folder (``vocab.json`` and per split
``{split}_images.npy``, ``{split}_caps.txt``, ``{split}_caption_image.npy``,
``{split}_labels.npy``). A training sample is one caption with its own image and
its image's identity label.

Batches (:func:`identity_batches`) put captions of one identity next to each
other in groups of ``samples_per_identity``, so most batches hold several
samples of some identities and CMPM's label-normalised target ``q`` is not just
the identity matrix. Every caption is used once per epoch; the order of epoch
``e`` depends only on ``(seed, e)``.

Output folder:

- ``checkpoint_last.safetensors``: the model after the latest epoch, in itmrt's
  native format (:func:`itmrt.models.native.save_native`, loadable by
  ``itmrt.families.checkpoints.load_checkpoint``);
- ``checkpoint_last.state.pt``: what resuming needs besides the weights, saved
  with ``torch.save`` holding only tensors, numbers, strings, lists and dicts (so
  ``torch.load(..., weights_only=True)`` reads it): epoch, optimizer state, the
  CMPC class weight, best score, history, and the sha256 of the model file it
  belongs to (a resume refuses a pair that does not match, e.g. after a crash
  between the two writes);
- ``model_best.safetensors``: the model with the best validation rsum so far;
- ``history.json``: one record per epoch (loss, validation recall).

Validation: :func:`evaluate_cmpm` embeds every image and caption of the split
and computes :func:`itmrt.metrics.recall.identity_recall_table` on the cosine score
matrix (a retrieved item is correct when it has the query's identity).
Determinism: on a CPU the same config gives bit-identical weights, also across
an interruption and resume; on CUDA cuDNN's LSTM kernels may differ in the last bits.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from itmrt.data.images import ImageCaptionSplit, load_vocabulary, preprocess_images
from itmrt.documents import sha256_file
from itmrt.errors import CheckpointError, ItmrtError, first_line
from itmrt.families.checkpoints import load_native
from itmrt.families.cmpm.losses import cmpc_loss, cmpm_loss
from itmrt.families.cmpm.model import CMPMModel
from itmrt.metrics.recall import identity_recall_table
from itmrt.models.native import recorded_vocab_sha256, save_native
from itmrt.models.training_loop import EpochLoop, TokenisedCaptions
from itmrt.publish import atomic_write_bytes, atomic_write_text
from itmrt.text.vocab import Vocabulary

LAST_CHECKPOINT = "checkpoint_last.safetensors"
LAST_STATE = "checkpoint_last.state.pt"
BEST_CHECKPOINT = "model_best.safetensors"
HISTORY_FILE = "history.json"
_ARCHITECTURE_KEYS = ("word_dim", "lstm_hidden", "embed_size", "width_mult")
_STATE_FORMAT = "itmrt-cmpm-train-state-1"


@dataclass
class CMPMTrainConfig:
    """Everything a CMPM training run depends on.

    The defaults train the small demo model (MobileNet v1 x0.25, 64-d LSTM and
    joint space) on 64 x 64 synthetic images in one to two minutes on a CPU.
    ``image_size=None`` takes the data's; ``vocab_size`` always comes from the
    data's ``vocab.json``. ``init_checkpoint`` starts from a native CMPM model
    (its architecture then overrides the fields here). ``max_steps_per_epoch``
    cuts epochs short (quick experiments and tests). ``num_threads`` sets
    PyTorch's intra-op CPU threads for the run (restored afterwards); small
    models train fastest with 1, and on a busy machine more threads than free
    cores can make a run many times slower.
    """

    data_dir: str | Path
    out_dir: str | Path
    epochs: int = 12
    batch_size: int = 32
    samples_per_identity: int = 2
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    lr_schedule: str = "cosine"
    grad_clip: float = 5.0
    use_cmpc: bool = False
    cmpc_label_smoothing: float = 0.0
    width_mult: float = 0.25
    word_dim: int = 64
    lstm_hidden: int = 64
    embed_size: int = 64
    image_size: int | None = None
    max_caption_length: int = 40
    train_split: str = "train"
    val_split: str | None = "dev"
    val_every: int = 1
    validate_initial: bool = True
    eval_batch_size: int = 128
    max_steps_per_epoch: int | None = None
    seed: int = 0
    device: str = "cpu"
    num_threads: int | None = None
    init_checkpoint: str | Path | None = None
    resume: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class BatchProgress:
    """What the per-batch progress callback receives."""

    epoch: int
    batch: int
    batches_per_epoch: int
    global_step: int
    loss: float


@dataclass
class CMPMTrainResult:
    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_epoch: int
    best_rsum: float
    epochs_completed: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


ProgressCallback = Callable[[BatchProgress], None]


# -- data ---------------------------------------------------------------------


def identity_batches(labels: np.ndarray, batch_size: int, samples_per_identity: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of sample indices, cut into batches, with same-identity samples grouped.

    Each identity's samples are shuffled and split into groups of
    ``samples_per_identity``; the groups of all identities are shuffled and laid
    end to end, then cut into batches of ``batch_size``. Every sample appears once.
    A final batch of fewer than 2 samples is dropped (nothing to contrast).
    """
    if batch_size < 2 or samples_per_identity < 1:
        raise ItmrtError(
            f"batch_size must be >= 2 and samples_per_identity >= 1, got {batch_size} and {samples_per_identity}"
        )
    groups: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        groups.extend(
            members[start:start + samples_per_identity] for start in range(0, len(members), samples_per_identity)
        )
    order = rng.permutation(len(groups))
    flat = np.concatenate([groups[i] for i in order]) if groups else np.empty(0, dtype=np.int64)
    batches = [flat[start:start + batch_size] for start in range(0, len(flat), batch_size)]
    return [batch for batch in batches if len(batch) >= 2]


def _image_batch(split: ImageCaptionSplit, image_indices: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(preprocess_images(np.asarray(split.images[image_indices]))).to(device)


# -- evaluation ----------------------------------------------------------------


@torch.no_grad()
def embed_split(model: CMPMModel, split: ImageCaptionSplit, vocab: Vocabulary, device: str | torch.device = "cpu",
                batch_size: int = 128, max_caption_length: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[num_images, D]`` and ``[num_captions, D]`` of a split (model in eval mode)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        image_parts = [
            model.encode_image(
                _image_batch(split, np.arange(start, min(start + batch_size, split.num_images)), device)).cpu()
            for start in range(0, split.num_images, batch_size)
        ]
        captions = TokenisedCaptions(vocab, split.captions, max_caption_length)
        text_parts = []
        for start in range(0, split.num_captions, batch_size):
            tokens, lengths = captions.batch(np.arange(start, min(start + batch_size, split.num_captions)), device)
            text_parts.append(model.encode_text(tokens, lengths).cpu())
    finally:
        model.train(was_training)
    return torch.cat(image_parts).numpy(), torch.cat(text_parts).numpy()


def evaluate_cmpm(model: CMPMModel, split: ImageCaptionSplit, vocab: Vocabulary, device: str | torch.device = "cpu",
                  batch_size: int = 128, max_caption_length: int = 40) -> dict[str, float]:
    """Identity-matched recall table (:func:`identity_recall_table`) of ``model`` on ``split``."""
    image_emb, text_emb = embed_split(model, split, vocab, device, batch_size, max_caption_length)
    scores = CMPMModel.scores(torch.from_numpy(image_emb), torch.from_numpy(text_emb)).numpy()
    return identity_recall_table(scores, split.image_labels, split.caption_labels)


# -- checks ---------------------------------------------------------------------


def check_data_matches_model(model: CMPMModel, split: ImageCaptionSplit, vocab: Vocabulary) -> None:
    """One-line :class:`ItmrtError` when the data cannot feed the model (vocabulary size, image size)."""
    vocab.check_fits(model.vocab_size, "the data's vocabulary", "the model's embedding",
                     "use the vocabulary the model was trained with")
    recorded = recorded_vocab_sha256(model)
    if recorded is not None and recorded != vocab.sha256:
        raise ItmrtError(f"the data's vocabulary ({split.data_dir}) is not the one the model was trained with (its "
                         "hash differs from the checkpoint's); use the vocabulary the model was trained with")
    if (split.image_height, split.image_width) != (model.image_size, model.image_size):
        raise ItmrtError(
            f"{split.split} images in {split.data_dir} are {split.image_height}x{split.image_width} but the model "
            f"takes {model.image_size}x{model.image_size}; resize the images or set image_size to match"
        )


def _check_config(config: CMPMTrainConfig) -> None:
    checks = (
        (config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 2, f"batch_size must be >= 2, got {config.batch_size}"),
        (config.samples_per_identity >= 1, f"samples_per_identity must be >= 1, got {config.samples_per_identity}"),
        (config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}"),
        (config.optimizer in ("adam", "adamw"), f"optimizer must be 'adam' or 'adamw', got {config.optimizer!r}"),
        (config.lr_schedule in ("constant", "cosine"),
         f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}"),
        (config.val_every >= 1, f"val_every must be >= 1, got {config.val_every}"),
        (config.max_steps_per_epoch is None or config.max_steps_per_epoch >= 1, "max_steps_per_epoch must be >= 1"),
        (0.0 <= config.cmpc_label_smoothing < 1.0, "cmpc_label_smoothing must be within [0, 1)"),
        (config.num_threads is None or config.num_threads >= 1, f"num_threads must be >= 1, got {config.num_threads}"),
    )
    for ok, message in checks:
        if not ok:
            raise ItmrtError(message)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ItmrtError(f"unknown device {name!r} ({exc}); use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ItmrtError(f"device {name!r} requested but this PyTorch has no usable CUDA GPU; use device='cpu'")
    return device


# -- checkpoints -----------------------------------------------------------------


def _save_last(out_dir: Path, model: CMPMModel, state: dict[str, Any]) -> None:
    """Model file first, then the state naming the model file's hash (the pair is checked on resume)."""
    model_path = save_native(out_dir / LAST_CHECKPOINT, model)
    state = dict(state, model_sha256=sha256_file(model_path), format=_STATE_FORMAT)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out_dir / LAST_STATE, buffer.getvalue())


def _load_last(out_dir: Path) -> tuple[CMPMModel, dict[str, Any]]:
    model_path, state_path = out_dir / LAST_CHECKPOINT, out_dir / LAST_STATE
    if not model_path.is_file() or not state_path.is_file():
        raise CheckpointError(
            f"nothing to resume in {out_dir}: {LAST_CHECKPOINT} and {LAST_STATE} are needed; start without resume"
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"{state_path} is not a readable training state ({first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise CheckpointError(f"{state_path} is not an itmrt CMPM training state")
    if state.get("model_sha256") != sha256_file(model_path):
        raise CheckpointError(
            f"{model_path} does not belong to {state_path} (hash "
            "differs; was a save interrupted?); restart without resume"
        )
    model = load_native(model_path)
    if not isinstance(model, CMPMModel):
        raise CheckpointError(f"{model_path} holds a {type(model).__name__}, not a CMPM model")
    return model, state


def _build_model(config: CMPMTrainConfig, vocab_size: int, image_size: int) -> CMPMModel:
    if config.init_checkpoint is not None:
        model = load_native(config.init_checkpoint)
        if not isinstance(model, CMPMModel):
            raise CheckpointError(f"{config.init_checkpoint} holds a {type(model).__name__}, not a CMPM model")
        return model
    torch.manual_seed(config.seed)
    return CMPMModel(vocab_size=vocab_size, word_dim=config.word_dim, lstm_hidden=config.lstm_hidden,
                     embed_size=config.embed_size, width_mult=config.width_mult, image_size=image_size)


def _make_optimizer(config: CMPMTrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _epoch_lr(config: CMPMTrainConfig, epoch: int) -> float:
    """Learning rate of 1-based ``epoch``: constant, or cosine from lr down to lr/100 (stateless, so resume-safe)."""
    if config.lr_schedule == "constant" or config.epochs == 1:
        return config.learning_rate
    progress = (epoch - 1) / (config.epochs - 1)
    floor = config.learning_rate / 100
    return floor + 0.5 * (config.learning_rate - floor) * (1 + math.cos(math.pi * progress))


def _config_record(config: CMPMTrainConfig) -> str:
    return json.dumps({key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()},
                      sort_keys=True)


# -- training ---------------------------------------------------------------------


def train_cmpm(config: CMPMTrainConfig, progress: ProgressCallback | None = None) -> CMPMTrainResult:
    """Train (or resume training) a CMPM model as ``config`` says; see the module docstring for the outputs."""
    _check_config(config)
    previous_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):  # the run seeds torch; the caller's generator state is kept
            return _train(config, progress)
    finally:
        torch.set_num_threads(previous_threads)


@dataclass
class _CmpmRun:
    """What a CMPM run trains with, new or resumed (``state``: what :func:`_load_last` read, on resume)."""

    config: CMPMTrainConfig
    model: CMPMModel
    vocab: Vocabulary
    train_split: ImageCaptionSplit
    val_split: ImageCaptionSplit | None
    device: torch.device
    class_of_caption: np.ndarray  # identity label of each training caption, renumbered 0..K-1 (CMPC's classes)
    state: dict[str, Any] | None
    history: list[dict[str, float]] = field(default_factory=list)
    best_rsum: float = -math.inf
    best_epoch: int = 0
    start_epoch: int = 1
    global_step: int = 0

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    def validate(self) -> dict[str, float]:
        assert self.val_split is not None
        return evaluate_cmpm(self.model, self.val_split, self.vocab, self.device, self.config.eval_batch_size,
                             self.config.max_caption_length)


def _open_run(config: CMPMTrainConfig) -> _CmpmRun:
    """The data and the model (built, or loaded to resume), checked against each other."""
    device = _device(config.device)
    out_dir = Path(config.out_dir)
    vocab = load_vocabulary(config.data_dir)
    train_split = ImageCaptionSplit.open(config.data_dir, config.train_split)
    val_split = ImageCaptionSplit.open(config.data_dir, config.val_split) if config.val_split else None
    image_size = config.image_size if config.image_size is not None else train_split.image_height
    _identities, class_of_caption = np.unique(train_split.caption_labels, return_inverse=True)
    state: dict[str, Any] | None = None
    if config.resume:
        model, state = _load_last(out_dir)
        requested = {key: getattr(config, key) for key in _ARCHITECTURE_KEYS}
        stored = {key: model.config[key] for key in _ARCHITECTURE_KEYS}
        if config.init_checkpoint is None and requested != stored:
            raise CheckpointError(
                f"the checkpoint in {out_dir} has architecture {stored}, the config asks for {requested}"
            )
    else:
        has_last = (out_dir / LAST_CHECKPOINT).exists() or (out_dir / LAST_STATE).exists()
        if has_last and not config.overwrite:
            raise ItmrtError(
                f"{out_dir} already holds a training run; pass "
                "resume=True to continue it or overwrite=True to replace it"
            )
        model = _build_model(config, len(vocab), image_size)
    if config.image_size is not None and model.image_size != config.image_size:
        raise ItmrtError(
            f"the model takes {model.image_size}x{model.image_size} "
            f"images but image_size={config.image_size} was asked for"
        )
    check_data_matches_model(model, train_split, vocab)
    if val_split is not None:
        check_data_matches_model(model, val_split, vocab)
    model.vocab_sha256 = vocab.sha256  # saved in every checkpoint: export refuses another vocabulary
    model.to(device)
    return _CmpmRun(config, model, vocab, train_split, val_split, device, class_of_caption, state)


def _cmpc_weight(run: _CmpmRun) -> torch.nn.Parameter | None:
    """CMPC's class weight, seeded (one row per training identity); None without CMPC."""
    if not run.config.use_cmpc:
        return None
    classes, size = int(run.class_of_caption.max()) + 1, run.model.embed_size
    generator = torch.Generator().manual_seed(run.config.seed + 1)
    return torch.nn.Parameter((torch.randn(classes, size, generator=generator) / math.sqrt(size)).to(run.device))


def _restore(run: _CmpmRun, optimizer: torch.optim.Optimizer, cmpc_weight: torch.nn.Parameter | None) -> None:
    """Continue a resumed run where its state says (or start afresh, removing what an earlier run left)."""
    state = run.state
    if state is None:
        for stale in (LAST_CHECKPOINT, LAST_STATE, BEST_CHECKPOINT, HISTORY_FILE):
            (run.out_dir / stale).unlink(missing_ok=True)  # overwrite=True: nothing of the old run may survive
        return
    if bool(state["use_cmpc"]) != run.config.use_cmpc:
        raise CheckpointError(
            f"the run in {run.out_dir} was trained with "
            f"use_cmpc={bool(state['use_cmpc'])}; resume with the same setting"
        )
    if cmpc_weight is not None:
        stored_weight = state["cmpc_weight"]
        if tuple(stored_weight.shape) != tuple(cmpc_weight.shape):
            raise CheckpointError(f"the CMPC weight in {run.out_dir} has shape {tuple(stored_weight.shape)}; "
                                  f"the data has {cmpc_weight.shape[0]} identities")
        with torch.no_grad():
            cmpc_weight.copy_(stored_weight)
    optimizer.load_state_dict(state["optimizer"])
    run.history = [dict(record) for record in state["history"]]
    run.best_rsum, run.best_epoch = float(state["best_rsum"]), int(state["best_epoch"])
    run.start_epoch, run.global_step = int(state["epoch"]) + 1, int(state["global_step"])


class _CmpmTraining(EpochLoop):
    """The CMPM epochs: identity-grouped batches, CMPM (+ CMPC) loss, validation every ``val_every`` epochs."""

    def __init__(self, run: _CmpmRun, progress: ProgressCallback | None) -> None:
        self.run_state, self.progress = run, progress
        self.cmpc_weight = _cmpc_weight(run)
        params = list(run.model.parameters()) + ([self.cmpc_weight] if self.cmpc_weight is not None else [])
        super().__init__(_make_optimizer(run.config, params), params, run.config.grad_clip)
        _restore(run, self.optimizer, self.cmpc_weight)
        self.captions = TokenisedCaptions(run.vocab, run.train_split.captions, run.config.max_caption_length)
        self.class_tensor = torch.from_numpy(run.class_of_caption.astype(np.int64))
        self.batches_in_epoch = 0

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        config = self.run_state.config
        torch.manual_seed(config.seed * 100_003 + epoch)
        batches = identity_batches(self.run_state.class_of_caption, config.batch_size, config.samples_per_identity,
                                   np.random.default_rng([config.seed, epoch]))
        if config.max_steps_per_epoch is not None:
            batches = batches[: config.max_steps_per_epoch]
        for group in self.optimizer.param_groups:
            group["lr"] = _epoch_lr(config, epoch)
        self.run_state.model.train()
        self.batches_in_epoch = len(batches)
        return batches

    def batch_loss(self, epoch: int, indices: np.ndarray) -> Tensor:
        run, config = self.run_state, self.run_state.config
        images = _image_batch(run.train_split, run.train_split.caption_image[indices], run.device)
        tokens, lengths = self.captions.batch(indices, run.device)
        labels = self.class_tensor[indices].to(run.device)
        image_emb = run.model.encode_image(images)
        text_emb = run.model.encode_text(tokens, lengths)
        loss = cmpm_loss(image_emb, text_emb, labels)
        if self.cmpc_weight is not None:
            loss = loss + cmpc_loss(image_emb, text_emb, labels, self.cmpc_weight, config.cmpc_label_smoothing)
        return loss

    def after_step(self, epoch: int, number: int, indices: np.ndarray, loss: float) -> None:
        self.run_state.global_step += 1
        if self.progress is not None:
            self.progress(BatchProgress(epoch, number, self.batches_in_epoch, self.run_state.global_step, loss))

    def end_epoch(self, epoch: int, losses: list[float], started: float) -> None:
        run, config = self.run_state, self.run_state.config
        record: dict[str, float] = {"epoch": float(epoch), "train_loss": float(np.mean(losses)) if losses else math.nan,
                                    "steps": float(len(losses)), "lr": _epoch_lr(config, epoch),
                                    "seconds": time.perf_counter() - started}
        validated = run.val_split is not None and (epoch % config.val_every == 0 or epoch == config.epochs)
        if validated:
            record.update(run.validate())
        run.history.append(record)
        if validated and record["rsum"] > run.best_rsum:
            run.best_rsum, run.best_epoch = record["rsum"], epoch
            save_native(run.out_dir / BEST_CHECKPOINT, run.model)
        _save_last(run.out_dir, run.model, {
            "epoch": epoch, "global_step": run.global_step, "optimizer": self.optimizer.state_dict(),
            "use_cmpc": config.use_cmpc,
            "cmpc_weight": self.cmpc_weight.detach().cpu().clone() if self.cmpc_weight is not None else torch.empty(0),
            "best_rsum": run.best_rsum, "best_epoch": run.best_epoch, "history": run.history,
            "config": _config_record(config),
        })
        atomic_write_text(run.out_dir / HISTORY_FILE, json.dumps(run.history, indent=1) + "\n")


def _train(config: CMPMTrainConfig, progress: ProgressCallback | None) -> CMPMTrainResult:
    started = time.perf_counter()
    run = _open_run(config)
    training = _CmpmTraining(run, progress)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    if run.state is None and run.val_split is not None and config.validate_initial:
        run.history.append({"epoch": 0.0, **run.validate()})
    training.run(range(run.start_epoch, config.epochs + 1))
    if run.val_split is None and run.start_epoch <= config.epochs:
        save_native(run.out_dir / BEST_CHECKPOINT, run.model)  # without validation the latest model is the one to use
        run.best_epoch = config.epochs
    best_path = run.out_dir / BEST_CHECKPOINT
    return CMPMTrainResult(
        out_dir=run.out_dir,
        last_checkpoint=run.out_dir / LAST_CHECKPOINT,
        best_checkpoint=best_path if best_path.exists() else None,
        best_epoch=run.best_epoch,
        best_rsum=run.best_rsum,
        epochs_completed=config.epochs,
        history=run.history,
        seconds=time.perf_counter() - started,
    )


__all__ = [
    "BatchProgress",
    "CMPMTrainConfig",
    "CMPMTrainResult",
    "check_data_matches_model",
    "embed_split",
    "evaluate_cmpm",
    "identity_batches",
    "train_cmpm",
]
