"""Training losses as free functions with one signature: `loss(step) -> scalar tensor`.

A variant's `training_forward` returns a `Step`; the trainer sums `coef * loss(step)` over the terms
the variant declares. Reconstruction is measured as the batch FVU, which is scale-free, so default
coefficients and learning rates carry over between activation sources of different magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from torch import Tensor

from .codes import SparseCodes

if TYPE_CHECKING:
    from .base import SAE


@dataclass
class Step:
    """Everything one training forward pass produced, for the loss functions to read."""

    sae: "SAE"
    x: Tensor  # (B, d_in) input
    x_hat: Tensor  # (B, d_in) reconstruction
    codes: SparseCodes  # the sparse codes used for x_hat
    pre_acts: Tensor | None = None  # (B, d_sae) pre-activations, detached
    dead_mask: Tensor | None = None  # (d_sae,) bool
    extras: dict[str, Tensor] = field(default_factory=dict)  # variant-specific intermediates

    def dead_latents(self) -> Tensor | None:
        """Indices of the latents past the dead window, or None when there are none or no pre-activations to revive
        them from (what AuxK and JumpReLU's threshold revival both start from)."""
        if self.dead_mask is None or self.pre_acts is None or not bool(self.dead_mask.any()):
            return None
        return self.dead_mask.nonzero().squeeze(-1)


Loss = Callable[[Step], Tensor]


def batch_variance(x: Tensor) -> Tensor:
    """Total variance of a batch: sum over dims of the per-dim variance (mean over tokens)."""
    return (x - x.mean(0)).pow(2).sum(-1).mean()


def fvu_of(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained of one batch: E|x - x_hat|^2 / (E|x|^2 - |E x|^2)."""
    return (x - x_hat).pow(2).sum(-1).mean() / batch_variance(x).clamp_min(1e-12)


def fvu(step: Step) -> Tensor:
    """Reconstruction loss: the batch FVU of `x_hat`."""
    return fvu_of(step.x, step.x_hat)


def auxk(step: Step) -> Tensor:
    """AuxK (Gao et al. 2024): dead latents reconstruct the residual `x - x_hat`.

    Reads `extras["auxk_recon"]` (decoded from the top-k_aux dead latents, no decoder bias) and the
    detached residual; normalised by the residual's variance and scaled by min(n_dead / k_aux, 1) as
    in sparsify, so a handful of dead latents does not dominate the loss.
    """
    recon = step.extras.get("auxk_recon")
    if recon is None:
        return step.x.new_zeros(())
    residual = (step.x - step.x_hat).detach()
    return step.extras["auxk_scale"] * fvu_of(residual, recon)


def multi_topk(step: Step) -> Tensor:
    """Multi-TopK (Gao et al. 2024): FVU of the reconstruction from the top 4k latents."""
    recon = step.extras.get("multi_topk_recon")
    return step.x.new_zeros(()) if recon is None else fvu_of(step.x, recon)


def l1_decoder_weighted(step: Step) -> Tensor:
    """L1 on codes weighted by decoder row norms (Anthropic's April 2024 update), per unit input scale.

    Divided by the batch's RMS deviation so the penalty, like the FVU, does not change when the
    activations are rescaled.
    """
    values, indices = step.codes
    norms = step.sae.W_dec.norm(dim=-1)[indices]
    scale = batch_variance(step.x).clamp_min(1e-12).sqrt()
    return (values.abs() * norms).sum(-1).mean() / scale


def l0(step: Step) -> Tensor:
    """Differentiable L0 count when the variant supplies one in `extras["l0"]` (e.g. JumpReLU)."""
    return step.extras["l0"].mean()
