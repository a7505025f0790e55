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
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass
class AbsTopKConfig(BatchTopKConfig):
    selection: str = "token"  # "token": k per token; "batch": k * B per batch, threshold at inference


@register("abstopk")
class AbsTopKSAE(BatchTopKSAE):
    config_class = AbsTopKConfig
    cfg: AbsTopKConfig
    signed = True
