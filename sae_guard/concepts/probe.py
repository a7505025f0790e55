"""A sparse linear readout of SAE latents: the `probe` feature strategy.

Some concepts live in no single latent. A dictionary of a few thousand latents has none for "Adam Driver", but
its latents for the name's parts and contexts, weighed together, tell the 50 celebrities to erase from 100 others
to keep. `probe` fits an L1-penalised logistic regression on each input's largest activation of every latent
(fit split, both classes weighted equally), and walks the penalty down until the next step would use more than
`n_features` latents. Weights are signed: a negative weight is a latent that speaks against the concept (another
person's name). A concept fitted this way scores an input as `sum_j w_j * max_t z_tj` over its real tokens
(`scoring.readout_scores`) and edits only its positive-weight latents.

Sparse probing of SAE latents follows Gao et al. 2024 and Kantamneni et al. 2025. The solver is glmnet's plan:
a path of penalties with warm starts, each solved (here by FISTA, intercept unpenalised) on the latents the
sequential strong rule keeps, then checked against the optimality conditions of all latents.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PATH_STEPS = 60  # penalties from the smallest that keeps every weight at zero down to PATH_FLOOR of it
PATH_FLOOR = 1e-4
MAX_ITERATIONS = 3000
TOLERANCE = 1e-3  # optimality: every gradient within this fraction of the penalty of its condition


def probe(target: Tensor, retain: Tensor, n_features: int = 256) -> tuple[Tensor, Tensor]:
    """The latents and signed weights of the L1 logistic probe with the smallest penalty on the path that uses at
    most `n_features` latents (if more enter at once, the strongest `n_features` of them). `target` (n_t, d_sae)
    and `retain` (n_r, d_sae) are per-input latent maxima."""
    if not retain.numel() or not target.numel():
        raise ValueError("probe needs both target and retain inputs to fit a readout")
    x = torch.cat([target, retain]).double()
    y = torch.cat([torch.ones(target.shape[0]), torch.zeros(retain.shape[0])]).double()
    sample = torch.where(y > 0, 0.5 / target.shape[0], 0.5 / retain.shape[0]).double()
    used = (x != 0).any(0).nonzero().squeeze(-1)  # latents silent on every input can only stay at zero
    x = x[:, used]
    weights, bias = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    gradient = _gradient(x, y, sample, weights, bias)
    lam_max = float(gradient.abs().max())
    best = (torch.zeros(0, dtype=torch.long), torch.zeros(0))
    previous = lam_max
    for lam in (torch.logspace(0, math.log10(PATH_FLOOR), PATH_STEPS, dtype=torch.float64) * lam_max).tolist()[1:]:
        active = (weights != 0) | (gradient.abs() >= 2 * lam - previous)  # the sequential strong rule
        while True:
            weights[active], bias = _fista(x[:, active], y, sample, lam, weights[active], bias)
            gradient = _gradient(x, y, sample, weights, bias)
            missed = ~active & (gradient.abs() > lam * (1 + TOLERANCE))
            if not missed.any():
                break
            active |= missed
        previous = lam
        nonzero = weights.nonzero().squeeze(-1)
        if nonzero.numel() > n_features:
            if not best[0].numel():  # the first latents enter together: keep the strongest of them
                nonzero = nonzero[weights[nonzero].abs().topk(n_features).indices.sort().values]
                best = (used[nonzero], weights[nonzero].float())
            break
        if nonzero.numel():
            best = (used[nonzero], weights[nonzero].float())
    return best


def _gradient(x: Tensor, y: Tensor, sample: Tensor, weights: Tensor, bias: Tensor) -> Tensor:
    return x.T @ (sample * (torch.sigmoid(x @ weights + bias) - y))


def _fista(x: Tensor, y: Tensor, sample: Tensor, lam: float, weights: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Minimise sum_i s_i * logloss(x_i w + b, y_i) + lam * |w|_1, starting from (weights, bias)."""
    step = 1.0 / _lipschitz(x, sample)
    w, b = weights.clone(), bias.clone()
    w_look, b_look, momentum = w.clone(), b.clone(), 1.0
    for iteration in range(MAX_ITERATIONS):
        residual = sample * (torch.sigmoid(x @ w_look + b_look) - y)
        gradient = x.T @ residual
        w_next = w_look - step * gradient
        w_next = w_next.sign() * (w_next.abs() - step * lam).clamp_min(0)
        b_next = b_look - step * residual.sum()
        momentum_next = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        w_look = w_next + (momentum - 1) / momentum_next * (w_next - w)
        b_look = b_next + (momentum - 1) / momentum_next * (b_next - b)
        w, b, momentum = w_next, b_next, momentum_next
        if iteration % 25 == 24 and _optimal(x, y, sample, lam, w, b):
            break
    return w, b


def _optimal(x: Tensor, y: Tensor, sample: Tensor, lam: float, w: Tensor, b: Tensor) -> bool:
    """The lasso's optimality conditions, within TOLERANCE: g_j = -lam sign(w_j) where w_j != 0, |g_j| <= lam
    elsewhere, and a zero intercept gradient."""
    residual = sample * (torch.sigmoid(x @ w + b) - y)
    gradient = x.T @ residual
    off = torch.where(w != 0, (gradient + lam * w.sign()).abs(), (gradient.abs() - lam).clamp_min(0))
    return (float(off.max()) if off.numel() else 0.0) <= TOLERANCE * lam and abs(float(residual.sum())) <= TOLERANCE * lam


def _lipschitz(x: Tensor, sample: Tensor, iterations: int = 30) -> float:
    """An upper bound on the curvature of the weighted logistic loss: |diag(sqrt(s)) [X 1]|_2^2 / 4."""
    rows = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) * sample.sqrt()[:, None]
    vector = torch.ones(rows.shape[1], dtype=x.dtype) / rows.shape[1] ** 0.5
    for _ in range(iterations):
        vector = rows.T @ (rows @ vector)
        vector = vector / vector.norm().clamp_min(1e-300)
    return float((rows @ vector).norm() ** 2) / 4 * 1.1 + 1e-12
