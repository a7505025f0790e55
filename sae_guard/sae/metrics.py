"""Evaluation metrics, accumulated in float64 over a whole evaluation set.

FVU is the conventional `1 - R^2`: E|x - x_hat|^2 / (E|x|^2 - |E x|^2), pooled over the set (not a
mean of per-token ratios, and not relative to zero; the libraries disagree here, see
research/libraries.md section 3).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .codes import SparseCodes


class Accumulator:
    """Running sums for reconstruction and sparsity metrics over batches of (x, x_hat, codes)."""

    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.sum_x = None
        self.sum_sq_x = 0.0
        self.sum_sq_err = 0.0
        self.sum_cos = 0.0
        self.sum_xhat_sq = 0.0
        self.sum_dot = 0.0
        self.sum_l0 = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: SparseCodes) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        x_hat = x_hat.reshape(-1, x_hat.shape[-1]).double()
        self.n += x.shape[0]
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq_x += x.pow(2).sum().item()
        self.sum_sq_err += (x - x_hat).pow(2).sum().item()
        self.sum_cos += torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum().item()
        self.sum_xhat_sq += x_hat.pow(2).sum().item()
        self.sum_dot += (x * x_hat).sum().item()
        values = codes.values.reshape(-1, codes.k)
        fired = values != 0
        self.sum_l0 += fired.sum().item()
        indices = codes.indices.reshape(-1, codes.k)[fired]
        self.fire_counts += torch.bincount(indices.cpu(), minlength=self.fire_counts.numel()).double()

    def result(self, dense_threshold: float = 0.1) -> dict[str, float]:
        n = max(self.n, 1)
        mean = self.sum_x / n
        total_var = self.sum_sq_x / n - mean.pow(2).sum().item()
        density = self.fire_counts / n
        return {
            "fvu": (self.sum_sq_err / n) / max(total_var, 1e-30),
            "mse": self.sum_sq_err / n / mean.numel(),
            "l0": self.sum_l0 / n,
            "dead_fraction": (density == 0).double().mean().item(),
            "dense_fraction": (density > dense_threshold).double().mean().item(),
            "cosine": self.sum_cos / n,
            "relative_reconstruction_bias": self.sum_xhat_sq / max(self.sum_dot, 1e-30),
            "tokens": float(self.n),
        }


@torch.no_grad()
def evaluate(sae, data: Tensor | Iterable[Tensor], batch_size: int = 4096) -> dict[str, float]:
    """FVU, MSE, L0, dead and dense fractions, cosine and relative reconstruction bias of `sae` on data."""
    acc = Accumulator(sae.d_sae)
    batches = data.split(batch_size) if isinstance(data, Tensor) else data
    for x in batches:
        x = sae.check_input(x.to(sae.W_enc.device))
        codes = sae.encode_sparse(x)
        acc.update(x, sae.decode(codes), codes)
    return acc.result()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Pooled FVU of one set of activations (float64)."""
    x = x.reshape(-1, x.shape[-1]).double()
    x_hat = x_hat.reshape(-1, x_hat.shape[-1]).double()
    total = x.pow(2).sum(-1).mean() - x.mean(0).pow(2).sum()
    return ((x - x_hat).pow(2).sum(-1).mean() / total).item()


def ce_loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """Share of the loss gap between zero-ablating a site and leaving it clean that the SAE closes:
    1 = the SAE's reconstruction loses nothing, 0 = as bad as zeroing the site (SAELens' definition)."""
    gap = ablated - clean
    if abs(gap) < 1e-12:
        return float("nan")
    return (ablated - spliced) / gap


def kl_divergence(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """Per-position KL(clean || other) of next-token distributions, in nats (last dimension: the vocabulary)."""
    clean_logp = torch.log_softmax(clean_logits.float(), -1)
    other_logp = torch.log_softmax(other_logits.float(), -1)
    return (clean_logp.exp() * (clean_logp - other_logp)).sum(-1)
