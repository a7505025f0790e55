"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders", arXiv 2404.16014).

The encoder is split in two paths that share one weight matrix: a gate, 1[W (x - b_dec) + b_gate > 0],
decides which latents fire, and a magnitude path, ReLU(exp(r_mag) * W (x - b_dec) + b_mag), says how
much. The L1 penalty acts only on the gate's pre-activations, so it sparsifies without shrinking the
magnitudes that reconstruct x (the shrinkage a plain L1 SAE suffers). Since the gate is a step, it
learns through an auxiliary loss: ReLU(gate pre-activations) must reconstruct x on their own through
stop-gradient copies of the decoder, so that loss trains the encoder and nothing else.

Here b_enc is the gate bias. The L1 is weighted by decoder row norms and divided by the batch RMS
deviation (as `losses.l1_decoder_weighted`), and the auxiliary reconstruction is a batch FVU, so the
defaults do not depend on the activations' scale. With `target_l0` set, the L1 weight steers itself to that L0 from
`l1_coef` (`sae/l1_target.py`), as ReLU's does. On the zoo's `base` data (target 6, 3M tokens) it reaches L0 5.78
with FVU 0.393 and 0.277 of the atoms recovered (model_cards/sae-zoo.md, "ReLU and Gated").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import l1_target
from ..base import SAE
from ..codes import SparseCodes, dense_to_sparse
from ..config import SAEConfig
from ..losses import Step, batch_variance, fvu, fvu_of
from ..registry import register


@dataclass
class GatedConfig(SAEConfig):
    l1_coef: float = 0.1  # training: weight of the L1 on ReLU(gate pre-activations), per unit RMS deviation
    aux_coef: float = 1.0  # training: weight of the gate's own reconstruction (through a frozen decoder)
    target_l0: float | None = None  # training: steer the L1 weight to this L0 (start: l1_coef); None -> fixed
    target_rate: float = 0.01  # training: step of log(L1 weight) per unit log(L0 / target_l0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("l1_coef", "aux_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        l1_target.check_target(self)


def gate_l1(step: Step) -> Tensor:
    """L1 of ReLU(gate pre-activations), weighted by decoder row norms, per unit RMS deviation."""
    gate = step.extras["gate_acts"]
    norms = step.sae.W_dec.norm(dim=-1)
    return (gate * norms).sum(-1).mean() / batch_variance(step.x).clamp_min(1e-12).sqrt()


def gate_reconstruction(step: Step) -> Tensor:
    """FVU of x rebuilt from ReLU(gate pre-activations) by the decoder, which gets no gradient from it."""
    sae = step.sae
    x_hat = step.extras["gate_acts"] @ sae.W_dec.detach() + sae.b_dec.detach()
    return fvu_of(step.x, x_hat)


@register("gated")
class GatedSAE(SAE):
    config_class = GatedConfig
    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig) -> None:
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.l1_target = l1_target.make(cfg)

    def gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gate pre-activations and dense codes (..., d_sae)."""
        shared = F.linear(x - self.b_dec, self.W_enc)
        gate = shared + self.b_enc
        magnitude = F.relu(shared * self.r_mag.exp() + self.b_mag)
        return gate, magnitude * (gate > 0)

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        return dense_to_sparse(self.gate_and_magnitude(self.check_input(x))[1])

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> Step:
        """Dense pass: the auxiliary loss needs every gate pre-activation anyway."""
        gate, codes = self.gate_and_magnitude(x)
        x_hat = codes @ self.W_dec + self.b_dec
        step = Step(self, x, x_hat, dense_to_sparse(codes.detach()), gate.detach(), dead_mask)
        step.extras["gate_acts"] = F.relu(gate)
        return step

    def loss_terms(self):
        return {"fvu": (1.0, fvu), "gate_l1": (l1_target.coefficient(self), gate_l1),
                "gate_reconstruction": (self.cfg.aux_coef, gate_reconstruction)}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        super().after_optimizer_step(step)
        l1_target.after_step(self, step.pre_acts > 0)
