"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093).

Each token keeps its k largest pre-activations (ReLU on the kept values), so L0 is exactly k and no
sparsity penalty is needed. Dead latents are revived by AuxK: the top-k_aux dead latents learn to
reconstruct what the live ones missed. Optional Multi-TopK adds 1/8 of the FVU at 4k, which keeps
the SAE usable at a larger k at test time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..codes import SparseCodes, sparse_decode
from ..config import SAEConfig
from ..losses import Step, auxk, fvu, multi_topk
from ..base import SAE
from ..registry import register


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    k_aux: int | None = None  # training: None -> d_in // 2 (sparsify's choice)
    auxk_coef: float = 1 / 32  # training
    multi_topk: bool = False  # training

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")


@register("topk")
class TopKSAE(SAE):
    config_class = TopKConfig
    cfg: TopKConfig

    @property
    def k_aux(self) -> int:
        return self.cfg.k_aux or max(1, self.d_in // 2)

    def select(self, pre: Tensor, k: int) -> Tensor:
        """Indices of the kept latents per token."""
        return pre.topk(min(k, self.d_sae), dim=-1, sorted=False).indices

    def activate(self, values: Tensor) -> Tensor:
        return F.relu(values)

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        pre = self.pre_acts(self.check_input(x))
        indices = self.select(pre, self.cfg.k)
        return SparseCodes(self.activate(pre.gather(-1, indices)), indices)

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> Step:
        pre = self.training_preacts(x)
        indices = self.select(pre, self.cfg.k)
        codes = SparseCodes(self.activate(self.gather_preacts(x, pre, indices)), indices)
        step = Step(self, x, sparse_decode(codes, self.W_dec) + self.b_dec, codes, pre, dead_mask)
        self.add_auxk(step, self.k_aux)
        if self.cfg.multi_topk:
            wide = self.select(pre, 4 * self.cfg.k)
            wide_codes = SparseCodes(self.activate(self.gather_preacts(x, pre, wide)), wide)
            step.extras["multi_topk_recon"] = sparse_decode(wide_codes, self.W_dec) + self.b_dec
        return step

    def loss_terms(self):
        terms = {"fvu": (1.0, fvu), "auxk": (self.cfg.auxk_coef, auxk)}
        if self.cfg.multi_topk:
            terms["multi_topk"] = (1 / 8, multi_topk)
        return terms
