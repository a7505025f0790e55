"""Detox steering in tiers (Breaking Bad Tokens, Goyal et al. 2025, arXiv 2505.14536).

    feats = select_toxic_features(sae.encode(toxic_acts), sae.encode(clean_acts), n_features=8)
    steer = DetoxSteering.from_features(sae, feats, scale=float(toxic_acts.norm(dim=-1).mean()))
    with steer.applied(model, "model.layers.12", "high"):
        model.generate(...)

Toxicity features are the latents that fire far more often on toxic than on clean tokens (frequency
criterion), ranked by their largest activation on toxic tokens (strength criterion). Steering adds
minus their mean decoder direction (unit norm) to the residual stream after one block, on every
token, at a strength set by the tier: a multiple of `scale`, the typical norm of that residual.
Tiers are named as diffusers' Safe Latent Diffusion names its own, so a user reads them the same way.

The same direction can instead act only where the features fire, as a concept on the gate:
`steer.edit(tier)` is an `Edit(mode="steer")` for `guard(..., edit=...)`.

Baselines for the same hook: `mean_difference` (difference-in-means steering, normalised) and
`random_direction` (equal norm, fixed seed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..hooks.gate import Edit
from ..hooks.hookpoints import find_hookpoint, hook_site
from ..sae import SAE

# Strength per tier as a share of the residual norm, for a steering built without a calibration sweep. The
# paper's values are not public; `choose_tiers` picks a model's own from a sweep on selection prompts
# (benchmarks/detox.py), and SmolLM2-135M-Instruct's chosen shares are these.
TIERS: dict[str, float] = {"low": 0.25, "medium": 0.5, "high": 1.0}
CLEAN_BUDGET = 0.05  # `low` may raise clean perplexity by this much
HIGH_CUT = 0.5  # `high` cuts the toxic-continuation rate by at least this much, relative to unsteered
HIGH_MARGIN = 2.0  # `high` is this multiple of the weakest share that reached the cut on the selection prompts


@dataclass(frozen=True)
class SweepPoint:
    """One steering strength measured on selection prompts."""

    share: float  # of the residual norm
    toxic: float  # toxic-continuation rate
    clean_rise: float  # relative rise of clean perplexity (0.05 = +5%)


def choose_tiers(sweep: Sequence[SweepPoint], clean_budget: float = CLEAN_BUDGET,
                 cut: float = HIGH_CUT, margin: float = HIGH_MARGIN) -> dict[str, float]:
    """Tier shares from a sweep on selection prompts (never the evaluation ones), share 0 among them.

    low: the strongest share whose clean perplexity rises at most `clean_budget`; high: `margin` times the weakest
    share cutting the toxic rate by at least `cut` relative to share 0 (else the strongest measured). The margin is
    there because a toxic rate measured on a few dozen prompts jumps around its threshold: on SmolLM2 the weakest
    halving share of 24 selection prompts (0.15) halved nothing on 24 other prompts, twice it does. medium: the
    geometric mean of low and high. A high not above low is raised to the next measured share.
    """
    points = sorted(sweep, key=lambda p: p.share)
    base = next((p for p in points if p.share == 0), None)
    steered = [p for p in points if p.share > 0]
    if base is None or not steered:
        raise ValueError("the sweep needs share 0 (unsteered) and at least one positive share")
    within = [p.share for p in steered if p.clean_rise <= clean_budget]
    low = max(within) if within else steered[0].share
    cutting = [p.share for p in steered if p.toxic <= (1 - cut) * base.toxic]
    high = margin * min(cutting) if cutting else steered[-1].share
    if high <= low:
        above = [p.share for p in steered if p.share > low]
        high = above[0] if above else low * 2
    return {"low": low, "medium": (low * high) ** 0.5, "high": high}


def at_equal_cost(curve: Sequence[SweepPoint], clean_rise: float) -> float | None:
    """The toxic rate a steering direction reaches at a given clean-perplexity rise, linearly interpolated along
    its measured curve (sorted by share, share 0 first). A cost at or below the cheapest point's gets that point's
    rate (no steering costs less than none); None above the measured range."""
    points = sorted(curve, key=lambda p: p.share)
    if points and clean_rise <= min(p.clean_rise for p in points):
        return min(points, key=lambda p: p.clean_rise).toxic
    for a, b in zip(points, points[1:]):
        lo, hi = sorted((a.clean_rise, b.clean_rise))
        if lo <= clean_rise <= hi:
            t = 0.0 if hi == lo else (clean_rise - a.clean_rise) / (b.clean_rise - a.clean_rise)
            return a.toxic + t * (b.toxic - a.toxic)
    return None


def select_toxic_features(toxic_codes: Tensor, clean_codes: Tensor, n_features: int = 8,
                          min_frequency_ratio: float = 4.0) -> Tensor:
    """Latents firing >= `min_frequency_ratio` times as often on toxic as on clean tokens, by toxic max activation.

    `toxic_codes` and `clean_codes` are dense (tokens, d_sae) codes. Returns at most `n_features`
    indices, strongest first; fewer (maybe none) if few latents pass the frequency criterion.
    """
    if toxic_codes.ndim != 2 or clean_codes.ndim != 2 or toxic_codes.shape[1] != clean_codes.shape[1]:
        raise ValueError(f"codes must be (tokens, d_sae) with one d_sae, got {tuple(toxic_codes.shape)} "
                         f"and {tuple(clean_codes.shape)}")
    if not len(toxic_codes) or not len(clean_codes):
        raise ValueError("need at least one toxic and one clean token to compare")
    if n_features < 1 or min_frequency_ratio < 1:
        raise ValueError(f"n_features must be >= 1 and min_frequency_ratio >= 1, got {n_features}, "
                         f"{min_frequency_ratio}")
    freq_toxic = (toxic_codes > 0).float().mean(0)
    freq_clean = (clean_codes > 0).float().mean(0)
    # half a clean token's frequency as the floor, so a latent never seen on clean text still needs support
    floor = 0.5 / len(clean_codes)
    passes = (freq_toxic > 0) & (freq_toxic >= min_frequency_ratio * freq_clean.clamp_min(floor))
    strength = torch.where(passes, toxic_codes.amax(0), torch.full_like(freq_toxic, -1.0))
    top = strength.topk(min(n_features, int(passes.sum())))
    return top.indices


def mean_difference(toxic_acts: Tensor, clean_acts: Tensor) -> Tensor:
    """The unit difference-in-means direction pointing from toxic to clean activations."""
    direction = clean_acts.float().mean(0) - toxic_acts.float().mean(0)
    return direction / direction.norm().clamp_min(1e-12)


def random_direction(d: int, seed: int = 0) -> Tensor:
    """A unit direction drawn from a fixed seed (the equal-norm control for any steering direction)."""
    direction = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return direction / direction.norm()


@contextmanager
def add_to_hidden(model: nn.Module, module_name: str, vector: Tensor) -> Iterator[None]:
    """Add `vector` to the hidden state at hookpoint `module_name` (any site, ':input' too), at every position."""
    handle = hook_site(find_hookpoint(model, module_name), lambda hidden: hidden + vector.to(hidden))
    try:
        yield
    finally:
        handle.remove()


@dataclass
class DetoxSteering:
    """A unit steering direction and the residual norm that tiers are shares of."""

    direction: Tensor
    scale: float
    features: Tensor | None = None
    tiers: dict[str, float] = field(default_factory=lambda: dict(TIERS))  # shares of `scale` (see choose_tiers)

    def __post_init__(self) -> None:
        if self.direction.ndim != 1 or not torch.isfinite(self.direction).all():
            raise ValueError("direction must be one finite (d,) vector")
        if not (self.scale > 0 and torch.isfinite(torch.tensor(float(self.scale)))):
            raise ValueError(f"scale must be a positive finite number (a typical residual norm), got {self.scale}")
        self.direction = self.direction / self.direction.norm().clamp_min(1e-12)

    @classmethod
    def from_features(cls, sae: SAE, features: Tensor, scale: float) -> "DetoxSteering":
        """Minus the unit mean of the chosen latents' unit decoder rows."""
        features = torch.as_tensor(features, dtype=torch.long).flatten()
        if not len(features):
            raise ValueError("no toxicity features chosen; lower min_frequency_ratio or collect more toxic text")
        rows = sae.W_dec.detach()[features].float()
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return cls(-rows.mean(0), scale, features)

    def strength(self, tier: str | float) -> float:
        """The added norm for a tier name (see TIERS) or a share of `scale` given as a number."""
        if isinstance(tier, str):
            if tier not in self.tiers:
                raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(self.tiers)} or give a number")
            return self.tiers[tier] * self.scale
        return float(tier) * self.scale

    def vector(self, tier: str | float) -> Tensor:
        return self.strength(tier) * self.direction

    def applied(self, model: nn.Module, module_name: str, tier: str | float):
        """Steer every token at `module_name`'s output while the context is open."""
        return add_to_hidden(model, module_name, self.vector(tier))

    def edit(self, tier: str | float) -> Edit:
        """The same steering as a gate Edit: applied only on tokens where the chosen features fire."""
        return Edit(mode="steer", strength=self.strength(tier), direction=self.direction.clone())


@torch.no_grad()
def continuation_perplexity(model: nn.Module, tokenizer, prompts: Sequence[str], continuations: Sequence[str]) -> Tensor:
    """Perplexity of each continuation given its prompt under `model` (fluency of steered text, unsteered judge)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    device = next(model.parameters()).device
    out = []
    for prompt, continuation in zip(prompts, continuations):
        p = tokenizer(prompt, return_tensors="pt").input_ids
        c = tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids
        if c.shape[1] == 0:
            out.append(float("nan"))
            continue
        ids = torch.cat([p, c], 1).to(device)
        logits = model(input_ids=ids).logits[0, p.shape[1] - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, p.shape[1]:])
        out.append(float(nll.exp()))
    return torch.tensor(out)


@torch.no_grad()
def text_perplexity(model: nn.Module, tokenizer, texts: Sequence[str]) -> float:
    """Token-weighted perplexity of whole texts (each from its first token) under `model` as it runs now."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    if not count:
        raise ValueError("no text has two or more tokens to score")
    return float(torch.tensor(total / count).exp())
