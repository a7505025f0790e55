"""Dense-forward, sparse-backward encoder pieces for SAEs whose codes keep a few latents per token.

The encoder pre-activations of a TopK-style SAE are dense (every latent must be ranked), but only k
latents per token receive gradient. `encoder_preacts` computes the pre-activations with the bias
folded into the GEMM (no separate pass writing a broadcast bias over the whole output), and
`gather_linear` returns the selected pre-activations with a backward pass that costs
O(tokens * k * d_in) instead of a second dense matmul: the weight gradient is a sparse
(d_sae x tokens) matrix times the input, and the centering bias gets its gradient from the encoder
bias gradient (d/d_center of W (x - c) = -W^T, summed over tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def encoder_preacts(x_c: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`x_c @ weight.T + bias` for a (B, d_in) batch, without gradient, as one GEMM."""
    ones = x_c.new_ones(x_c.shape[0], 1)
    return torch.mm(torch.cat([x_c, ones], 1), torch.cat([weight, bias[:, None]], 1).T)


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
        n_tokens = indices.numel() // k
        flat_idx = indices.reshape(-1)
        flat_grad = grad_values.reshape(-1).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices.reshape(-1, k), weight, per_sample_weights=flat_grad.view(-1, k),
                                     mode="sum").reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            rows = torch.arange(n_tokens, device=x.device).repeat_interleave(k)
            sparse = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), flat_grad, (weight.shape[0], n_tokens),
                                             check_invariants=False)
            x_c = x.reshape(n_tokens, -1).to(weight.dtype) - center.to(weight.dtype)
            grad_w = torch.sparse.mm(sparse, x_c)
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
