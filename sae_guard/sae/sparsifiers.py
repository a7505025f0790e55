"""Selection operators: which entries of a (B, d_sae) score matrix a sparse code keeps.

Pure functions over a batch of scores (pre-activations, or their magnitudes), shared by the TopK
family. Each answers one question: which latents does a token keep? Per row (TopK, AbsTopK), over the
whole batch (BatchTopK, Mutual Choice), per column with capacities (Feature Choice), or per row with a
data-dependent count (top-AFA). Selections that are not a fixed k per row come back as a boolean mask,
and `mask_to_codes` turns any mask into zero-padded per-row sparse codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .codes import SparseCodes

SAMPLE_SIZE = 65536  # entries sampled to pre-filter a batch-level top-k
AFA_START_WIDTH = 32  # first search width of top-AFA's per-token k


def row_topk(scores: Tensor, k: int) -> Tensor:
    """Indices (..., k) of the k largest scores of each row (TopK), unordered.

    Wide rows go through an exact grouped selection: the k best groups by their maxima hold every top-k entry (an
    entry at least the k-th largest makes its group's maximum so too, and at most k groups can), then the top-k among
    those groups' members. The best groups are themselves chosen the same way while the maxima are still wide. On a
    CPU that takes 0.4-0.65x the time of `torch.topk` where the dictionary is a few dozen or hundred times wider than
    k, as for the gate's per-position work on a vision backbone's tokens."""
    width = scores.shape[-1]
    k = min(k, width)
    group = _group_size(width, k)
    if group is None or scores.device.type != "cpu":
        return scores.topk(k, dim=-1, sorted=False).indices
    lead, rows = scores.shape[:-1], scores.reshape(-1, width)
    groups = -(-width // group)
    if groups * group != width:
        rows = F.pad(rows, (0, groups * group - width), value=float("-inf"))
    maxima = F.max_pool1d(rows.unsqueeze(1), group, group).squeeze(1)  # 2.5x faster than amax over groups of 4
    best_groups = row_topk(maxima, k)
    members = (best_groups.unsqueeze(-1) * group + torch.arange(group, device=scores.device)).flatten(-2)
    local = rows.gather(-1, members).topk(k, dim=-1, sorted=False).indices
    return members.gather(-1, local).reshape(*lead, k)


def _group_size(width: int, k: int) -> int | None:
    """Members per group for `row_topk`, or None for one `torch.topk`. Measured on one CPU thread: grouping takes
    0.4-0.65x the time of one `torch.topk` where the row is 24x k or wider (groups of 4 up to 80x, then 8; 196 x
    1,792 and 1,576 x 12,288 rows with k = 32), and gains nothing reliable on rows under 512. CPU only: elsewhere
    one `torch.topk` serves."""
    if width < 512 or width < 24 * k:
        return None
    return 4 if width < 80 * k else 8


def abs_topk(pre: Tensor, k: int) -> SparseCodes:
    """The k largest |pre| of each row with their signs kept (AbsTopK: hard thresholding, no ReLU)."""
    indices = row_topk(pre.abs(), k)
    return SparseCodes(pre.gather(-1, indices), indices)


def batch_topk_mask(scores: Tensor, k: float) -> Tensor:
    """Mask of the round(k * B) largest scores of the whole (B, d_sae) matrix (BatchTopK, Mutual Choice).

    Tokens share one budget of k per token on average, so hard tokens can take more latents than easy ones.
    A full top-k over B * d_sae entries is slow on CPU, so the entries below a floor taken from a strided
    sample (about twice the budget lies above it) are dropped first; when fewer than the budget pass the
    floor, the full top-k runs instead, so the result is exact either way.
    """
    flat = scores.reshape(-1)
    budget = max(1, min(round(k * scores.shape[0]), flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    stride = max(1, flat.numel() // SAMPLE_SIZE)
    while stride > 1 and math.gcd(stride, scores.shape[-1]) != 1:  # sample every column
        stride += 1
    sample = flat[::stride]
    above = min(sample.numel(), math.ceil(2 * budget * sample.numel() / flat.numel()) + 64)
    candidates = (flat >= sample.topk(above, sorted=False).values.min()).nonzero().squeeze(1)
    if candidates.numel() >= budget:
        mask[candidates[flat[candidates].topk(budget, sorted=False).indices]] = True
    else:
        mask[flat.topk(budget, sorted=False).indices] = True
    return mask.view_as(scores)


def batch_topk(values: Tensor, k: float, by_abs: bool = False) -> SparseCodes:
    """BatchTopK as zero-padded per-row codes: the k * B largest non-zero `values` (or |values|) of the batch."""
    mask = batch_topk_mask(values.abs() if by_abs else values, k) & (values != 0)
    return mask_to_codes(values, mask)


def column_capacity_mask(scores: Tensor, capacities: Tensor) -> Tensor:
    """Mask keeping, in each column i, its top `capacities[i]` rows (Feature Choice: features pick tokens).

    Columns are ranked in groups of similar capacity (the next power of two), so the few features with
    large capacities do not make every column pay for a wide top-k.
    """
    n_rows = scores.shape[0]
    capacities = capacities.clamp(0, n_rows).long()
    widths = (2 ** torch.log2(capacities.clamp_min(1).double()).ceil()).long().clamp_max(n_rows)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    columns = scores.T
    for width in widths[capacities > 0].unique().tolist():
        cols = ((widths == width) & (capacities > 0)).nonzero().squeeze(1)
        rows = columns[cols].topk(width, dim=-1, sorted=True).indices  # best rows first
        keep = torch.arange(width, device=scores.device) < capacities[cols, None]
        mask[rows[keep], cols[:, None].expand_as(rows)[keep]] = True
    return mask


def afa_topk(contributions: Tensor, target_norm: Tensor) -> tuple[Tensor, Tensor]:
    """top-AFA: per row, the prefix of largest contributions whose norm best matches `target_norm`.

    `contributions` (..., d_sae) are squared decoded magnitudes (a_i |W_dec_i|)^2 and `target_norm` (...)
    the norm to match (|x - b_dec|), so that |f| ~ |x| (the approximate feature activation). Each row
    keeps k(x) = argmin_j |sqrt(cumsum_j) - target| + 1 latents. Returns the indices (..., max k) in
    descending order of contribution and the mask of the entries each row keeps.
    The cumulative norm only grows, so the best prefix is where it crosses the target: a top-w search
    is exact once every row has crossed within w or run out of positive contributions; w doubles until then.
    """
    d = contributions.shape[-1]
    width = min(d, AFA_START_WIDTH)
    while True:
        ordered, order = contributions.topk(width, dim=-1, sorted=True)
        cumulative = ordered.cumsum(-1).sqrt()
        unresolved = (cumulative[..., -1] < target_norm) & (ordered[..., -1] > 0)
        if width == d or not bool(unresolved.any()):
            break
        width = min(d, 2 * width)
    ks = (cumulative - target_norm[..., None]).abs().argmin(-1) + 1
    k_max = int(ks.max().item()) if ks.numel() else 1
    keep = torch.arange(k_max, device=contributions.device) < ks[..., None]
    return order[..., :k_max], keep


def mask_to_codes(values: Tensor, mask: Tensor) -> SparseCodes:
    """Zero-padded per-row sparse codes of `values` where `mask` holds; width = the largest row count.

    Padding entries have value 0 and index 0, so they change neither a decode nor a dense scatter.
    """
    d = mask.shape[-1]
    flat = mask.reshape(-1, d)
    rows, cols = flat.nonzero(as_tuple=True)  # row-major: each row's columns are contiguous
    counts = torch.bincount(rows, minlength=flat.shape[0])
    width = max(1, int(counts.max().item()) if counts.numel() else 1)
    slot = torch.arange(rows.numel(), device=mask.device) - (counts.cumsum(0) - counts)[rows]
    indices = torch.zeros(flat.shape[0], width, dtype=torch.long, device=mask.device)
    indices[rows, slot] = cols
    kept = values.new_zeros(flat.shape[0], width)
    kept[rows, slot] = values.reshape(-1, d)[rows, cols]
    lead = mask.shape[:-1]
    return SparseCodes(kept.reshape(*lead, width), indices.reshape(*lead, width))
