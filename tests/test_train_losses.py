"""Seed losses against straightforward loop implementations, and a toy CMPM training run."""

from __future__ import annotations

import math

import pytest
import torch

from itmrt.train import cmpc_loss, cmpm_loss, triplet_loss


def _batch(seed: int, batch: int = 7, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    texts = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    labels = torch.tensor([3, 1, 3, 0, 1, 3, 2][:batch])  # repeated identities
    return images, texts, labels


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _triplet_loop(scores: list[list[float]], margin: float, hardest: bool) -> float:
    n = len(scores)
    total = 0.0
    for i in range(n):  # image i against every wrong caption
        costs = [max(0.0, margin + scores[i][j] - scores[i][i]) for j in range(n) if j != i]
        total += max(costs) if hardest else sum(costs)
    for j in range(n):  # caption j against every wrong image
        costs = [max(0.0, margin + scores[i][j] - scores[j][j]) for i in range(n) if i != j]
        total += max(costs) if hardest else sum(costs)
    return total


@pytest.mark.parametrize("hardest", [True, False])
def test_triplet_loss_matches_loop(hardest: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 6, generator=gen, dtype=torch.float64)
    scores.diagonal().add_(0.3)
    got = triplet_loss(scores, margin=0.2, max_violation=hardest)
    want = _triplet_loop(scores.tolist(), 0.2, hardest)
    assert want > 0
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_triplet_loss_is_zero_when_every_positive_wins_by_the_margin() -> None:
    scores = torch.full((4, 4), 0.1) + torch.eye(4) * 0.5
    assert triplet_loss(scores).item() == 0.0
    with pytest.raises(ValueError):
        triplet_loss(torch.zeros(3, 4))


def _cmpm_direction_loop(queries: list[list[float]], targets: list[list[float]], labels: list[int]) -> float:
    n = len(queries)
    total = 0.0
    for i in range(n):
        projections = [_dot(queries[i], t) / (_norm(t) + 1e-8) for t in targets]
        top = max(projections)
        exps = [math.exp(p - top) for p in projections]
        p = [e / sum(exps) for e in exps]
        matches = sum(1 for y in labels if y == labels[i])
        for j in range(n):
            q = (1.0 if labels[j] == labels[i] else 0.0) / matches
            total += p[j] * math.log(p[j] / (q + 1e-8) + 1e-8)
    return total / n


def test_cmpm_matches_loop() -> None:
    for seed in range(3):
        images, texts, labels = _batch(seed)
        got = cmpm_loss(images, texts, labels).item()
        x, z, y = images.tolist(), texts.tolist(), labels.tolist()
        want = _cmpm_direction_loop(x, z, y) + _cmpm_direction_loop(z, x, y)
        assert got == pytest.approx(want, rel=1e-10)


def _cmpc_direction_loop(
    features: list[list[float]],
    others: list[list[float]],
    labels: list[int],
    weight: list[list[float]],
    smoothing: float,
) -> float:
    total = 0.0
    classes = len(weight)
    for f, o, y in zip(features, others, labels):
        unit = [v / (_norm(o) + 1e-8) for v in o]
        scale = _dot(f, unit)
        projected = [scale * v for v in unit]
        logits = [_dot(projected, w) / (_norm(w) + 1e-8) for w in weight]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(logit - top) for logit in logits))
        log_p = [logit - log_z for logit in logits]
        target = [smoothing / classes + (1.0 - smoothing) * (k == y) for k in range(classes)]
        total -= sum(t * lp for t, lp in zip(target, log_p))
    return total / len(features)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cmpc_matches_loop(smoothing: float) -> None:
    images, texts, labels = _batch(4)
    weight = torch.randn(5, images.shape[1], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = cmpc_loss(images, texts, labels, weight, label_smoothing=smoothing).item()
    x, z, y, w = images.tolist(), texts.tolist(), labels.tolist(), weight.tolist()
    want = _cmpc_direction_loop(x, z, y, w, smoothing) + _cmpc_direction_loop(z, x, y, w, smoothing)
    assert got == pytest.approx(want, rel=1e-10)


def test_cmpc_label_smoothing_mixes_in_the_mean_class_loss() -> None:
    images, texts, labels = _batch(5)
    weight = torch.randn(4, images.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 0.2
    plain = cmpc_loss(images, texts, labels, weight)
    smoothed = cmpc_loss(images, texts, labels, weight, label_smoothing=eps)
    # Smoothing = (1 - eps) * plain + eps * (loss against a uniform target), in each direction.
    uniform = torch.stack(
        [
            -torch.log_softmax((a * _unit(b)).sum(1, keepdim=True) * _unit(b) @ _unit(weight).t(), dim=1).mean()
            for a, b in ((images, texts), (texts, images))
        ]
    ).sum()
    assert smoothed.item() != pytest.approx(plain.item(), rel=1e-3)
    assert smoothed.item() == pytest.approx((1 - eps) * plain.item() + eps * uniform.item(), rel=1e-10)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / (v.norm(dim=1, keepdim=True) + 1e-8)


def test_loss_shape_checks() -> None:
    images, texts, labels = _batch(0)
    with pytest.raises(ValueError):
        cmpm_loss(images, texts[:, :3], labels)
    with pytest.raises(ValueError):
        cmpm_loss(images, texts, labels[:3])
    with pytest.raises(ValueError):
        cmpc_loss(images, texts, labels, torch.zeros(4, 3, dtype=torch.float64))


def _recall_at_1(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor) -> float:
    scores = _unit(image_emb) @ _unit(text_emb).t()
    return (labels[scores.argmax(dim=1)] == labels).double().mean().item()


def test_cmpm_trains_a_toy_dual_encoder() -> None:
    torch.manual_seed(0)
    identities, image_dim, text_dim, joint = 4, 12, 10, 6
    image_protos = torch.randn(identities, image_dim)
    text_protos = torch.randn(identities, text_dim)

    def sample(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, identities, (n,), generator=gen)
        images = image_protos[labels] + 0.6 * torch.randn(n, image_dim, generator=gen)
        texts = text_protos[labels] + 0.6 * torch.randn(n, text_dim, generator=gen)
        return images, texts, labels

    image_encoder = torch.nn.Linear(image_dim, joint)
    text_encoder = torch.nn.Linear(text_dim, joint)
    optimizer = torch.optim.Adam([*image_encoder.parameters(), *text_encoder.parameters()], lr=0.02)
    eval_images, eval_texts, eval_labels = sample(64, torch.Generator().manual_seed(100))

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            x, z = image_encoder(eval_images), text_encoder(eval_texts)
            return cmpm_loss(x, z, eval_labels).item(), _recall_at_1(x, z, eval_labels)

    loss_before, recall_before = evaluate()
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        images, texts, labels = sample(16, gen)
        loss = cmpm_loss(image_encoder(images), text_encoder(texts), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss_after, recall_after = evaluate()
    assert loss_after < 0.5 * loss_before
    assert recall_after > recall_before + 0.2
    assert recall_after >= 0.9
