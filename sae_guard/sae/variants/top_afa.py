"""top-AFA SAE (Lee, Davies, Canby, Hockenmaier 2025, "Evaluating and Designing Sparse Autoencoders by
Approximating Quasi-Orthogonality", arXiv 2503.24277).

If feature directions are quasi-orthogonal, the norm of the dense activation approximates the norm of
its (decoder-scaled) feature activations: |f| ~ |x| (the AFA). top-AFA uses that to choose k per token
instead of fixing it: rank latents by their decoded contribution (a_i |W_dec_i|)^2 and keep the
shortest prefix whose norm best matches |x - b_dec|. An AFA loss, (|f| - |x - b_dec|)^2, pulls the
codes towards that relation, so no sparsity hyperparameter needs tuning; tokens with more going on
get more latents. Selection is per token, so inference needs no threshold.

Choices: the AFA loss matches |f| to |x - b_dec| (what the selection matches) instead of the
authors' |x| of the layer-normed input, and is divided by the batch variance like the FVU, so its
coefficient does not depend on activation scale. Since the variance sums over d_in dimensions while
the norm gap does not, the paper's coefficients (1/128 to 1/16 on a per-element MSE) correspond to
roughly d_in times larger ones here; `afa_coef` is tuned on planted data. AuxK as in TopK.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import SAE
from ..codes import SparseCodes, sparse_decode
from ..config import SAEConfig
from ..losses import Step, auxk, batch_variance, fvu
from ..registry import register
from ..sparsifiers import afa_topk


@dataclass
class TopAFAConfig(SAEConfig):
    afa_coef: float = 1.0  # training: weight of the AFA loss
    k_aux: int | None = None  # training: None -> d_in // 2
    auxk_coef: float = 1 / 32  # training

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("afa_coef", "auxk_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def afa_loss(step: Step) -> Tensor:
    """Mean squared gap between |f| (decoder-norm scaled codes) and |x - b_dec|, per unit batch variance."""
    values, indices = step.codes
    norms = step.sae.W_dec.norm(dim=-1)[indices]
    feature_norm = (values * norms).norm(dim=-1)
    target = (step.x - step.sae.b_dec.detach()).norm(dim=-1)
    return (feature_norm - target).pow(2).mean() / batch_variance(step.x).clamp_min(1e-12)


@register("top_afa")
class TopAFASAE(SAE):
    config_class = TopAFAConfig
    cfg: TopAFAConfig

    @torch.no_grad()
    def select(self, x: Tensor, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Indices and keep-mask of the AFA prefix of each token."""
        contributions = (F.relu(pre) * self.W_dec.norm(dim=-1)).pow(2)
        return afa_topk(contributions, (x - self.b_dec).norm(dim=-1))

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        x = self.check_input(x)
        pre = self.pre_acts(x)
        indices, keep = self.select(x, pre)
        return SparseCodes(F.relu(pre.gather(-1, indices)) * keep, indices)

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> Step:
        pre = self.training_preacts(x)
        indices, keep = self.select(x, pre)
        codes = SparseCodes(F.relu(self.gather_preacts(x, pre, indices)) * keep, indices)
        step = Step(self, x, sparse_decode(codes, self.W_dec) + self.b_dec, codes, pre, dead_mask)
        self.add_auxk(step)
        return step

    def loss_terms(self):
        return {"fvu": (1.0, fvu), "afa": (self.cfg.afa_coef, afa_loss), "auxk": (self.cfg.auxk_coef, auxk)}
