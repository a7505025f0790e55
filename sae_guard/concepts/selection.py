"""Choosing a concept's SAE features from target and retain inputs.

Every strategy reads per-input summaries: `target` (n_t, d_sae) and `retain` (n_r, d_sae), each row
the maximum activation of every latent over that input's real tokens, and returns feature indices, or
(indices, weights) for a linear readout (`probe`). The strategies in `TOKEN_STRATEGIES` read every token's code
instead (`token_probe`: the encoder's (codes, input index, input count) of each side).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .probe import probe
from .token_probe import token_probe

Strategy = Callable[..., Tensor | tuple[Tensor, Tensor]]


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
    while len(chosen) < n_features and uncovered.any() and ids.numel():
        gain = candidates[uncovered].sum(0)
        best = int(gain.argmax())
        if gain[best] <= 0:
            break
        chosen.append(int(ids[best]))
        uncovered &= ~candidates[:, best].bool()
    return torch.tensor(chosen, dtype=torch.long)


def greedy_tpr(target: Tensor, retain: Tensor, n_features: int = 32, fpr: float = 0.01) -> Tensor:
    """Forward selection of the latents that most raise the target inputs' TPR at `fpr`, scored as the classifier.

    A concept's score is its largest token energy, and one latent's energy at a token is its activation (decoder
    rows have unit norm), so an input's score is close to the largest of its per-input maxima over the chosen
    latents. Each round adds the latent giving the highest TPR on target inputs at the threshold that flags
    `fpr` of the retain inputs (ties: the one leaving the lower threshold); it stops when no latent raises the TPR.

    Why another strategy: the others judge latents one at a time and by whether they fire, not by how strongly,
    while all of a concept's latents share one threshold: a latent firing strongly on a few retain inputs raises
    it for every other. On TopK SAEs of MiniLM prompts (4,096 latents, k=32) few latents stay under coverage's 1%
    retain firing rate (nudity TPR at most 0.30 at every layer), and f1 / itd / mean_contrast reach at most 0.81
    where this reaches 0.90, often losing TPR as they add latents (itd at layer 3: 0.64 with 32, 0.13 with 128);
    the table is in model_cards/minilm-prompts.md. `fpr` should match the concept's (Concept.fit passes only n_features; the
    default is the usual 1%).
    """
    if not retain.numel():
        raise ValueError("greedy_tpr needs retain inputs to set its threshold against")
    allowed = int(fpr * retain.shape[0] + 1e-9)  # retain inputs that may lie above the threshold
    target_by_latent, retain_by_latent = target.T.contiguous(), retain.T.contiguous()
    target_score, retain_score = target.new_zeros(target.shape[0]), retain.new_zeros(retain.shape[0])
    chosen: list[int] = []
    best_tpr = 0.0
    for _ in range(n_features):
        thresholds = torch.maximum(retain_by_latent, retain_score).topk(allowed + 1, dim=-1).values[:, -1]
        tpr = (torch.maximum(target_by_latent, target_score) > thresholds[:, None]).float().mean(-1)
        tpr[chosen] = -1.0
        top = float(tpr.max())
        if top <= best_tpr:
            break
        tied = (tpr == top).nonzero().squeeze(-1)
        pick = int(tied[thresholds[tied].argmin()])
        chosen.append(pick)
        best_tpr = top
        target_score = torch.maximum(target_score, target_by_latent[pick])
        retain_score = torch.maximum(retain_score, retain_by_latent[pick])
    return torch.tensor(chosen, dtype=torch.long)


STRATEGIES: dict[str, Strategy] = {"coverage": coverage, "f1": f1, "itd": itd, "mean_contrast": mean_contrast,
                                   "greedy_tpr": greedy_tpr, "probe": probe, "token_probe": token_probe}
TOKEN_STRATEGIES = frozenset({"token_probe"})  # fitted on token codes; an input's score is its best token's


def _top_union(summaries: Tensor, n: int) -> Tensor:
    n = min(n, summaries.shape[-1])
    values, indices = summaries.topk(n, dim=-1)
    chosen = torch.zeros(summaries.shape[-1], dtype=torch.bool, device=summaries.device)
    chosen[indices[values > 0]] = True
    return chosen


def _share(summaries: Tensor) -> Tensor:
    mean = summaries.clamp_min(0).mean(0)
    return mean / mean.sum().clamp_min(1e-12)
