"""AbsTopK SAE (Zhu, Khalili, Zhu 2025, "AbsTopK: Rethinking Sparse Autoencoders For Bidirectional
Features", arXiv 2510.00404).

Seen as one unrolled proximal step of sparse coding, TopK is hard thresholding under a non-negativity
constraint; dropping that constraint gives AbsTopK: keep the k largest |pre| and keep their sign, with
no ReLU. One latent can then encode both poles of a concept (e.g. formal vs informal) along a single
direction, instead of splitting it across two non-negative latents.

`selection="token"` (default, the paper's formulation) keeps k per token. `selection="batch"` (the
authors' public trainer) keeps the k * B largest |pre| of the batch, and at inference every |pre|
above a learned threshold, as BatchTopK does. AuxK is TopK's (positive pre-activations, ReLU'd): revived
latents learn where to fire first and may take both signs once alive (see `SAE.add_auxk`).

`sign_warmup` (a third of the run): under `sae_guard.train`, that share first trains as TopK (the k largest positive
pre-activations of each token, ReLU'd); then each pair of latents whose decoder rows point opposite ways, the two
poles TopK gives a feature that takes both signs, is folded into one signed latent (`fold_poles`), and the run
goes on with the signed rule. From a random dictionary the signed rule lets one latent take two unrelated rare atoms
as the two poles of its direction: on the zoo's planted data, where every feature is non-negative, the paper's rule
throughout recovered 0.857 of steep_zipf's atoms and 0.885 of hierarchical's in 3M tokens, and the warm-up and
fold 0.984 / 0.992. The warm-up alone left bipolar features split (`benchmarks/bipolar.py`: 0.336 held in one
latent, against 0.996 for the paper's rule); with the fold 0.988 (model_cards/sae-zoo.md, "AbsTopK").
`sign_warmup=0` is the paper's rule throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..codes import SparseCodes
from ..losses import Step
from ..registry import register
from .batchtopk import BatchTopKConfig, BatchTopKSAE

POLE_COSINE = -0.9  # two decoder rows at or below this cosine are taken for one feature's two poles
FOLD_BLOCK = 1024  # decoder rows compared at a time when looking for poles
FREED_ENCODER_SCALE = 0.1  # a freed latent's encoder norm, against the mean encoder norm: small, so AuxK revives it


@dataclass
class AbsTopKConfig(BatchTopKConfig):
    selection: str = "token"  # "token": k per token; "batch": k * B per batch, threshold at inference
    sign_warmup: float = 1 / 3  # training: share of the run trained as TopK (positive, ReLU'd), then poles folded

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.sign_warmup <= 1:
            raise ValueError(f"sign_warmup must be in [0, 1], got {self.sign_warmup}")


@register("abstopk")
class AbsTopKSAE(BatchTopKSAE):
    config_class = AbsTopKConfig
    cfg: AbsTopKConfig
    signed = True

    def unsigned_warmup(self) -> bool:
        """Whether a trainer's run is in its `sign_warmup` share, training as TopK; never at inference."""
        progress = self.training_progress
        return self.training and progress is not None and progress < self.cfg.sign_warmup

    def keeps_signs(self) -> bool:
        return not self.unsigned_warmup()

    def select_training(self, pre: Tensor) -> SparseCodes:
        return self.select_per_token(pre) if self.unsigned_warmup() else super().select_training(pre)

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        super().after_optimizer_step(step)
        if self.first_step_past(self.cfg.sign_warmup):  # the first signed step
            self.fold_poles()

    @torch.no_grad()
    def fold_poles(self) -> int:
        """Merge each pair of latents whose decoder rows point opposite ways into one signed latent; free the other.

        After a TopK warm-up a feature that takes both signs is held by two latents, one per pole, and the signed
        rule alone never merges them. The kept latent takes the pair's mean direction, encoder and bias (the second
        pole's negated); the freed one gets a random direction and a small encoder, so it is dead and AuxK revives
        it elsewhere. Pairs are matched greedily, most opposite first. Returns the number of pairs folded.
        """
        unit = F.normalize(self.W_dec, dim=-1)
        opposite, partner = [], []
        for start in range(0, self.d_sae, FOLD_BLOCK):
            cos = unit[start : start + FOLD_BLOCK] @ unit.T
            value, index = cos.min(-1)
            opposite.append(value)
            partner.append(index)
        opposite, partner = torch.cat(opposite).cpu(), torch.cat(partner).cpu()  # matched one by one below
        taken = torch.zeros(self.d_sae, dtype=torch.bool)
        pairs = []
        for i in torch.argsort(opposite).tolist():
            if opposite[i] > POLE_COSINE:
                break
            j = int(partner[i])
            if not (taken[i] or taken[j]):
                taken[i] = taken[j] = True
                pairs.append((i, j))
        if not pairs:
            return 0
        keep, free = (torch.tensor(side, device=self.W_dec.device) for side in zip(*pairs))
        self.W_dec[keep] = F.normalize(self.W_dec[keep] - self.W_dec[free], dim=-1)
        self.W_enc[keep] = (self.W_enc[keep] - self.W_enc[free]) / 2
        self.b_enc[keep] = (self.b_enc[keep] - self.b_enc[free]) / 2
        # the same draw on every training process, so data-parallel copies stay equal
        fresh = torch.randn(len(pairs), self.d_in, generator=torch.Generator().manual_seed(len(pairs)))
        fresh = F.normalize(fresh, dim=-1).to(self.W_dec)
        self.W_dec[free] = fresh
        self.W_enc[free] = fresh * (FREED_ENCODER_SCALE * self.W_enc.norm(dim=-1).mean())
        self.b_enc[free] = 0
        return len(pairs)
