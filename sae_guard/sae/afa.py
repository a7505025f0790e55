"""Approximate Feature Activation (AFA) diagnostics for any SAE (Lee, Davies, Canby, Hockenmaier 2025,
"Evaluating and Designing Sparse Autoencoders by Approximating Quasi-Orthogonality", arXiv 2503.24277).

If the h dictionary atoms are unit-norm and ε-quasi-orthogonal (|<d_i, d_j>| <= ε), the norm of a dense
activation z = sum_i f_i d_i bounds the norm of its feature activations:
    |z|^2 / (1 + ε(h-1))  <=  |f|^2  <=  |z|^2 / (1 - ε(h-1)),
so |f| ~ |z|. Codes far off that line over- or under-activate. Here f̃ is the code scaled by each
decoder row's norm (so non-unit decoders compare fairly) with |b_dec| appended as one more feature
(the bias is an atom that is always on), and h = d_sae + 1 counts it.

- `zf_data`: the ZF plot (|z| on x, |f̃| on y, ideal y = x) plus per-token εLBO and normalised MSE.
- `epsilon_lbo`: |(|z|^2 - |f̃|^2)| / ((h - 1) |f̃|^2), the smallest ε consistent with the token
  (lower = closer to quasi-orthogonal behaviour).
- `afa_error`: (|f̃| - |z|) / |z|, signed: positive = over-activation.
- `afa_cone`: the bounds above as curves, for shading the plot.
Only `sae.encode` and the weights are read, so SAEs of every architecture (and loaded ones) work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ZFData(NamedTuple):
    """Per-token arrays (CPU, float64) for the ZF plot and its companion violin of NMSE vs εLBO."""

    z_norm: Tensor  # |z|_2 of the dense activation
    f_norm: Tensor  # |f̃|_2: decoder-norm-scaled codes with |b_dec| appended
    epsilon_lbo: Tensor  # smallest quasi-orthogonality ε consistent with (|z|, |f̃|)
    nmse: Tensor  # |z - ẑ|^2 / |z|^2, the token's normalised reconstruction error


@torch.no_grad()
def zf_data(sae, x: Tensor, batch_size: int = 4096) -> ZFData:
    """ZF-plot data of `sae` on activations `x` (..., d_in), one entry per token."""
    x = x.reshape(-1, x.shape[-1])
    h = sae.d_sae + 1
    dec_norms = sae.W_dec.norm(dim=-1)
    bias_sq = sae.b_dec.pow(2).sum()
    parts = []
    for chunk in x.split(batch_size):
        chunk = chunk.to(sae.W_enc.device, sae.W_enc.dtype)
        codes = sae.encode(chunk)
        z_sq = chunk.pow(2).sum(-1)
        f_sq = (codes * dec_norms).pow(2).sum(-1) + bias_sq
        recon = codes @ sae.W_dec + sae.b_dec
        eps = (z_sq - f_sq).abs() / ((h - 1) * f_sq.clamp_min(1e-30))
        nmse = (chunk - recon).pow(2).sum(-1) / z_sq.clamp_min(1e-30)
        parts.append(torch.stack([z_sq.sqrt(), f_sq.sqrt(), eps, nmse]).double().cpu())
    z_norm, f_norm, eps, nmse = torch.cat(parts, dim=1) if parts else torch.zeros(4, 0, dtype=torch.float64)
    return ZFData(z_norm, f_norm, eps, nmse)


def epsilon_lbo(sae, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Per-token εLBO: the smallest quasi-orthogonality ε that explains the token's |z| and |f̃|."""
    return zf_data(sae, x, batch_size).epsilon_lbo


def afa_error(sae, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Per-token relative AFA error (|f̃| - |z|) / |z|: > 0 over-activation, < 0 under-activation."""
    data = zf_data(sae, x, batch_size)
    return (data.f_norm - data.z_norm) / data.z_norm.clamp_min(1e-30)


def afa_cone(z_norm: Tensor, eps_h: float) -> tuple[Tensor, Tensor]:
    """Lower and upper |f| allowed by the AFA bound for ε(h-1) = `eps_h` (the upper is inf for eps_h >= 1)."""
    if eps_h < 0:
        raise ValueError(f"eps_h = ε(h-1) must be >= 0, got {eps_h}")
    lower = z_norm / (1 + eps_h) ** 0.5
    upper = z_norm / (1 - eps_h) ** 0.5 if eps_h < 1 else torch.full_like(z_norm, float("inf"))
    return lower, upper
