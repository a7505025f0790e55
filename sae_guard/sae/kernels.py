"""Autograd functions whose backward passes touch only the latents that fired.

The encoder pre-activations of a TopK-style SAE are dense (every latent must be ranked), but only k
latents per token receive gradient. `gather_linear` returns the selected pre-activations with a
backward pass that costs O(tokens * k * d_in) instead of a second dense matmul: the weight gradient
is a sparse (d_sae x tokens) matrix times the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, pre: Tensor):
        ctx.save_for_backward(x, weight, indices)
        ctx.has_bias = bias is not None
        return pre.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, weight, indices = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        k = indices.shape[-1]
        flat_idx = indices.reshape(-1)
        flat_grad = grad_values.reshape(-1).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(
                indices.reshape(-1, k), weight, per_sample_weights=grad_values.reshape(-1, k).to(weight.dtype),
                mode="sum",
            ).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            n_tokens = flat_idx.numel() // k
            rows = torch.arange(n_tokens, device=x.device).repeat_interleave(k)
            sparse = torch.sparse_coo_tensor(
                torch.stack([flat_idx, rows]), flat_grad, (weight.shape[0], n_tokens), check_invariants=False
            )
            grad_w = torch.sparse.mm(sparse, x.reshape(n_tokens, -1).to(weight.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, flat_idx, flat_grad)
        return grad_x, grad_w, grad_b, None, None


def gather_linear(x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, pre: Tensor) -> Tensor:
    """`(x @ weight.T + bias).gather(-1, indices)`, reusing the already computed `pre`.

    `pre` must equal `F.linear(x, weight, bias)` (computed without grad); only the gathered entries
    carry gradient, and their backward is sparse.
    """
    return _GatherLinear.apply(x, weight, bias, indices, pre)
