"""Relaxed Archetypal SAE (RA-SAE; Fel et al. 2025, "Archetypal SAE: Adaptive and Stable Dictionary
Learning for Concept Extraction in Large Vision Models", arXiv 2502.12892).

A TopK SAE whose dictionary is tied to the data: each row is a convex combination of frozen candidate
points C plus a small relaxation, D = W C + Λ, with W row-stochastic (W >= 0, rows sum to 1) and
every row of Λ of norm <= δ. Features then cannot drift outside the data's convex hull (give or take
δ), which the paper shows makes dictionaries far more stable across seeds and more plausible, at
almost no cost in reconstruction. The projection onto these constraints replaces the unit-norm
decoder after each optimiser step; `W_dec` is the fused D, computed on the fly while training and
cached in eval mode.

Choices, and why:
- Candidates: the paper uses k-means centroids of the whole dataset (32,000 for its 32k-concept
  model). `init_from_data` sees only the first batch, so here C is its first `n_candidates` rows
  (default d_sae; batches are shuffled, so a random subset), centred on b_dec so that convex
  combinations are directions around the data's centre.
- δ: the paper's δ = 1 is on element-wise standardised activations, so `delta` is in units of the
  candidates' RMS per-dimension deviation (δ_abs = delta * RMS|C_i| / sqrt(d_in)).
- Init as in the paper's code: W = I (row i is candidate i), Λ = 0; the encoder starts as the
  normalised dictionary rows (tied init).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..registry import register
from ..losses import Step
from .topk import TopKConfig, TopKSAE


@dataclass
class ArchetypalConfig(TopKConfig):
    n_candidates: int | None = None  # frozen candidate points C, at least d_sae; None -> d_sae, as in the paper
    delta: float = 1.0  # relaxation radius, in units of the candidates' RMS per-dimension deviation

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_candidates is None:
            self.n_candidates = self.d_sae
        if self.n_candidates < self.d_sae:
            raise ValueError(f"n_candidates must be >= d_sae={self.d_sae} (W starts as I), got {self.n_candidates}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")


@register("archetypal")
class ArchetypalSAE(TopKSAE):
    config_class = ArchetypalConfig
    cfg: ArchetypalConfig
    unit_norm_decoder = False  # replaced by the archetypal constraint (see `after_optimizer_step`)

    def __init__(self, cfg: ArchetypalConfig) -> None:
        super().__init__(cfg)
        # the base class made W_dec a parameter; here it is derived from C, W and Λ (the property below)
        del self.W_dec
        self.register_buffer("candidates", torch.zeros(cfg.n_candidates, cfg.d_in))
        self.mix = nn.Parameter(torch.eye(cfg.d_sae, cfg.n_candidates))
        self.relax = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self._fused: tuple[tuple, Tensor] | None = None
        with torch.no_grad():
            self.set_candidates(torch.randn(cfg.n_candidates, cfg.d_in))

    @property
    def W_dec(self) -> Tensor:
        """The dictionary D = W C + Λ, (d_sae, d_in); cached (without gradient) in eval mode."""
        if "W_dec" in self._parameters:  # only inside the base constructor, which makes W_dec a parameter
            return self._parameters["W_dec"]
        if self.training:
            return self.mix @ self.candidates + self.relax
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in (self.mix, self.relax, self.candidates))
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                self._fused = (key, self.mix @ self.candidates + self.relax)
        return self._fused[1]

    @property
    def relax_radius(self) -> Tensor:
        """δ in absolute units: `delta` times the candidates' RMS per-dimension deviation."""
        rms = self.candidates.pow(2).sum(-1).mean().sqrt() / self.d_in**0.5
        return self.cfg.delta * rms

    @torch.no_grad()
    def set_candidates(self, points: Tensor) -> None:
        """Use these (n_candidates, d_in) points as C; resets W = I, Λ = 0 and the encoder to match."""
        if points.shape != self.candidates.shape:
            raise ValueError(f"candidates must have shape {tuple(self.candidates.shape)}, got {tuple(points.shape)}")
        self.candidates.copy_(points)
        self.mix.copy_(torch.eye(*self.mix.shape))
        self.relax.zero_()
        rows = self.candidates[: self.d_sae]
        self.W_enc.copy_(rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """b_dec as usual, then C = the first n_candidates rows of x, centred on b_dec."""
        super().init_from_data(x)
        if x.shape[0] < self.cfg.n_candidates:
            raise ValueError(
                f"archetypal init needs at least n_candidates={self.cfg.n_candidates} rows in the first batch, got "
                f"{x.shape[0]}; raise batch_size or lower n_candidates"
            )
        self.set_candidates(x[: self.cfg.n_candidates].to(self.candidates) - self.b_dec)

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        """Project: W onto row-stochastic matrices (clip negatives, renormalise rows), rows of Λ into the δ-ball."""
        self.mix.clamp_(min=0)
        self.mix /= self.mix.sum(-1, keepdim=True).clamp_min(1e-8)
        norms = self.relax.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.relax *= (self.relax_radius / norms).clamp(max=1)
