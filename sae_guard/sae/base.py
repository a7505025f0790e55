"""The SAE base class: encoder, sparsifier and dictionary, with one seam for training.

An SAE here is
    pre   = W_enc (x - b_dec) + b_enc          encoder      (W_enc: d_sae x d_in, one row per latent)
    codes = sparsify(pre)                      sparsifier   (the variant's defining choice)
    x_hat = codes @ W_dec + b_dec              dictionary   (W_dec: d_sae x d_in, one row per feature)

Inference uses `encode` / `encode_sparse` / `decode` / `forward`. Training calls `training_forward`,
which returns a `Step` holding what the variant's loss terms (`loss_terms`) read, and the two hooks
`before_optimizer_step` / `after_optimizer_step` that keep the dictionary's constraints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codes import SparseCodes, dense_to_sparse, sparse_decode
from .config import SAEConfig
from .kernels import encoder_preacts, gather_linear
from .losses import Loss, Step, fvu
from .registry import get_architecture


LR_REFERENCE_WIDTH = 768  # d_in at and above which the default learning rate is Gao et al.'s rule unchanged
MAX_NARROW_INPUT_FACTOR = 8.0  # the most the default learning rate is raised for a narrow input


class SAE(nn.Module):
    """Base class of every sparse autoencoder. Subclasses register with `@register(name)`."""

    architecture: ClassVar[str] = ""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # keep decoder rows at unit norm, removing the gradient component parallel to each row
    unit_norm_decoder: ClassVar[bool] = True
    # the default learning rate scales as 1/sqrt(d_sae) (Gao et al. 2024): lr = base_lr / sqrt(d_sae / 2**14),
    # times max(1, LR_REFERENCE_WIDTH / d_in) for inputs narrower than an LLM's residual stream (see default_lr)
    base_lr: ClassVar[float] = 2e-4
    # codes take both signs (AbsTopK): a latent stands for its decoder row and its negative
    signed: ClassVar[bool] = False
    # share of the current training run done before this step, set by `sae_guard.train` (None outside it, as in a
    # hand-written loop); variants with a schedule over the run read it
    training_progress: float | None = None
    # steps in that run (set with training_progress): tells a variant which step came before this one, which a
    # resumed run cannot remember (see first_step_past)
    training_steps: int | None = None

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        cfg.architecture = self.architecture
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters()

    # ------------------------------------------------------------------ construction and files
    @staticmethod
    def create(architecture: str, *, d_in: int, d_sae: int, **kwargs: Any) -> "SAE":
        """Build a freshly initialised SAE of a registered architecture."""
        cls = get_architecture(architecture)
        cfg = cls.config_class(architecture=architecture, d_in=d_in, d_sae=d_sae, **kwargs)
        return cls(cfg)

    @staticmethod
    def load(path: str | Path, device: str | torch.device | None = None) -> "SAE":
        """Load an SAE folder written by sae_guard, SAELens or sparsify (safetensors only)."""
        from .io import load

        return load(path, device=device)

    def save(self, path: str | Path) -> Path:
        """Write `cfg.json` and `sae.safetensors` into the folder `path`, atomically."""
        from .io import save

        return save(self, path)

    def train(self, mode: bool = True) -> "SAE":
        """Switch mode, and lay W_enc out for the batches the mode sees (its values never change).

        Training reads W_enc row by row (one row per latent) over thousands of tokens; a guard encodes a few tokens
        at a time, where BLAS multiplies 2-3x faster (CPU, d_in=768, d_sae=24,576, 14 tokens) with W_enc held
        transposed in memory (strides (1, d_sae)): x @ W_enc.T then reads a row-major (d_in, d_sae) matrix. The
        swap happens in place, so no second copy of the encoder is kept.
        """
        super().train(mode)
        with torch.no_grad():
            weight = self.W_enc.data
            transposed = weight.dim() == 2 and weight.stride() == (1, weight.shape[0]) and not weight.is_contiguous()
            if mode and transposed:
                self.W_enc.data = weight.contiguous()
            elif not mode and not transposed and weight.dim() == 2 and min(weight.shape) > 1:
                self.W_enc.data = weight.t().contiguous().t()
        return self

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def default_lr(self) -> float:
        """Gao et al.'s 1/sqrt(d_sae) rule, raised in proportion for inputs narrower than `LR_REFERENCE_WIDTH`.

        The rule was fitted on LLM residual streams (d_in 768 and up). On narrower inputs it is too slow: planted
        128-d data, d_sae 1024, 1.5M tokens, topk recovered 0.766 of the atoms at its 8e-4, 0.98 at 2e-3, 0.988 at
        4e-3 and 1.0 at 8e-3 (`benchmarks/zoo_defaults.py`'s setting). Inputs of width 768 and up keep the rule;
        the factor stops at `MAX_NARROW_INPUT_FACTOR` so toy widths (d_in 16) do not get a 48x step.
        """
        narrow = min(MAX_NARROW_INPUT_FACTOR, max(1.0, LR_REFERENCE_WIDTH / self.d_in))
        return self.width_lr() * narrow

    def width_lr(self) -> float:
        """Gao et al.'s rule alone, base_lr / sqrt(d_sae / 2**14): the default before the narrow-input raise, which
        the SAEs shipped before it were trained with (their builds pin it)."""
        return self.base_lr / math.sqrt(self.d_sae / 2**14)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit decoder rows; the encoder starts as the decoder's transpose (tied init)."""
        w = torch.randn(self.d_sae, self.d_in)
        w /= w.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Data-dependent initialisation before training: b_dec = geometric median of a sample."""
        self.b_dec.copy_(geometric_median(x[:8192].to(self.b_dec)))

    # ------------------------------------------------------------------ inference
    def check_input(self, x: Tensor) -> Tensor:
        """Cast to the SAE's dtype after checking width and finiteness, with errors that say why."""
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"{self.architecture} SAE expects activations of width d_in={self.d_in}, got shape {tuple(x.shape)}"
            )
        x = x.to(self.W_enc.dtype)
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).any(-1).nonzero()[:5].flatten().tolist()
            raise ValueError(f"activations contain NaN or inf (first bad rows: {bad})")
        return x

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations (..., d_sae)."""
        return F.linear(x - self.b_dec, self.W_enc, self.b_enc)

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        """Sparse (values, indices) codes. Variants with a fixed k override this directly."""
        return dense_to_sparse(self.encode(x))

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes (..., d_sae)."""
        return self.encode_sparse(x).to_dense(self.d_sae)

    def decode(self, codes: Tensor | SparseCodes) -> Tensor:
        """Reconstruction (..., d_in) from dense or sparse codes."""
        if isinstance(codes, SparseCodes):
            return sparse_decode(codes, self.W_dec) + self.b_dec
        return codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode_sparse(self.check_input(x)))

    # ------------------------------------------------------------------ training seam
    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> Step:
        """One differentiable pass over a (B, d_in) batch. Subclasses override for speed or extras."""
        codes = self.encode_sparse(x)
        return Step(self, x, self.decode(codes), codes, dead_mask=dead_mask)

    def loss_terms(self) -> dict[str, tuple[float, Loss]]:
        """The loss terms this variant trains with, as name -> (coefficient, loss function)."""
        return {"fvu": (1.0, fvu)}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            w = self.W_dec
            parallel = torch.einsum("ij,ij->i", w.grad, w)  # row-wise dots without a (d_sae, d_in) temporary
            w.grad.addcmul_(parallel.neg_()[:, None], w)

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @property
    def training_step(self) -> int | None:
        """The index of this step in the trainer's run (None outside `sae_guard.train`), worked out from its progress
        and step count rather than counted, so a run resumed from a checkpoint knows it as an uninterrupted run does."""
        if self.training_progress is None or not self.training_steps:
            return None
        return round(self.training_progress * self.training_steps)

    def first_step_past(self, share: float) -> bool:
        """Whether this training step is the run's first at or past `share` of it (never for share 0); see
        `training_step`."""
        step = self.training_step
        if not self.training or step is None or self.training_progress < share:
            return False
        before = (step - 1) / self.training_steps  # the progress the trainer gave the step before
        return 0 <= before < share

    # ------------------------------------------------------------------ shared pieces for variants
    @staticmethod
    def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
        """Reduce a batch statistic over training processes in place ("sum", "min" or "max").

        Variants whose `after_optimizer_step` updates state from batch statistics (thresholds,
        firing counts, biases) reduce them with this, so every process keeps identical state; in a
        single process it does nothing.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def training_preacts(self, x: Tensor) -> Tensor:
        """Pre-activations of a (B, d_in) training batch, without gradient (pair with `selected`)."""
        return encoder_preacts(x.detach() - self.b_dec.detach(), self.W_enc.detach(), self.b_enc.detach())

    def gather_preacts(self, x: Tensor, pre: Tensor, indices: Tensor, bias: Tensor | None = None) -> Tensor:
        """Pre-activations at `indices` with a sparse backward (see `kernels.gather_linear`); `bias` replaces b_enc."""
        return gather_linear(x, self.b_dec, self.W_enc, self.b_enc if bias is None else bias, indices, pre)

    @property
    def k_aux(self) -> int:
        """How many dead latents AuxK fits per token: the config's `k_aux`, else d_in // 2 (sparsify's choice)."""
        return getattr(self.cfg, "k_aux", None) or max(1, self.d_in // 2)

    def add_auxk(self, step: Step, without_bias: bool = False) -> None:
        """Put the AuxK reconstruction (the top `k_aux` dead latents decoded) into `step.extras`.

        Dead latents are ranked by their positive pre-activations and ReLU'd, for signed SAEs (AbsTopK) too: a latent
        revives by learning to fire on the tokens a missing feature is in. Ranked by |pre| and kept signed, each one
        is fitted as a linear regressor of the residual over tokens of both signs, its pulls cancel and its encoder
        shrinks (AbsTopK, planted steep_zipf: 61% of latents dead, 0.725 of atoms recovered; ReLU'd: 6%, 0.857).
        `without_bias` ranks and fits them on W_enc (x - b_dec) alone, for SAEs whose b_enc is a firing threshold
        with no gradient (GBA): a dead latent sits below it, and ReLU(pre) would be zero on every token.
        """
        dead_idx = step.dead_latents()
        if dead_idx is None:
            return
        pre, bias = step.pre_acts, None
        if without_bias:
            pre, bias = pre - self.b_enc.detach(), torch.zeros_like(self.b_enc)
        k = min(self.k_aux, dead_idx.numel())
        scores = pre.index_select(-1, dead_idx)
        _, local = scores.topk(k, dim=-1, sorted=False)
        indices = dead_idx[local]
        values = F.relu(self.gather_preacts(step.x, pre, indices, bias))
        step.extras["auxk_recon"] = sparse_decode(SparseCodes(values, indices), self.W_dec)
        step.extras["auxk_scale"] = step.x.new_tensor(min(dead_idx.numel() / self.k_aux, 1.0))

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}"


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    x = x.reshape(-1, x.shape[-1]).double()
    median = x.mean(0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=-1).clamp_min(eps)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            median = new
            break
        median = new
    return median.float()
