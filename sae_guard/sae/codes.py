"""Sparse codes: the (values, indices) form every SAE in sae_guard uses inside.

A dense code tensor of shape (..., d_sae) is mostly zeros. Inside the library codes travel as the
k (or fewer) non-zero entries per token; rows with fewer non-zeros are padded with zero values, so
padding never changes a reconstruction. `decode` of sparse codes is an embedding-bag over the
decoder rows: k * d_in work per token instead of d_sae * d_in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .kernels import decode


class SparseCodes(NamedTuple):
    """Non-zero latent activations per token: `values` and `indices`, both of shape (..., k)."""

    values: Tensor
    indices: Tensor

    def to_dense(self, d_sae: int) -> Tensor:
        """Scatter into a dense (..., d_sae) tensor."""
        dense = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return dense.scatter_add_(-1, self.indices, self.values)

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def l0(self) -> Tensor:
        """Number of non-zero latents per token."""
        return (self.values != 0).sum(-1)


def dense_to_sparse(dense: Tensor, k: int | None = None) -> SparseCodes:
    """Keep the non-zero entries of `dense` as sparse codes.

    `k` bounds how many entries per token are kept; by default, the largest count of non-zeros in any
    row, so nothing is lost and short rows are zero-padded.
    """
    if k is None:
        k = int((dense != 0).sum(-1).max().item()) if dense.numel() else 0
    k = max(1, min(k, dense.shape[-1]))
    _, indices = dense.abs().topk(k, dim=-1, sorted=False)
    return SparseCodes(dense.gather(-1, indices), indices)


def sparse_decode(codes: SparseCodes, W_dec: Tensor) -> Tensor:
    """Sum of `values * W_dec[indices]` per token, without forming the dense code matrix."""
    values, indices = codes
    k = indices.shape[-1]
    out = decode(values.reshape(-1, k), indices.reshape(-1, k), W_dec)
    return out.reshape(*values.shape[:-1], W_dec.shape[-1])


def discrete_codes(codes: Tensor | SparseCodes) -> Tensor:
    """One integer per token: the index of its most active latent (-1 where nothing fires).

    Turns any SAE's codes into the discrete codes used for circuit discovery (O'Neill & Bui, 2024),
    where each attention head's output on a prompt is summarised by its argmax latent.
    """
    if isinstance(codes, SparseCodes):
        best = codes.values.abs().argmax(-1, keepdim=True)
        idx = codes.indices.gather(-1, best).squeeze(-1)
        fired = codes.values.gather(-1, best).squeeze(-1) != 0
    else:
        idx = codes.abs().argmax(-1)
        fired = codes.abs().amax(-1) > 0
    return torch.where(fired, idx, torch.full_like(idx, -1))
