"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

In training the batch shares one sparsity budget: the k * B largest activations of the whole (B, d_sae)
matrix are kept, so hard tokens use more latents than easy ones while L0 averages exactly k. That
selection depends on the rest of the batch, so inference instead keeps every activation above one
threshold θ (a JumpReLU with a shared threshold), learned during training as an exponential moving
average of the smallest kept activation of each batch and saved as the buffer `threshold`. During the
per-token warm-up (below) it learns from the cut the batch rule would make, so a run stopped there infers at k.

Choices: the EMA starts from the first batch's value (dictionary_learning) rather than from 0, and
updates every step with decay `threshold_decay` = 0.95 (Bussmann: 0.99): the kept minimum is the (k * B)-th
largest activation, a quantile that varies little between batches, so a short memory costs little noise
and lets short runs forget the large activations of the first steps. Dead latents are revived by AuxK with
TopK's coefficient 1/32.

Warm-up: under `sae_guard.train`, the first `topk_warmup` (a third) of the run keeps the top k of each token
(TopK), and only then the batch's k * B. From a random dictionary the batch rule gives the budget to the largest
pre-activations, which come from the largest inputs, not from the tokens the dictionary explains worst, so the
features of the other tokens, rare ones above all, learn slowly and their latents die. Once per-token training has
laid the dictionary down, the batch rule reallocates it. Planted 128-d data, d_sae 1024, 3M tokens
(`benchmarks/zoo_defaults.py`, generators base / hierarchical / wide_magnitudes), atoms recovered:
  batch rule throughout, AuxK 1/8:     1.000 (0.9 reached at 1.75M) / 0.875 / 0.287
  warm-up, AuxK 1/8:                   - / 0.998 / 0.637
  warm-up, AuxK 1/32 (the defaults):   1.000 (0.9 reached at 0.50M) / 0.996 / 0.934
AuxK 1/8 had made up for the starved rare latents of the batch rule from the first step; after a warm-up it
instead pulls latents off their features when the batch rule first leaves them idle. Loops that do not set
`training_progress` (hand-written ones) get the batch rule from the first step.

`selection="token"` keeps the top k of each token throughout, in training and at inference, with no threshold
(TopK's rule under the variant's own loss): Matryoshka's default and AbsTopK's, see their docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import SAE
from ..codes import SparseCodes, sparse_decode
from ..config import SAEConfig
from ..losses import Step, auxk, fvu
from ..registry import register
from ..sparsifiers import abs_topk, batch_topk, mask_to_codes, row_topk

SELECTIONS = ("batch", "token")


@dataclass
class BatchTopKConfig(SAEConfig):
    k: float = 32  # average active latents per token (the batch budget is k * B)
    k_aux: int | None = None  # training: None -> d_in // 2
    auxk_coef: float = 1 / 32  # training: as TopK, see the module docstring
    threshold_decay: float = 0.95  # training: EMA decay of the inference threshold, per step
    topk_warmup: float = 1 / 3  # training: share of the run selecting per token (TopK) first; 0: the batch rule only
    selection: str = "batch"  # "batch": k * B per batch, threshold at inference; "token": top k per token throughout

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in (0, d_sae={self.d_sae}], got {self.k}")
        if self.auxk_coef < 0:
            raise ValueError(f"auxk_coef must be >= 0, got {self.auxk_coef}")
        if not 0 <= self.threshold_decay < 1:
            raise ValueError(f"threshold_decay must be in [0, 1), got {self.threshold_decay}")
        if not 0 <= self.topk_warmup <= 1:
            raise ValueError(f"topk_warmup must be in [0, 1], got {self.topk_warmup}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection == "token" and int(self.k) != self.k:
            raise ValueError(f"per-token selection needs an integer k, got {self.k}")


@register("batchtopk")
class BatchTopKSAE(SAE):
    """Batch-level top-k in training; a learned threshold at inference. Subclasses change the selection."""

    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig) -> None:
        super().__init__(cfg)
        if self.batch_level:
            # 0 means "not learned yet": inference then keeps every positive activation
            self.register_buffer("threshold", torch.zeros(self.threshold_shape))

    @property
    def batch_level(self) -> bool:
        """Whether training selection depends on the batch (and inference therefore on `threshold`)."""
        return self.cfg.selection == "batch"

    @property
    def threshold_shape(self) -> tuple[int, ...]:
        return (1,)

    def keeps_signs(self) -> bool:
        """Whether codes keep their signs now: the class's `signed`, unless a subclass trains unsigned for a while."""
        return self.signed

    def activate(self, pre: Tensor) -> Tensor:
        return pre if self.keeps_signs() else F.relu(pre)

    def select_batch(self, pre: Tensor) -> SparseCodes:
        """Training selection over the whole batch; values are the activated pre-activations."""
        return batch_topk(self.activate(pre), self.cfg.k, by_abs=self.keeps_signs())

    def select_per_token(self, pre: Tensor) -> SparseCodes:
        """The top round(k) activations of each token (TopK): the warm-up's selection, all of `selection="token"`."""
        k = max(1, round(self.cfg.k))
        if self.keeps_signs():
            return abs_topk(pre, k)
        values = F.relu(pre)
        indices = row_topk(values, k)
        return SparseCodes(values.gather(-1, indices), indices)

    def in_warmup(self) -> bool:
        """Whether a trainer's run is still in its per-token share (`topk_warmup`); never outside a trainer."""
        progress = self.training_progress
        return self.batch_level and progress is not None and progress < self.cfg.topk_warmup

    def select_training(self, pre: Tensor) -> SparseCodes:
        return self.select_batch(pre) if self.batch_level and not self.in_warmup() else self.select_per_token(pre)

    def select_inference(self, pre: Tensor) -> SparseCodes:
        """Batch-independent selection: every activation whose magnitude exceeds the threshold (per token: top k)."""
        if not self.batch_level:
            return self.select_per_token(pre)
        values = self.activate(pre)
        return mask_to_codes(values, (values.abs() if self.keeps_signs() else values) > self.threshold)

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        return self.select_inference(self.pre_acts(self.check_input(x)))

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> Step:
        pre = self.training_preacts(x)
        with torch.no_grad():
            chosen = self.select_training(pre)
        kept = chosen.values != 0
        values = self.activate(self.gather_preacts(x, pre, chosen.indices)) * kept
        codes = SparseCodes(values, chosen.indices)
        step = Step(self, x, sparse_decode(codes, self.W_dec) + self.b_dec, codes, pre, dead_mask)
        self.add_auxk(step)
        return step

    def loss_terms(self):
        return {"fvu": (1.0, fvu), "auxk": (self.cfg.auxk_coef, auxk)}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        super().after_optimizer_step(step)
        if self.batch_level:
            self.update_threshold(self.threshold_codes(step))

    @torch.no_grad()
    def threshold_codes(self, step: Step) -> SparseCodes:
        """The codes the inference threshold learns from: the batch rule's, even while training selects per token.

        Per-token minima sit far below the batch rule's cut (some token always has a weak k-th activation), so a
        threshold learnt from them would let inference keep many times k latents per token.
        """
        if self.in_warmup() and step.pre_acts is not None:
            return self.select_batch(step.pre_acts)
        return step.codes

    @torch.no_grad()
    def kept_minimum(self, codes: SparseCodes) -> Tensor:
        """The smallest kept magnitude of this batch per threshold entry (inf where nothing was kept)."""
        magnitudes = codes.values.detach().abs().float()
        return magnitudes.masked_fill(magnitudes == 0, float("inf")).amin().reshape(1)

    @torch.no_grad()
    def update_threshold(self, codes: SparseCodes) -> None:
        """EMA of the smallest kept activation; the first observation initialises it.

        Under data parallelism the minimum is taken over every process's batch, so all keep one threshold.
        """
        smallest = self.all_reduce(self.kept_minimum(codes).to(self.threshold), "min")
        seen = torch.isfinite(smallest)
        decay = self.cfg.threshold_decay
        ema = torch.where(self.threshold > 0, decay * self.threshold + (1 - decay) * smallest, smallest)
        self.threshold.copy_(torch.where(seen, ema, self.threshold))
