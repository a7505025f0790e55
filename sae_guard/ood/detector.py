"""Out-of-distribution detection with SAE features, beside the usual baselines, in one table.

    detector = OODDetector(vit, sae, "blocks.2").fit(id_images)      # in-distribution images only
    scores = detector.score(new_images)                              # {method: (n,) tensor}, higher = more OOD

Why SAE scores: an SAE trained on in-distribution activations has learned a dictionary of what that distribution
contains. An input the model has not been trained for either reconstructs badly (the SAE has no atoms for it) or
is written with atoms that are rare in-distribution, or with an unusual mixture of them. Each is one score:

- `sae_error`: reconstruction error relative to the token's norm, mean over an image's tokens (`_max`: the worst);
- `sae_rarity`: -log of the in-distribution firing frequency of each active latent, averaged over the active
  latents and the tokens (rare-latent mass; `_max`: the rarest token);
- `sae_profile`: L1 distance between the image's latent firing profile (share of its tokens each latent fires on)
  and the in-distribution profile;
- `sae_knn`: cosine distance to the k-th nearest in-distribution image in the pooled SAE code space;
- `sae_mahalanobis`: Mahalanobis distance of the pooled SAE code (mean over tokens) to one Gaussian fitted on the
  in-distribution pooled codes;
- `sae_conditional`: class-conditional Mahalanobis (Lee et al. 2018) on the pre-logit features, with the SAE's
  latents as the classes the in-distribution set has no labels for: ID images are grouped by their two most active
  latents (pooled over tokens), each group gets its mean, all share one covariance, and an image scores its
  distance to the nearest group. One Gaussian blurs the ID modes together; the SAE's latents separate them;
- `sae_fused`: `sae_conditional` (a squared distance) plus `fused_weight` (default `FUSED_WEIGHT`) times the
  squared excess of `sae_error` over its in-distribution mean, in in-distribution standard deviations (0 below the
  mean). The two fail on different shifts: error sees inputs the dictionary cannot write (textures, noise, photos)
  at the hookpoint, the conditional score sees new combinations of known parts (a new shape drawn with known edges)
  where the model has composed them. Squared and added, a large excess error dominates, while the small excess
  error of a new shape barely moves the conditional distance (a plain sum of the two standardised scores let that
  noise cost the new shape 0.03 AUROC on the benchmark's ViT).

Baselines, on the model's own outputs: `msp` (1 - max softmax probability; Hendrycks & Gimpel 2017), `energy`
(-logsumexp of the logits; Liu et al. 2020), `mahalanobis` (distance of the pre-logit features to one Gaussian fitted
in-distribution, its covariance shrunk by `SHRINKAGE`: the models here have no class labels for the ID set) and `knn`
(cosine distance to the k-th nearest in-distribution pre-logit feature; Sun et al. 2022).

Images reach the model through `VisionAdapter.pixels` (PIL images through the model's own preprocessing, or
preprocessed tensors). The model must be a timm classifier (`forward_features` / `forward_head`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.vision import VisionAdapter, as_tokens, harvest_tokens, image_batches
from ..hooks.capture import eval_mode
from ..hooks.hookpoints import find_hookpoint, hook_site
from ..sae import SAE

SAE_SCORES = ("sae_error", "sae_error_max", "sae_rarity", "sae_rarity_max", "sae_profile", "sae_knn",
              "sae_mahalanobis", "sae_conditional", "sae_fused")
BASELINES = ("msp", "energy", "mahalanobis", "knn")
METHODS = SAE_SCORES + BASELINES
FUSED_WEIGHT = 16.0  # chosen on the benchmark's validation sets from 1, 4, 16, 64, 256


class NotFittedError(RuntimeError):
    """`score` was called before `fit`."""


# ---------------------------------------------------------------------------------------------- free score functions
def relative_error(x: Tensor, reconstruction: Tensor) -> Tensor:
    """(n, tokens) squared reconstruction error over the token's squared norm."""
    return (x - reconstruction).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-8)


def rarity(codes: Tensor, log_frequency: Tensor) -> Tensor:
    """(n, tokens) mean -log in-distribution firing frequency of the latents active on each token (0: none active)."""
    active = codes > 0
    return (active.float() @ -log_frequency) / active.sum(-1).clamp_min(1)


def profile_distance(codes: Tensor, reference_profile: Tensor) -> Tensor:
    """(n,) L1 distance of each image's firing profile (share of its tokens each latent fires on) to the ID one."""
    return ((codes > 0).float().mean(1) - reference_profile).abs().sum(-1)


def kth_neighbour_distance(features: Tensor, bank: Tensor, k: int) -> Tensor:
    """(n,) cosine distance of each feature to its k-th nearest row of `bank` (rows of `bank` unit-normalised)."""
    similarity = F.normalize(features, dim=-1) @ bank.T
    return 1 - similarity.topk(min(k, bank.shape[0]), dim=-1).values[:, -1]


def mahalanobis(features: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """(n,) squared Mahalanobis distance to one Gaussian."""
    centred = features - mean
    return ((centred @ precision) * centred).sum(-1)


SHRINKAGE = 1e-5  # the baseline Mahalanobis's best on the ViT benchmark's validation sets; used by every Gaussian here


def gaussian(features: Tensor, shrinkage: float = SHRINKAGE) -> tuple[Tensor, Tensor]:
    """Mean and precision of one Gaussian fitted to (n, d) features, the covariance shrunk towards its mean variance
    (the ID sets here are small next to the width, so the raw covariance is singular)."""
    mean = features.mean(0)
    covariance = torch.cov((features - mean).T.double()).reshape(features.shape[1], features.shape[1])
    ridge = shrinkage * covariance.diagonal().mean().clamp_min(1e-12)
    precision = torch.linalg.inv(covariance + ridge * torch.eye(len(covariance), dtype=covariance.dtype))
    return mean, precision.float()


def grouped_gaussians(features: Tensor, groups: Tensor, shrinkage: float = SHRINKAGE) -> tuple[Tensor, Tensor]:
    """Means of the non-empty groups of (n, d) features and one shared (tied) precision of the within-group
    deviations, shrunk as in `gaussian`: the class-conditional model of Lee et al. with `groups` as the labels."""
    labels, groups = torch.unique(groups, return_inverse=True)
    means = torch.zeros(len(labels), features.shape[1], dtype=features.dtype).index_add_(0, groups, features)
    means /= torch.bincount(groups, minlength=len(labels)).unsqueeze(1)
    _, precision = gaussian(features - means[groups], shrinkage)
    return means, precision


def leading_pair(codes: Tensor) -> Tensor:
    """(n,) one id per unordered pair of the two most active latents of each (n, d_sae) code."""
    pair = codes.topk(2, dim=-1).indices.sort(-1).values
    return pair[:, 0] * codes.shape[-1] + pair[:, 1]


def nearest_mahalanobis(features: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """(n,) squared Mahalanobis distance to the nearest of several means sharing one precision."""
    centred = features.unsqueeze(1) - means
    return ((centred @ precision) * centred).sum(-1).min(-1).values


def max_softmax(logits: Tensor) -> Tensor:
    """(n,) 1 - the largest softmax probability (confident predictions are in-distribution)."""
    return 1 - logits.softmax(-1).max(-1).values


def energy(logits: Tensor) -> Tensor:
    """(n,) -logsumexp of the logits."""
    return -torch.logsumexp(logits, -1)


# ---------------------------------------------------------------------------------------------- the detector
class OODDetector:
    """Fit on in-distribution images, then score new ones with every method (higher = more out-of-distribution)."""

    def __init__(self, model: nn.Module, sae: SAE, hookpoint: str, *, k_neighbours: int = 10,
                 shrinkage: float = SHRINKAGE, fused_weight: float = FUSED_WEIGHT, batch_size: int = 64,
                 preprocess: Callable[[Any], Tensor] | None = None) -> None:
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise ValueError(f"{type(model).__name__} is not a timm classifier (no forward_features/forward_head); "
                             "OODDetector needs its logits and pre-logit features for the baselines")
        if k_neighbours < 1 or batch_size < 1:
            raise ValueError(f"k_neighbours and batch_size must be positive, got {k_neighbours} and {batch_size}")
        if not fused_weight >= 0:
            raise ValueError(f"fused_weight must be >= 0, got {fused_weight}")
        if not shrinkage > 0:
            raise ValueError(f"shrinkage must be positive (the ID sets are small next to the width), got {shrinkage}")
        self.model, self.sae, self.k, self.shrinkage = model, sae, k_neighbours, shrinkage
        self.fused_weight = fused_weight
        self.batch_size = batch_size
        self.adapter = VisionAdapter(model, preprocess=preprocess)
        self.point = find_hookpoint(model, hookpoint)
        width = self._hidden_width()
        if width != sae.d_in:
            raise ValueError(f"the SAE reads {sae.d_in}-d activations but {hookpoint!r} gives {width}-d ones: "
                             "train or load an SAE on this hookpoint")
        self.state: dict[str, Tensor] | None = None

    def fit(self, images: Any) -> OODDetector:
        """Record what every score needs from in-distribution images: firing frequencies and profile, the pooled-code
        and feature banks for KNN, the feature mean and shrunk precision for Mahalanobis, the SAE-grouped Gaussians,
        and the in-distribution centre and spread of the reconstruction error that `sae_fused` reads.

        The centre and spread come from images the other statistics did not see (every fourth image scored by a
        state fitted on the rest): scored against statistics that include themselves, the fit images would look
        more in-distribution than any new in-distribution image does (an image is its own nearest neighbour, a
        group of one its own mean). The SAE is the caller's: one trained on these same images (as `train_ood_sae`
        on the benchmark's fit set) reconstructs them a little better than new ones, which then read a little
        above 0 on the excess error."""
        run = self._run(images)
        n = len(run["codes"])
        if n < 8:
            raise ValueError(f"fit needs at least 8 in-distribution images, got {n}")
        width = run["pre_logits"].shape[1]
        if n < 4 * width and self.shrinkage < 1e-2:
            warnings.warn(f"{n} in-distribution images for {width}-d features: with shrinkage {self.shrinkage:g} the "
                          "Gaussian scores (mahalanobis, sae_conditional, sae_fused) rest on a covariance this few "
                          "images cannot estimate; fit on more images or pass shrinkage=0.1", stacklevel=2)
        held = torch.arange(n) % 4 == 3
        self.state = self._statistics({name: value[~held] for name, value in run.items()})
        calibration = self._scores({name: value[held] for name, value in run.items()})
        self.state = self._statistics(run)
        self.state["error_centre"] = calibration["sae_error"].mean()
        self.state["error_spread"] = calibration["sae_error"].std().clamp_min(1e-12)
        return self

    def _statistics(self, run: dict[str, Tensor]) -> dict[str, Tensor]:
        codes, pre = run["codes"], run["pre_logits"]
        fired = (codes > 0).float()
        floor = 1.0 / (fired.shape[0] * fired.shape[1] + 1)
        pooled = codes.mean(1)
        mean, precision = gaussian(pre, self.shrinkage)
        code_mean, code_precision = gaussian(pooled, self.shrinkage)
        group_means, group_precision = grouped_gaussians(pre, leading_pair(pooled), self.shrinkage)
        return {"log_frequency": fired.mean((0, 1)).clamp_min(floor).log(), "profile": fired.mean(1).mean(0),
                "code_bank": F.normalize(pooled, dim=-1), "feature_bank": F.normalize(pre, dim=-1),
                "mean": mean, "precision": precision, "code_mean": code_mean, "code_precision": code_precision,
                "group_means": group_means, "group_precision": group_precision}

    def score(self, images: Any) -> dict[str, Tensor]:
        """{method: (n,) scores} for every method in `METHODS`, higher = more out-of-distribution."""
        if self.state is None:
            raise NotFittedError("the detector is not fitted: call .fit(in_distribution_images) first")
        scores = self._scores(self._run(images))
        s = self.state
        excess = ((scores["sae_error"] - s["error_centre"]) / s["error_spread"]).clamp_min(0)
        return {**scores, "sae_fused": scores["sae_conditional"] + self.fused_weight * excess.square()}

    def _scores(self, run: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every method but the fused one, from one pass's tensors."""
        s = self.state
        codes, hidden, recon = run["codes"], run["hidden"], run["reconstruction"]
        error, rare = relative_error(hidden, recon), rarity(codes, s["log_frequency"])
        return {
            "sae_error": error.mean(1), "sae_error_max": error.max(1).values,
            "sae_rarity": rare.mean(1), "sae_rarity_max": rare.max(1).values,
            "sae_profile": profile_distance(codes, s["profile"]),
            "sae_knn": kth_neighbour_distance(codes.mean(1), s["code_bank"], self.k),
            "sae_mahalanobis": mahalanobis(codes.mean(1), s["code_mean"], s["code_precision"]),
            "sae_conditional": nearest_mahalanobis(run["pre_logits"], s["group_means"], s["group_precision"]),
            "msp": max_softmax(run["logits"]), "energy": energy(run["logits"]),
            "mahalanobis": mahalanobis(run["pre_logits"], s["mean"], s["precision"]),
            "knn": kth_neighbour_distance(run["pre_logits"], s["feature_bank"], self.k),
        }

    # ------------------------------------------------------------------ one pass over images
    def _run(self, images: Any) -> dict[str, Tensor]:
        """Hidden tokens at the hookpoint, their SAE codes and reconstructions, logits and pre-logit features."""
        parts: dict[str, list[Tensor]] = {}
        for batch in image_batches(images, self.batch_size):
            for name, value in self._forward(self.adapter.pixels(batch)).items():
                parts.setdefault(name, []).append(value)
        return {name: torch.cat(values) for name, values in parts.items()}

    @torch.no_grad()
    def _forward(self, pixels: Tensor) -> dict[str, Tensor]:
        captured: list[Tensor] = []
        handle = hook_site(self.point, lambda hidden: captured.append(hidden), prepend=False)
        try:
            with eval_mode(self.model):
                features = self.model.forward_features(pixels)
                logits = self.model.forward_head(features)
                pre_logits = self.model.forward_head(features, pre_logits=True)
        finally:
            handle.remove()
        hidden = as_tokens(captured[0]).float()
        codes = self.sae.encode(hidden)
        return {"hidden": hidden, "codes": codes, "reconstruction": self.sae.decode(codes), "logits": logits.float(),
                "pre_logits": pre_logits.float().flatten(1)}

    @torch.no_grad()
    def _hidden_width(self) -> int:
        from ..hooks.capture import capture_hidden  # noqa: PLC0415

        return as_tokens(capture_hidden(self.point, self.adapter.pixels(self.adapter.probe_inputs()))).shape[-1]


def train_ood_sae(model: nn.Module, hookpoint: str, images: Any, *, d_sae: int, k: int, tokens: int,
                  seed: int = 0, lr: float | None = None, progress: bool = False) -> tuple[SAE, dict]:
    """A TopK SAE trained on the in-distribution images' tokens at `hookpoint` only; returns it (eval mode) and its
    training figures.

    lr: None is Gao et al.'s 1/sqrt(d_sae) rate (`SAE.width_lr`) without the raise that
    `SAE.default_lr` gives inputs narrower than 768. The fit set is a few thousand tokens replayed for many passes,
    and the raised rate trades the code geometry the kNN score reads for reconstruction: the shipped ViT's blocks.2
    (96-d), 2,040 tokens, d_sae 128, 150k tokens: FVU 0.126 -> 0.066 but sae_knn's noise AUROC 0.94 -> 0.52 (0.97
    at 4e-3, 0.86 at 8e-3). The dead-latent window stays a tenth of the run. With both, the SAE is the one the OOD
    figures in benchmarks/RESULTS.md were measured with."""
    from ..train import train  # noqa: PLC0415
    from ..train.trainer import tenth_of_run_dead_tokens  # noqa: PLC0415

    acts = harvest_tokens(model, hookpoint, images)
    batch_size = min(1024, len(acts))
    torch.manual_seed(seed)
    sae = SAE.create("topk", d_in=acts.shape[1], d_sae=d_sae, k=k,
                     dead_tokens=tenth_of_run_dead_tokens(tokens, batch_size))
    lr = sae.width_lr() if lr is None else lr
    sae, figures = train(sae, acts, tokens=tokens, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    return sae.eval(), figures
