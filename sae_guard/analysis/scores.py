"""Scoring a detector against labels, and the dense logistic probe every SAE readout is compared with."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Probability that a random positive (label 1) outscores a random negative (label 0); ties count half. Other
    labels (-1: neither) are ignored."""
    pos, neg = scores[labels == 1].float(), scores[labels == 0].float()
    if not len(pos) or not len(neg):
        return math.nan
    greater = (pos[:, None] > neg[None]).float().mean()
    ties = (pos[:, None] == neg[None]).float().mean()
    return (greater + 0.5 * ties).item()


def tpr_at_fpr(scores: Tensor, labels: Tensor, fpr: float = 0.01) -> float:
    """The share of positives scoring above the threshold that lets `fpr` of the negatives through."""
    pos, neg = scores[labels == 1].float(), scores[labels == 0].float()
    if not len(pos) or not len(neg):
        return math.nan
    threshold = torch.quantile(neg, 1 - fpr)
    return (pos > threshold).float().mean().item()


def dense_probe(x: Tensor, labels: Tensor, rows: Sequence[int] | None = None,
                l2: float = 1e-3) -> Callable[[Tensor], Tensor]:
    """A logistic regression on standardised dense features of the labelled (0/1) `rows` (default: all); returns
    a scorer for new rows. Standardisation statistics come from the same rows."""
    rows = [r for r in (range(len(x)) if rows is None else rows) if labels[r] >= 0]
    mean, std = x[rows].mean(0), x[rows].std(0).clamp_min(1e-6)
    z = (x[rows] - mean) / std
    y = labels[rows].float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lambda new: ((new - mean) / std @ w + b).detach()


def fpr_at_tpr(scores: Tensor, labels: Tensor, tpr: float = 0.95) -> float:
    """The share of negatives (label 0) at or above the threshold that keeps `tpr` of the positives (FPR95 for
    out-of-distribution detection, with OOD inputs as the positives)."""
    pos, neg = scores[labels == 1].float(), scores[labels == 0].float()
    if not len(pos) or not len(neg):
        return math.nan
    threshold = torch.quantile(pos, 1 - tpr)
    return (neg >= threshold).float().mean().item()
