"""Exact TopK codes from a bf16 pre-screen: the encoder matmul at AMX speed, the fp32 selection.

On a CPU with AMX tiles a bf16 matmul runs about ten times faster than an fp32 one, and the encoder matmul is
most of a wide TopK SAE's cost at inference. The screen ranks every latent by its bf16 pre-activation, keeps each
row's `CANDIDATES_PER_K * k` best as candidates, recomputes those in fp32 (a sampled matmul: one dot product per
candidate) and keeps the k largest. A bound on the bf16 error says, row by row, whether the candidates surely hold
the fp32 top-k; rows where they might not are encoded the plain way. So the latents chosen are the fp32 ones and
their values are fp32 dot products (the plain path's up to summation order).

The bound. With x = x_hi + x_lo and w = w_hi + w_lo split into bf16 parts (the bias rides along as one more input
column), the bf16 product misses x_hi.w_lo + x_lo.w_hi + x_lo.w_lo, at most |x||w_lo| + |x_lo||w| + |x_lo||w_lo|
by Cauchy-Schwarz; fp32 accumulation adds at most 2 d 2^-24 |x||w| (either side's), and rounding the product to
bf16 at most 2^-8 of its magnitude. Every row then has a floor its k-th fp32 value cannot fall below, and a
ceiling no latent outside its candidates can rise above; the row is settled when the ceiling is under the floor.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .sparsifiers import row_topk

CANDIDATES_PER_K = 3  # candidates kept per selected latent: enough to settle every row of the benchmarks' data
MIN_D_IN = 256  # below this the fp32 matmul is cheap next to the selection, and the screen gains nothing
MIN_D_SAE = 4096
_PAD = 16  # the bf16 operands' width is a multiple of this (the AMX tile's)
_U = 2.0**-8  # bf16's unit roundoff


@functools.cache
def has_amx() -> bool:
    """Whether this CPU multiplies bf16 in AMX tiles (read from /proc/cpuinfo; False where it cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def screen_applies(x: Tensor, weight: Tensor) -> bool:
    """The screen pays where the fp32 matmul dominates: wide inputs and dictionaries, fp32 on an AMX CPU, and
    no gradient asked for (the sampled matmul's values are not differentiated)."""
    d_sae, d_in = weight.shape
    return (x.device.type == "cpu" and weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and d_in >= MIN_D_IN and d_sae >= MIN_D_SAE and has_amx())


class Bf16Encoder:
    """What the screen needs of the encoder, made once per version of its weights: (W | b) in bf16, the largest
    norms of its rows and of their bf16 residuals, and W row-major for the sampled matmul (an SAE in eval mode
    holds W_enc transposed in memory, which the sampled matmul would otherwise copy on every call)."""

    def __init__(self) -> None:
        self._key: tuple | None = None

    def operands(self, weight: Tensor, bias: Tensor) -> tuple[Tensor, float, float, Tensor]:
        key = (weight.data_ptr(), weight.stride(), weight._version, bias.data_ptr(), bias._version)
        if key != self._key:
            augmented = _augment(weight, bias)
            high = augmented.to(torch.bfloat16)
            residual = (augmented - high.float()).norm(dim=-1).max().item()
            self._parts = (high, residual, augmented.norm(dim=-1).max().item(), weight.contiguous())
            self._key = key
        return self._parts


def _augment(rows: Tensor, last: Tensor) -> Tensor:
    """(n, d) rows with `last` as one more column, zero-padded to a multiple of `_PAD` columns."""
    n, d = rows.shape
    out = rows.new_zeros(n, -(-(d + 1) // _PAD) * _PAD)
    out[:, :d] = rows
    out[:, d] = last
    return out


@torch.no_grad()
def screened_topk(x_c: Tensor, weight: Tensor, bias: Tensor, k: int, encoder: Bf16Encoder) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest of `x_c @ weight.T + bias` per row, both (rows, k), unordered."""
    rows = x_c.shape[0]
    width = min(CANDIDATES_PER_K * k, weight.shape[0])
    high_w, w_lo, w_norm, row_major = encoder.operands(weight, bias)
    x_aug = _augment(x_c, x_c.new_ones(rows))
    high_x = x_aug.to(torch.bfloat16)
    x_lo = (x_aug - high_x.float()).norm(dim=-1)
    x_norm = x_aug.norm(dim=-1)

    approx = F.linear(high_x, high_w).float()  # bf16 products, ranked in fp32 (CPU max-pool and top-k run faster)
    candidates = row_topk(approx, width)
    screened = approx.gather(-1, candidates).float()
    values = _sampled_linear(x_c, row_major, candidates) + bias[candidates]

    error = (x_norm * w_lo + x_lo * w_norm + x_lo * w_lo + 2 * x_aug.shape[1] * 2.0**-24 * x_norm * w_norm) * 1.01
    loose = _U / (1 - _U)
    floor = (screened - loose * screened.abs() - error[:, None]).topk(min(k, width), dim=-1).values[:, -1]
    outside = screened.amin(-1)  # no latent outside the candidates screened higher than this
    settled = (outside + loose * outside.abs() + error < floor) | (width == weight.shape[0])

    pick = values.topk(min(k, width), dim=-1, sorted=False).indices
    values, indices = values.gather(-1, pick), candidates.gather(-1, pick)
    unsettled = (~settled).nonzero().squeeze(1)
    if unsettled.numel():
        pre = F.linear(x_c[unsettled], weight, bias)
        plain = row_topk(pre, k)
        values[unsettled], indices[unsettled] = pre.gather(-1, plain), plain
    return values, indices


def _sampled_linear(x: Tensor, weight: Tensor, columns: Tensor) -> Tensor:
    """(rows, c) `x[r] . weight[columns[r, j]]` in fp32, without the rest of the matmul."""
    rows, c = columns.shape
    crow = torch.arange(0, rows * c + 1, c, device=x.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, columns.reshape(-1), x.new_zeros(rows * c), (rows, weight.shape[0]))
        return torch.sparse.sampled_addmm(pattern, x, weight.T, beta=0.0).values().view(rows, c)
