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

`sign_warmup` (off by default): under `sae_guard.train`, that share of the run first trains as TopK (the k
largest positive pre-activations of each token, ReLU'd), then keeps the largest |pre| with their signs. On the
zoo's planted data, where every feature is non-negative, a third of the run lifts recovery in 3M tokens from 0.857
to 0.988 on steep_zipf and from 0.885 to 0.992 on hierarchical: from a random dictionary the signed rule lets one
latent take two unrelated rare atoms as the two poles of its direction. But it costs what AbsTopK is for: on
`base` with half its atoms bipolar (`benchmarks/bipolar.py`) the signed rule from the start holds 0.996 of them in
one latent, and after the warm-up only 0.336, the rest split into a positive and a negative latent as TopK splits
them all. So the paper's rule is the default (model_cards/sae-zoo.md, "AbsTopK").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..codes import SparseCodes
from ..registry import register
from .batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass
class AbsTopKConfig(BatchTopKConfig):
    selection: str = "token"  # "token": k per token; "batch": k * B per batch, threshold at inference
    sign_warmup: float = 0.0  # training: share of the run trained as TopK (positive, ReLU'd) before signs are kept

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
