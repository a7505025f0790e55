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

from ..base import SAE
from ..codes import SparseCodes, sparse_decode
from ..config import SAEConfig
from ..losses import Step, auxk, fvu, multi_topk
from ..registry import register
from ..screened_topk import Bf16Encoder, screen_applies, screened_topk
from ..sparsifiers import row_topk


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

    # encode in latent chunks when tokens x d_sae would exceed this many pre-activations (64 MiB fp32)
    chunk_elements: int = 1 << 24

    def select(self, pre: Tensor, k: int) -> Tensor:
        """Indices of the kept latents per token."""
        return row_topk(pre, k)

    def activate(self, values: Tensor) -> Tensor:
        return F.relu(values)

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        x = self.check_input(x)
        lead, x = x.shape[:-1], x.reshape(-1, self.d_in)
        if self.d_sae <= self.chunk_elements:  # whole rows, as many as fit: each chunk exactly the unchunked codes
            rows = max(1, self.chunk_elements // self.d_sae)
            parts = [self._encode_rows(x[start:start + rows]) for start in range(0, max(len(x), 1), rows)]
            values, indices = torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
        else:
            values, indices = self._encode_in_chunks(x)
        k = indices.shape[-1]
        return SparseCodes(self.activate(values).reshape(*lead, k), indices.reshape(*lead, k))

    def _encode_rows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        plain_topk = type(self).select is TopKSAE.select and type(self).pre_acts is SAE.pre_acts
        if plain_topk and screen_applies(x, self.W_enc):
            if "_bf16_encoder" not in self.__dict__:
                self._bf16_encoder = Bf16Encoder()
            return screened_topk(x - self.b_dec, self.W_enc, self.b_enc, self.cfg.k, self._bf16_encoder)
        pre = self.pre_acts(x)
        indices = self.select(pre, self.cfg.k)
        return pre.gather(-1, indices), indices

    def _encode_in_chunks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k per chunk of latents, then top-k of those candidates: the same codes, a fraction of the memory.
        For dictionaries wider than `chunk_elements` (row chunks serve the others, and are faster: a column slice
        of the encoder is strided)."""
        x_c = x - self.b_dec
        width = max(self.cfg.k, self.chunk_elements // max(x.shape[0], 1))
        cand_values, cand_indices = [], []
        for start in range(0, self.d_sae, width):
            pre = F.linear(x_c, self.W_enc[start : start + width], self.b_enc[start : start + width])
            local = self.select(pre, self.cfg.k)
            cand_values.append(pre.gather(-1, local))
            cand_indices.append(local + start)
        values, indices = torch.cat(cand_values, -1), torch.cat(cand_indices, -1)
        pick = self.select(values, self.cfg.k)
        return values.gather(-1, pick), indices.gather(-1, pick)

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> Step:
        pre = self.training_preacts(x)
        indices = self.select(pre, self.cfg.k)
        codes = SparseCodes(self.activate(self.gather_preacts(x, pre, indices)), indices)
        step = Step(self, x, sparse_decode(codes, self.W_dec) + self.b_dec, codes, pre, dead_mask)
        self.add_auxk(step)
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
