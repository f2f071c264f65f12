"""The training-loop skeleton both trainers run, and the tokenised captions both batch from.

:class:`EpochLoop` runs epochs of batches with one optimizer step per batch
(gradients cleared, loss backpropagated, gradient norm clipped, a loss that is
not finite stopped with a one-line error); a trainer says what an epoch's
batches are, what a batch's loss is, what follows each step (threshold
learning, step counters, progress) and what ends an epoch (validation,
checkpoints, history). :mod:`itmrt.train.trainer` (NAAF, SCAN) and
:mod:`itmrt.families.cmpm.trainer` (CMPM) are the two trainers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from itmrt.errors import DataError, ItmrtError
from itmrt.text.vocab import Vocabulary


class EpochLoop:
    """The loop; subclasses fill in :meth:`epoch_batches`, :meth:`batch_loss` and :meth:`end_epoch`."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float) -> None:
        self.optimizer, self.params, self.grad_clip = optimizer, params, grad_clip

    def epoch_batches(self, epoch: int) -> Sequence[Any]:
        """Prepare ``epoch`` (learning rate, seeds, train mode) and return its batches, in order."""
        raise NotImplementedError

    def batch_loss(self, epoch: int, batch: Any) -> torch.Tensor:
        """The loss of one batch (forward pass); the loop backpropagates and steps."""
        raise NotImplementedError

    def after_step(self, epoch: int, number: int, batch: Any, loss: float) -> None:
        """After the optimizer step of batch ``number`` (1-based): counters, threshold learning, progress."""

    def end_epoch(self, epoch: int, losses: list[float], started: float) -> None:
        """Validate, record, save (``started``: ``time.perf_counter()`` when the epoch began)."""
        raise NotImplementedError

    def epoch_name(self, epoch: int) -> str:
        return str(epoch)

    def run(self, epochs: Iterable[int]) -> None:
        for epoch in epochs:
            started = time.perf_counter()
            batches = self.epoch_batches(epoch)
            losses: list[float] = []
            for number, batch in enumerate(batches, start=1):
                loss = self.batch_loss(epoch, batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
                self.optimizer.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ItmrtError(
                        f"the loss became {value} at epoch {self.epoch_name(epoch)} "
                        f"step {number}; lower the learning rate"
                    )
                losses.append(value)
                self.after_step(epoch, number, batch, value)
            self.end_epoch(epoch, losses, started)


class TokenisedCaptions:
    """All captions of a split tokenised once (padded to the longest), batched as tensors.

    ``max_unknown``: refuse captions with a larger share of ``<unk>`` words - a
    vocabulary made for other data - rather than train on noise.
    """

    def __init__(self, vocab: Vocabulary, captions: list[str], max_length: int | None = None,
                 max_unknown: float | None = None, source: str = "captions") -> None:
        self.ids, self.lengths = vocab.encode_batch(captions, max_length=max_length)
        if max_unknown is not None:
            words = self.lengths.sum() - 2 * len(self.lengths)
            unknown = int((self.ids == vocab.unk_id).sum())
            if words > 0 and unknown / words > max_unknown:
                raise DataError(
                    f"{100 * unknown / words:.0f}% of the words in {source} are not in the vocabulary; "
                    "pass the vocabulary made for this data (--vocab)"
                )

    def batch(self, rows: np.ndarray, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, longest in the batch]`` (on ``device``) and lengths ``[B]`` (on the CPU)."""
        lengths = self.lengths[rows]
        tokens = torch.from_numpy(np.ascontiguousarray(self.ids[rows, : int(lengths.max())]))
        return (tokens if device is None else tokens.to(device)), torch.from_numpy(lengths)
