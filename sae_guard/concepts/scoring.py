"""Concept scores from SAE codes: per-token concept energy, per-input maximum over real tokens.

The energy of concept c at a token is the norm of what its features write there,
|sum_{j in F_c} z_j W_dec[j]| (ItD's "MSE when the features are flipped", without the SAE error and
the padding that made ItD's score depend on the batch). An input's score is its largest token
energy, so it depends on that input's real tokens alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sae.codes import SparseCodes, sparse_decode


def token_energies(codes: SparseCodes, members: Tensor, W_dec: Tensor) -> Tensor:
    """(N, C) energy of each of C concepts at each token; `members` is a (C, d_sae) bool matrix."""
    energies = []
    for member in members:
        inside = member[codes.indices]
        part = SparseCodes(torch.where(inside, codes.values, torch.zeros_like(codes.values)), codes.indices)
        energies.append(sparse_decode(part, W_dec).norm(dim=-1))
    if not energies:
        return codes.values.new_zeros(codes.values.shape[0], 0)
    return torch.stack(energies, -1)


def input_scores(energies: Tensor, input_index: Tensor, n_inputs: int) -> Tensor:
    """(n_inputs, C): each input's largest token energy (0 for an input with no real tokens)."""
    scores = energies.new_zeros(n_inputs, energies.shape[-1])
    index = input_index[:, None].expand_as(energies)
    return scores.scatter_reduce(0, index, energies, reduce="amax", include_self=True)


def max_activations(codes: SparseCodes, input_index: Tensor, n_inputs: int, d_sae: int) -> Tensor:
    """(n_inputs, d_sae): each latent's largest activation over each input's real tokens."""
    summary = codes.values.new_zeros(n_inputs * d_sae)
    flat = (input_index[:, None] * d_sae + codes.indices).reshape(-1)
    summary.scatter_reduce_(0, flat, codes.values.reshape(-1).clamp_min(0), reduce="amax", include_self=True)
    return summary.view(n_inputs, d_sae)
