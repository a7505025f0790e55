"""Concept scores from SAE codes, over each input's real tokens only, so they never depend on the batch.

Three readouts:
- energy (features picked without weights): the energy of concept c at a token is the norm of what its features
  write there, |sum_{j in F_c} z_j W_dec[j]| (ItD's "MSE when the features are flipped", without the SAE error
  and the padding that made ItD's score depend on the batch); an input's score is its largest token energy.
- linear (features with signed weights, `probe`): an input's score is sum_j w_j * max_t z_tj, its largest
  activation of each feature weighed; the tokens it rests on hold a positive-weight feature's maximum.
- token (features with signed weights, `token_probe`): a token's score is sum_j w_j * z_tj over its own code, an
  input's score its largest token score; the tokens it rests on are those whose own score passes the threshold.
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


def feature_slots(features: Tensor, d_sae: int, device: torch.device | str = "cpu") -> Tensor:
    """(d_sae,) each latent's position in `features`, -1 for the others: how a linear readout finds its columns."""
    slot = torch.full((d_sae,), -1, dtype=torch.long, device=device)
    slot[features.to(slot.device)] = torch.arange(features.numel(), device=slot.device)
    return slot


def readout_scores(codes: SparseCodes, input_index: Tensor, n_inputs: int, slot: Tensor, weights: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """(n_inputs,) linear readout of each input's feature maxima, and (N,) the tokens holding a positive-weight
    feature's maximum (what the score rests on). `slot` is `feature_slots` of the readout's features; the work is
    on their columns only, never on all of d_sae."""
    n_features = weights.numel()
    entry_slot, inside, values = _slotted(codes, slot)
    maxima = codes.values.new_zeros(n_inputs * n_features)
    maxima.scatter_reduce_(0, (input_index[:, None] * n_features + entry_slot).reshape(-1), values.reshape(-1),
                           reduce="amax", include_self=True)
    maxima = maxima.view(n_inputs, n_features)
    weights = weights.to(maxima)
    holds = inside & (values > 0) & (values == maxima[input_index[:, None], entry_slot]) & (weights[entry_slot] > 0)
    return (maxima * weights).sum(-1), holds.any(-1)  # row by row: an input's score never depends on its batch


def token_scores(codes: SparseCodes, slot: Tensor, weights: Tensor) -> Tensor:
    """(N,) each token's readout `sum_j w_j z_tj` over the readout's latents (`slot`: `feature_slots`)."""
    entry_slot, _, values = _slotted(codes, slot)
    return (weights.to(values)[entry_slot] * values).sum(-1)


def token_readout_scores(codes: SparseCodes, input_index: Tensor, n_inputs: int, slot: Tensor, weights: Tensor,
                         threshold: float | None) -> tuple[Tensor, Tensor]:
    """(n_inputs,) each input's largest token score and (N,) the tokens whose own score is above `threshold`: what
    the verdict rests on."""
    per_token = token_scores(codes, slot, weights)
    return input_maxima(per_token, input_index, n_inputs), per_token > (threshold if threshold is not None else 0.0)


def input_maxima(per_token: Tensor, input_index: Tensor, n_inputs: int) -> Tensor:
    """(n_inputs,) each input's largest per-token value, which may be negative; 0 for an input without tokens."""
    top = per_token.new_full((n_inputs,), float("-inf"))
    top = top.scatter_reduce(0, input_index.to(top.device), per_token, reduce="amax", include_self=True)
    return torch.where(torch.isinf(top), torch.zeros_like(top), top)


def _slotted(codes: SparseCodes, slot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per code entry (N, k): the latent's slot in a readout (0 for other latents), whether it is one of the
    readout's, and its activation there (0 elsewhere, never negative)."""
    entry_slot = slot.to(codes.indices.device)[codes.indices]  # -1 for latents outside the readout
    inside = entry_slot >= 0
    values = torch.where(inside, codes.values.clamp_min(0), torch.zeros_like(codes.values))
    return entry_slot.clamp_min(0), inside, values


def latent_contributions(codes: SparseCodes, token_index: Tensor, lookup: Tensor, weights: Tensor | None,
                         W_dec: Tensor, top: int = 5) -> list[dict]:
    """The latents that carried a concept on one input's tokens (`codes`, `token_index`: that input's rows only).

    Each latent counts at its largest activation, as the score reads it; its contribution is weight x activation
    for a linear readout, activation x |W_dec row| (what it writes) for an energy readout. The `top` largest
    positive contributions, largest first, each with the token position holding the activation: why an input was
    flagged, in the terms the score used. Only asked for by `--explain`, so verdicts stay cheap without it.
    """
    indices, values = codes.indices, codes.values.clamp_min(0)
    if weights is not None:
        slot = lookup.to(indices.device)[indices]
        inside = slot >= 0
        per_entry = torch.where(inside, weights.to(values)[slot.clamp_min(0)], torch.zeros_like(values))
    else:
        inside = lookup.to(indices.device)[indices]
        per_entry = W_dec.norm(dim=-1).to(values)[indices] * inside
    keep = inside & (values > 0)
    tokens = token_index[:, None].expand_as(indices)
    best: dict[int, tuple[float, int, float]] = {}
    for latent, value, token, weight in zip(indices[keep].tolist(), values[keep].tolist(), tokens[keep].tolist(),
                                            per_entry[keep].tolist()):
        if latent not in best or value > best[latent][0]:
            best[latent] = (value, token, weight)
    rows = [{"latent": latent, "token": token, "activation": value, "contribution": value * weight}
            for latent, (value, token, weight) in best.items() if value * weight > 0]
    return sorted(rows, key=lambda row: -row["contribution"])[:top]
