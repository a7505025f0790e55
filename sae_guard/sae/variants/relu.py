"""Standard ReLU SAE with an L1 penalty (Bricken et al. 2023, "Towards Monosemanticity"; with the
decoder-norm-weighted L1 of Anthropic's April 2024 update, as in SAELens's `standard` architecture).

Codes are ReLU(W_enc (x - b_dec) + b_enc), and sparsity comes from an L1 penalty on the codes weighted
by the decoder row norms. As in that update (and SAELens v6), decoder rows are not projected to unit
norm: the weighting already stops the penalty being dodged by shrinking codes and growing rows, and
SAEs loaded from SAELens, whose rows are not unit norm, keep their function when fine-tuned. It is the
baseline the other variants are measured against; its L1 shrinks every active code toward zero, which
JumpReLU, Gated and TopK exist to avoid.

Scale: `losses.l1_decoder_weighted` divides the L1 by the batch's RMS deviation, so with the batch FVU
as reconstruction the penalty shrinks each active code by about `l1_coef / 2` of that RMS deviation,
whatever the activations' scale.

Sparsity: `l1_coef` is the paper's fixed penalty; with `target_l0` set it is only where a coefficient steered to
that L0 starts (`sae/l1_target.py`), so one setting serves data whose L0 under a fixed penalty differs. The L0 is
reached, and its price shows: on the zoo's `base` data (6 active atoms, target 6, 3M tokens) L0 5.92 with FVU 0.695
and 0.184 of the atoms recovered, where TopK recovers them all at FVU 0.10 (model_cards/sae-zoo.md, "ReLU and
Gated"). Use it as the baseline it is, not for a low L0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import SAE
from ..codes import SparseCodes, dense_to_sparse
from ..config import SAEConfig
from .. import l1_target
from ..losses import Step, fvu, l1_decoder_weighted
from ..registry import register
from ..sparsifiers import mask_to_codes


@dataclass
class ReLUConfig(SAEConfig):
    l1_coef: float = 0.1  # training: weight of the decoder-norm-weighted L1 (per unit RMS deviation)
    target_l0: float | None = None  # training: steer the L1 weight to this L0 (start: l1_coef); None -> fixed
    target_rate: float = 0.01  # training: step of log(L1 weight) per unit log(L0 / target_l0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_coef < 0:
            raise ValueError(f"l1_coef must be >= 0, got {self.l1_coef}")
        l1_target.check_target(self)


@register("relu")
class ReLUSAE(SAE):
    config_class = ReLUConfig
    cfg: ReLUConfig
    unit_norm_decoder = False

    def __init__(self, cfg: ReLUConfig) -> None:
        super().__init__(cfg)
        self.l1_target = l1_target.make(cfg)

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        return dense_to_sparse(F.relu(self.pre_acts(self.check_input(x))))

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> Step:
        """Dense pass: an L1 SAE fires on a large share of latents early on, where a dense matmul is
        cheaper than the sparse kernels. The sparse codes keep their gradient for the L1 term."""
        pre = self.pre_acts(x)
        dense = F.relu(pre)
        x_hat = dense @ self.W_dec + self.b_dec
        return Step(self, x, x_hat, mask_to_codes(dense, pre.detach() > 0), pre.detach(), dead_mask)

    def loss_terms(self):
        return {"fvu": (1.0, fvu), "l1": (l1_target.coefficient(self), l1_decoder_weighted)}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        super().after_optimizer_step(step)
        l1_target.after_step(self, step.pre_acts > 0)
