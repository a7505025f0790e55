"""Choosing a concept's SAE features from target and retain inputs.

Every strategy reads per-input summaries: `target` (n_t, d_sae) and `retain` (n_r, d_sae), each row
the maximum activation of every latent over that input's real tokens, and returns feature indices.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Strategy = Callable[..., Tensor]


def itd(target: Tensor, retain: Tensor, n_features: int = 32, n_retain: int | None = None) -> Tensor:
    """Interpret-then-Deactivate (Tian et al. 2025): each target input's top features, minus retain's.

    The union over target inputs of their `n_features` most active latents, minus every latent in the
    top `n_retain` (default: `n_features`) of any retain input.
    """
    n_retain = n_features if n_retain is None else n_retain
    picked = _top_union(target, n_features)
    if retain.numel() and n_retain:
        picked &= ~_top_union(retain, n_retain)
    return picked.nonzero().squeeze(-1)


def mean_contrast(target: Tensor, retain: Tensor, n_features: int = 32) -> Tensor:
    """The latents whose share of mean activation is most larger on target than on retain (SAeUron)."""
    score = _share(target) - (_share(retain) if retain.numel() else 0.0)
    top = score.topk(min(n_features, score.numel()))
    return top.indices[top.values > 0]


def f1(target: Tensor, retain: Tensor, n_features: int = 32) -> Tensor:
    """The latents whose firing best separates target from retain inputs, by F1 (Makelov et al. 2024)."""
    fires_t = (target > 0).float().sum(0)
    fires_r = (retain > 0).float().sum(0) if retain.numel() else torch.zeros_like(fires_t)
    precision = fires_t / (fires_t + fires_r).clamp_min(1)
    recall = fires_t / max(target.shape[0], 1)
    score = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    top = score.topk(min(n_features, score.numel()))
    return top.indices[top.values > 0]


def coverage(target: Tensor, retain: Tensor, n_features: int = 32, max_retain_rate: float = 0.01) -> Tensor:
    """Greedy cover of the target inputs by latents that (almost) never fire on retain inputs.

    Candidates are the latents firing on at most `max_retain_rate` of retain inputs; each round adds the
    one firing on the most target inputs not yet covered, until every target input is covered or
    `n_features` are chosen. A concept's score is the largest energy of its latents, so a latent that
    also fires on retain inputs raises the threshold for all; this keeps such latents out.
    """
    fires_t = target > 0
    rate_r = (retain > 0).float().mean(0) if retain.numel() else torch.zeros(target.shape[-1])
    candidates = fires_t[:, rate_r <= max_retain_rate].float()
    ids = (rate_r <= max_retain_rate).nonzero().squeeze(-1)
    uncovered = torch.ones(target.shape[0], dtype=torch.bool)
    chosen: list[int] = []
    while len(chosen) < n_features and uncovered.any():
        gain = candidates[uncovered].sum(0)
        best = int(gain.argmax())
        if gain[best] <= 0:
            break
        chosen.append(int(ids[best]))
        uncovered &= ~candidates[:, best].bool()
    return torch.tensor(chosen, dtype=torch.long)


STRATEGIES: dict[str, Strategy] = {"coverage": coverage, "f1": f1, "itd": itd, "mean_contrast": mean_contrast}


def _top_union(summaries: Tensor, n: int) -> Tensor:
    n = min(n, summaries.shape[-1])
    values, indices = summaries.topk(n, dim=-1)
    chosen = torch.zeros(summaries.shape[-1], dtype=torch.bool, device=summaries.device)
    chosen[indices[values > 0]] = True
    return chosen


def _share(summaries: Tensor) -> Tensor:
    mean = summaries.clamp_min(0).mean(0)
    return mean / mean.sum().clamp_min(1e-12)
