"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", arXiv 2503.17547).

The dictionary is split into nested prefix groups, and every prefix (the first group, the first two,
..., the whole dictionary) must reconstruct the input on its own. Early latents are therefore pushed
to hold general, high-level features and later ones to refine them, which reduces feature absorption
and splitting as the dictionary grows. The paper's codes come from BatchTopK over the whole dictionary
(with its learned inference threshold); the loss is the weighted mean of the prefixes' FVUs, plus AuxK.

Default selection: per token (`selection="token"`: the top k of each token in training and at inference),
not the paper's BatchTopK (`selection="batch"`). Under the batch rule the late groups learn late: their
latents fire for few tokens (on wide_magnitudes the last 512 latents took 0.25 of L0 5 at the end) and, once
the per-token warm-up hands over, heavy inputs' interference takes the budget and decoders drift. Planted
128-d data, d_sae 1024, 3M tokens (`benchmarks/zoo_defaults.py`), atoms recovered / FVU, batch -> token:
wide_magnitudes 0.451 / 0.178 -> 0.918 / 0.073, base 0.992 / 0.115 -> 0.998 / 0.101. Training per token
and inferring by the batch rule's threshold does not work either (wide_magnitudes: FVU 0.419): the
threshold gives heavy inputs the budget the training never gave them.

Default prefix weights: geometric, each prefix `prefix_weight_ratio` = 0.25 times the weight of the next
larger one, the balance of Chanin, Dulka, Garriga-Alonso 2025 ("Feature Hedging: Correlated Features Break
Narrow Sparse Autoencoders", arXiv 2505.11756), not the paper's uniform weights. A prefix that holds a parent
feature but not its children reconstructs best when the parent's latent also carries the children's expected
share ("hedging"); with every prefix weighted alike the dictionary learns exactly that, and the parents' latents
point at parent + its children's share. Lighter inner prefixes let the whole dictionary's loss pull that share
back out. Planted hierarchical data (`benchmarks/zoo_defaults.py`, 3M tokens), ratio 1 / 0.75 / 0.5 / 0.4 /
0.25: atoms recovered 0.682 / 0.709 / 0.803 / 0.818 / 0.947, the parents' best latents at median cosine 0.860
(ratio 1) and 0.993 (0.25) with the planted parent. The price is the inner prefixes' own reconstruction: the first
64 of 1024 latents alone leave FVU 0.85-0.87 where uniform weights left 0.59-0.71 (model_cards/sae-zoo.md,
"Matryoshka: lighter inner prefixes"). `prefix_weight_ratio=1.0` gives the paper's weights back.

Choices: group sizes default to the paper's fractions [1/16, 1/16, 1/8, 1/4, 1/2] of d_sae (the last
group takes the rounding remainder) and are stored as integers. The b_dec-only "prefix 0" term of Bussmann's
code is left out: it only trains b_dec, which b_dec's geometric median initialisation already places.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..losses import Step, auxk, fvu, fvu_of
from ..registry import register
from .batchtopk import BatchTopKConfig, BatchTopKSAE

DEFAULT_FRACTIONS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    group_sizes: list[int] | None = None  # latents per nested group; None -> DEFAULT_FRACTIONS of d_sae
    group_weights: list[float] | None = None  # training: loss weight per prefix; None -> by prefix_weight_ratio
    prefix_weight_ratio: float = 0.25  # training: a prefix's loss weight over the next larger one's; 1.0 -> uniform
    selection: str = "token"  # "token": top k per token; "batch": the paper's BatchTopK (see the module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_sizes is None:
            sizes = [max(1, round(f * self.d_sae)) for f in DEFAULT_FRACTIONS[:-1]]
            sizes = [s for s in sizes if s < self.d_sae]
            while sum(sizes) >= self.d_sae:
                sizes.pop()
            self.group_sizes = sizes + [self.d_sae - sum(sizes)]
        self.group_sizes = [int(s) for s in self.group_sizes]
        if any(s <= 0 for s in self.group_sizes) or sum(self.group_sizes) != self.d_sae:
            raise ValueError(f"group_sizes must be positive and sum to d_sae={self.d_sae}, got {self.group_sizes}")
        if self.group_weights is not None:
            if len(self.group_weights) != len(self.group_sizes) or any(w < 0 for w in self.group_weights):
                raise ValueError(
                    f"group_weights needs one non-negative weight per group ({len(self.group_sizes)}), "
                    f"got {self.group_weights}"
                )
            if sum(self.group_weights) <= 0:
                raise ValueError("group_weights must not all be zero")
        if not self.prefix_weight_ratio > 0:
            raise ValueError(f"prefix_weight_ratio must be > 0, got {self.prefix_weight_ratio}")


def inner_prefix_fvu(step: Step) -> Tensor:
    """Weighted FVU of the reconstructions from every prefix but the whole dictionary."""
    weights = step.sae.prefix_weights()
    terms = [w * fvu_of(step.x, recon) for w, recon in zip(weights[:-1], step.extras["prefix_recons"])]
    return torch.stack(terms).sum() if terms else step.x.new_zeros(())


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig

    @property
    def prefix_ends(self) -> list[int]:
        """Exclusive end index of each nested prefix."""
        ends, total = [], 0
        for size in self.cfg.group_sizes:
            total += size
            ends.append(total)
        return ends

    def prefix_weights(self) -> list[float]:
        """Loss weight of each prefix, summing to 1: `group_weights`, or the whole dictionary's weight times
        `prefix_weight_ratio` once per group it lacks."""
        n = len(self.cfg.group_sizes)
        weights = self.cfg.group_weights or [self.cfg.prefix_weight_ratio ** (n - 1 - i) for i in range(n)]
        return [w / sum(weights) for w in weights]

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> Step:
        """BatchTopK's pass, plus the reconstruction of every inner prefix, built group by group.

        The groups are decoded as dense slices: one dense decode in all, cheaper than one sparse decode
        (and its backward) per prefix.
        """
        step = super().training_forward(x, dead_mask)
        step.extras["prefix_recons"] = self.prefix_reconstructions(step.codes.to_dense(self.d_sae),
                                                                   self.prefix_ends[:-1])
        return step

    def prefix_reconstructions(self, dense: Tensor, ends: list[int] | None = None) -> list[Tensor]:
        """Each prefix's reconstruction from dense codes, built group by group (every prefix by default)."""
        partial, start, recons = self.b_dec, 0, []
        for end in self.prefix_ends if ends is None else ends:
            partial = partial + dense[:, start:end] @ self.W_dec[start:end]
            recons.append(partial)
            start = end
        return recons

    def loss_terms(self):
        return {
            "fvu": (self.prefix_weights()[-1], fvu),
            "inner_fvu": (1.0, inner_prefix_fvu),
            "auxk": (self.cfg.auxk_coef, auxk),
        }
