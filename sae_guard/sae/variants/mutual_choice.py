"""Mutual Choice and Feature Choice SAEs (Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice
& Feature Choice Sparse Autoencoders", arXiv 2411.02124).

Sparse coding as allocation: a batch of B tokens has a budget of k * B token-feature matches.
- Mutual Choice: no further constraint, the k * B largest activations of the batch win (the BatchTopK
  rule), so both tokens and features get a variable share.
- Feature Choice: each feature i takes at most m_i tokens, its top m_i in the batch, with capacities
  following a Zipf law over features ranked by how often they fire, sum m_i = k * B. No feature can be
  starved of tokens, which is how the paper reaches ~0 dead latents.
- aux_zipf_loss generalises AuxK from dead latents to under-used ones: latents firing less than
  `zipf_tolerance` times the Zipf density expected at their rank learn to reconstruct the residual.

The paper's exact formulas are not public in code, so these are the choices made here:
- Zipf law: expected density of the rank-r feature (r = 1 densest) is k * r^-a / sum_j j^-a, with
  a = `zipf_exponent` (default 1, the classic Zipf); ranks come from an EMA of each feature's firing
  rate (decay `density_decay` per step), saved as the buffer `feature_density`.
- Capacities m_i = k * B * that share, capped at B with the excess redistributed; "at most": a feature
  keeps only tokens where it is positive.
- Inference must not depend on the batch, so, as in BatchTopK, thresholds learned during training as
  an EMA of the smallest kept activation replace the batch selection: one shared threshold for Mutual
  Choice, one per feature (shape (d_sae,), a JumpReLU) for Feature Choice, whose selection is per feature.
- Dead latents keep BatchTopK's AuxK. aux_zipf_loss is AuxK's formula (the top-k_aux flagged latents
  decode the residual, variance-normalised) over the latents that fire but too rarely, with their
  decoder rows held fixed: an under-used feature should learn to fire more often, not change what it
  means. (Sharing AuxK's k_aux slots with them instead left the dead latents crowded out: 36% dead.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..codes import SparseCodes, sparse_decode
from ..losses import Step, fvu_of
from ..registry import register
from ..sparsifiers import column_capacity_mask, mask_to_codes
from .batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass
class MutualChoiceConfig(BatchTopKConfig):
    aux_zipf_coef: float = 1 / 32  # training: weight of aux_zipf_loss
    zipf_exponent: float = 1.0  # training: exponent a of the Zipf law over feature ranks
    zipf_tolerance: float = 0.5  # training: under-used = firing below this share of the expected Zipf density
    density_decay: float = 0.99  # training: EMA decay of each feature's firing rate, per step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aux_zipf_coef < 0:
            raise ValueError(f"aux_zipf_coef must be >= 0, got {self.aux_zipf_coef}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        if self.zipf_tolerance < 0:
            raise ValueError(f"zipf_tolerance must be >= 0, got {self.zipf_tolerance}")
        if not 0 <= self.density_decay < 1:
            raise ValueError(f"density_decay must be in [0, 1), got {self.density_decay}")


def zipf_shares(n: int, exponent: float, device: torch.device | None = None) -> Tensor:
    """Share r^-a / sum_j j^-a of the rank-r item, r = 1..n."""
    weights = torch.arange(1, n + 1, device=device, dtype=torch.float64).pow(-exponent)
    return (weights / weights.sum()).float()


def density_ranks(density: Tensor) -> Tensor:
    """Rank of each feature by firing rate, 0 = densest (ties broken by index)."""
    order = density.argsort(descending=True, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def zipf_capacities(density: Tensor, total: int, exponent: float, cap: int) -> Tensor:
    """Tokens each feature may take: `total` split by Zipf share of its rank, capped at `cap`.

    What a capped feature cannot take is shared among the others in proportion to their shares.
    """
    share = zipf_shares(density.numel(), exponent, density.device)[density_ranks(density)]
    capacity = total * share
    for _ in range(density.numel()):
        over = capacity > cap
        if not over.any():
            break
        excess = (capacity[over] - cap).sum()
        capacity[over] = cap
        free = capacity < cap
        if not free.any():
            break
        capacity[free] += excess * share[free] / share[free].sum()
    return capacity.floor().long()


def aux_zipf_loss(step: Step) -> Tensor:
    """Under-used latents learn when to fire: their top pre-activations decode the residual x - x_hat."""
    recon = step.extras.get("aux_zipf_recon")
    if recon is None:
        return step.x.new_zeros(())
    residual = (step.x - step.x_hat).detach()
    return step.extras["aux_zipf_scale"] * fvu_of(residual, recon)


@register("mutual_choice")
class MutualChoiceSAE(BatchTopKSAE):
    """BatchTopK's selection read as Mutual Choice, with aux_zipf_loss for under-used latents besides AuxK."""

    config_class = MutualChoiceConfig
    cfg: MutualChoiceConfig

    def __init__(self, cfg: MutualChoiceConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("feature_density", torch.zeros(cfg.d_sae))

    @torch.no_grad()
    def underused_mask(self) -> Tensor:
        """Latents firing below `zipf_tolerance` times the Zipf density expected at their rank."""
        shares = zipf_shares(self.d_sae, self.cfg.zipf_exponent, self.feature_density.device)
        expected = self.cfg.k * shares[density_ranks(self.feature_density)]
        return self.feature_density < self.cfg.zipf_tolerance * expected

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> Step:
        step = super().training_forward(x, dead_mask)
        flagged = self.underused_mask()
        if dead_mask is not None:
            flagged &= ~dead_mask  # dead latents have AuxK
        if not bool(flagged.any()):
            return step
        candidates = flagged.nonzero().squeeze(-1)
        k = min(self.k_aux, candidates.numel())
        indices = candidates[step.pre_acts.index_select(-1, candidates).topk(k, dim=-1, sorted=False).indices]
        values = F.relu(self.gather_preacts(x, step.pre_acts, indices))
        step.extras["aux_zipf_recon"] = sparse_decode(SparseCodes(values, indices), self.W_dec.detach())
        step.extras["aux_zipf_scale"] = x.new_tensor(min(candidates.numel() / self.k_aux, 1.0))
        return step

    def loss_terms(self):
        return {**super().loss_terms(), "aux_zipf": (self.cfg.aux_zipf_coef, aux_zipf_loss)}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        super().after_optimizer_step(step)
        values, indices = step.codes
        fired = torch.zeros_like(self.feature_density)
        fired.index_add_(0, indices[values != 0], torch.ones_like(values[values != 0], dtype=fired.dtype))
        rate = fired / values.shape[0]
        decay = self.cfg.density_decay
        started = self.feature_density.sum() > 0
        self.feature_density.copy_(torch.where(started, decay * self.feature_density + (1 - decay) * rate, rate))


@register("feature_choice")
class FeatureChoiceSAE(MutualChoiceSAE):
    """Each feature picks its top m_i tokens of the batch; per-feature thresholds at inference."""

    @property
    def threshold_shape(self) -> tuple[int, ...]:
        return (self.d_sae,)

    def capacities(self, batch_size: int) -> Tensor:
        total = round(self.cfg.k * batch_size)
        return zipf_capacities(self.feature_density, total, self.cfg.zipf_exponent, batch_size)

    def select_batch(self, pre: Tensor) -> SparseCodes:
        values = F.relu(pre)
        mask = column_capacity_mask(values, self.capacities(pre.shape[0])) & (values > 0)
        return mask_to_codes(values, mask)

    @torch.no_grad()
    def kept_minimum(self, codes: SparseCodes) -> tuple[Tensor, Tensor]:
        """Per feature: the smallest activation it kept in this batch, and whether it kept any."""
        values, indices = codes
        kept = values != 0
        smallest = torch.full((self.d_sae,), float("inf"), device=values.device)
        smallest.scatter_reduce_(0, indices[kept], values[kept].detach().abs().float(), reduce="amin")
        return smallest, torch.isfinite(smallest)
