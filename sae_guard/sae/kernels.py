"""Dense-forward, sparse-backward pieces for SAEs whose codes keep a few latents per token.

The encoder pre-activations of a TopK-style SAE are dense (every latent must be ranked), but only k
latents per token receive gradient. `encoder_preacts` computes the pre-activations once, without
gradient, and `gather_linear` returns the selected pre-activations with a backward pass that costs
O(tokens * k * d_in) instead of a second dense matmul. `decode` is the sparse decoder with the same
kind of backward. Both weight gradients have one shape: a sparse (d_sae x tokens) matrix with k
entries per token times a dense (tokens x d_in) matrix (`latent_rows_matmul`); the centering bias
gets its gradient from the encoder bias gradient (d/d_center of W (x - c) = -W^T, summed over tokens).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def encoder_preacts(x_c: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`x_c @ weight.T + bias` for a (B, d_in) batch, without gradient (one addmm)."""
    return F.linear(x_c, weight, bias)


def latent_rows_matmul(indices: Tensor, entries: Tensor, dense: Tensor, d_sae: int) -> Tensor:
    """`S @ dense` for the (d_sae x tokens) matrix S with S[indices[t, j], t] += entries[t, j].

    The weight gradient of a k-sparse layer. On CPU the entries are grouped by latent once (a stable
    sort, so tokens stay in order) and multiplied as CSR, about 4x faster than a COO product or
    embedding_bag's own backward at SAE shapes; elsewhere a COO product.
    """
    k = indices.shape[-1]
    flat_idx, flat_entries = indices.reshape(-1), entries.reshape(-1).to(dense.dtype)
    n_tokens = flat_idx.numel() // max(k, 1)
    if dense.device.type == "cpu":
        order = flat_idx.argsort(stable=True)
        crow = torch.zeros(d_sae + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(flat_idx, minlength=d_sae), 0, out=crow[1:])
        return _csr(crow, order // k, flat_entries[order], (d_sae, n_tokens)) @ dense
    rows = torch.arange(n_tokens, device=dense.device).repeat_interleave(k)
    matrix = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), flat_entries, (d_sae, n_tokens),
                                     check_invariants=False)
    return torch.sparse.mm(matrix, dense)


def rows_dot(indices: Tensor, a: Tensor, table: Tensor) -> Tensor:
    """`(table[indices[t, j]] * a[t]).sum(-1)` for every (t, j), without gathering the rows."""
    n_tokens, k = indices.shape
    if a.device.type == "cpu":  # a sampled GEMM, about 1.5x faster than embedding_bag's backward here
        crow = torch.arange(0, n_tokens * k + 1, k, device=a.device)
        pattern = _csr(crow, indices.reshape(-1), a.new_zeros(n_tokens * k), (n_tokens, table.shape[0]))
        return torch.sparse.sampled_addmm(pattern, a, table.T, beta=0.0).values().view(n_tokens, k)
    return torch.bmm(table[indices], a[:, :, None]).squeeze(-1)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size)


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor):
        ctx.save_for_backward(values, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype)
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = rows_dot(indices, grad_out, weight).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = latent_rows_matmul(indices, values, grad_out, weight.shape[0])
        return grad_values, None, grad_w


def decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """`sum_j values[t, j] * weight[indices[t, j]]` for (tokens, k) codes, with a sparse backward."""
    return _Decode.apply(values.to(weight.dtype), indices, weight)


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, center: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, pre: Tensor):
        ctx.save_for_backward(x, center, weight, indices)
        return pre.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, center, weight, indices = ctx.saved_tensors
        grad_x = grad_center = grad_w = grad_b = None
        k = indices.shape[-1]
        flat_idx = indices.reshape(-1)
        flat_grad = grad_values.reshape(-1).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices.reshape(-1, k), weight, per_sample_weights=flat_grad.view(-1, k),
                                     mode="sum").reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            x_c = x.reshape(-1, x.shape[-1]).to(weight.dtype) - center.to(weight.dtype)
            grad_w = latent_rows_matmul(indices, grad_values, x_c, weight.shape[0])
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[1]:
            per_latent = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            per_latent.index_add_(0, flat_idx, flat_grad)
            grad_b = per_latent if ctx.needs_input_grad[3] else None
            if ctx.needs_input_grad[1]:
                grad_center = -(per_latent @ weight).to(center.dtype)
        return grad_x, grad_center, grad_w, grad_b, None, None


def gather_linear(x: Tensor, center: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, pre: Tensor) -> Tensor:
    """`(weight @ (x - center) + bias).gather(-1, indices)`, reusing the already computed `pre`.

    `pre` must equal that affine map of the (B, d_in) batch `x` (computed without grad); only the
    gathered entries carry gradient, and their backward is sparse.
    """
    return _GatherLinear.apply(x, center, weight, bias, indices, pre)
