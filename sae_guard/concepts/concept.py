"""A concept: the SAE features that carry it and one calibrated threshold.

    nudity = Concept("nudity", target=[...prompts showing it...], retain=[...prompts that must pass...])

Fitting (done by `guard`, or by `fit` on encoded inputs) splits target and retain inputs into a part
for picking features and a held-out part for calibration: the threshold lets through all but a
stated fraction (`fpr`) of held-out retain inputs, and the true-positive rate on held-out target
inputs is recorded beside it. Several concepts share one SAE; adding one needs no retraining.

Most strategies pick features, and an input's score is the largest energy they write at one of its tokens; the
`probe` strategy also weighs them, and the score is a linear readout of their maxima (`scoring`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..sae.codes import SparseCodes
from .scoring import feature_slots, input_scores, max_activations, readout_scores, token_energies
from .selection import STRATEGIES

CONCEPTS_JSON = "concepts.json"
CONCEPTS_WEIGHTS = "concepts.safetensors"

# encode(inputs) -> (codes of every real token (N, k), input index of each token (N,), number of inputs)
Encoder = Callable[[Sequence[Any]], tuple[SparseCodes, Tensor, int]]


@dataclass
class Concept:
    name: str
    target: Sequence[Any] = ()
    retain: Sequence[Any] = ()
    strategy: str = "coverage"
    n_features: int = 32
    fpr: float = 0.01
    holdout: float = 0.3  # share of target and retain inputs held out for calibration
    calibrate_target: Sequence[Any] | None = None  # explicit calibration inputs (instead of a holdout)
    calibrate_retain: Sequence[Any] | None = None
    seed: int = 0
    # fitted state
    features: Tensor | None = None
    weights: Tensor | None = None  # signed weight per feature for a linear readout (`probe`); None: energy
    threshold: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a concept needs a non-empty name")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown feature strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if not 0 < self.fpr < 1:
            raise ValueError(f"fpr must be in (0, 1), got {self.fpr}")

    def __repr__(self) -> str:
        if not self.fitted:
            return f"Concept({self.name!r}, unfitted, {len(self.target)} target / {len(self.retain)} retain inputs)"
        measured = self.calibration
        figures = f", calibrated TPR {measured['tpr']:.3f} at FPR {measured['fpr']:.3f}" if "tpr" in measured else ""
        return (f"Concept({self.name!r}, {self.strategy}, {int(self.features.numel())} features, "
                f"threshold {self.threshold:.4g}{figures})")

    @property
    def fitted(self) -> bool:
        return self.features is not None and self.threshold is not None

    # ---------------------------------------------------------------------- fitting
    def fit(self, encode: Encoder, d_sae: int, W_dec: Tensor) -> "Concept":
        """Pick features on one part of the inputs and calibrate the threshold on the other."""
        if not len(self.target):
            raise ValueError(f"concept {self.name!r} has no target inputs: give examples that show it")
        fit_t, cal_t = self._split(self.target, self.calibrate_target, salt=1)
        fit_r, cal_r = self._split(self.retain, self.calibrate_retain, salt=2)
        if not len(cal_r):
            raise ValueError(f"concept {self.name!r} needs retain inputs to calibrate its threshold against")
        target_max = _summaries(encode, fit_t, d_sae)
        retain_max = _summaries(encode, fit_r, d_sae) if len(fit_r) else target_max.new_zeros(0, d_sae)
        picked = STRATEGIES[self.strategy](target_max, retain_max, n_features=self.n_features)
        features, weights = picked if isinstance(picked, tuple) else (picked, None)
        self.features = features.cpu().long()
        self.weights = weights.cpu().float() if weights is not None else None
        retain_scores = self.scores(encode, cal_r, d_sae, W_dec)
        target_scores = self.scores(encode, cal_t, d_sae, W_dec)
        self.threshold = threshold_at_fpr(retain_scores, self.fpr)
        self.calibration = {
            "fpr_target": self.fpr,
            "fpr": (retain_scores > self.threshold).float().mean().item(),
            "tpr": (target_scores > self.threshold).float().mean().item(),
            "n_calibrate_target": len(cal_t), "n_calibrate_retain": len(cal_r),
            "n_fit_target": len(fit_t), "n_fit_retain": len(fit_r),
            "n_features": int(self.features.numel()), "strategy": self.strategy,
            "readout": "linear" if self.weights is not None else "energy",
        }
        return self

    def scores(self, encode: Encoder, inputs: Sequence[Any], d_sae: int, W_dec: Tensor) -> Tensor:
        """Each input's score for this concept."""
        if not len(inputs):
            return torch.zeros(0)
        codes, index, n = encode(inputs)
        return self.score_codes(codes, index, n, W_dec)[0].cpu()

    def score_codes(self, codes: SparseCodes, input_index: Tensor, n_inputs: int, W_dec: Tensor,
                    lookup: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(n_inputs,) scores from the codes of every real token, and (N,) the tokens that carry the concept:
        energy above the threshold (energy readout), or a positive-weight feature's maximum (linear readout).
        `lookup`: this concept's `lookup()` table when the caller holds it (a gate scores every pass)."""
        if lookup is None:
            lookup = self.lookup(W_dec.shape[0], W_dec.device)
        if self.weights is not None:
            return readout_scores(codes, input_index, n_inputs, lookup, self.weights)
        energy = token_energies(codes, lookup[None], W_dec)
        fired = energy[:, 0] > (self.threshold if self.threshold is not None else 0.0)
        return input_scores(energy, input_index, n_inputs)[:, 0], fired

    def lookup(self, d_sae: int, device: torch.device | str = "cpu") -> Tensor:
        """(d_sae,) what scoring reads per latent: the `members()` mask (energy readout) or each feature's slot in
        the weights (linear readout, `scoring.feature_slots`)."""
        if self.weights is None:
            return self.members(d_sae, device)
        return feature_slots(self.features, d_sae, device)

    def members(self, d_sae: int, device: torch.device | str = "cpu") -> Tensor:
        """(d_sae,) bool: the latents a gate edits for this concept (a linear readout's positive-weight ones)."""
        if self.features is None:
            raise RuntimeError(f"concept {self.name!r} is not fitted yet")
        features = self.features if self.weights is None else self.features[self.weights > 0]
        member = torch.zeros(d_sae, dtype=torch.bool, device=device)
        member[features.to(device)] = True
        return member

    def _split(self, inputs: Sequence[Any], explicit: Sequence[Any] | None, salt: int) -> tuple[list, list]:
        inputs = list(inputs)
        if explicit is not None:
            return inputs, list(explicit)
        if len(inputs) < 2:
            return inputs, inputs
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(self.seed * 31 + salt)).tolist()
        n_hold = max(1, int(round(self.holdout * len(inputs))))
        return [inputs[i] for i in order[n_hold:]], [inputs[i] for i in order[:n_hold]]

    # ---------------------------------------------------------------------- files
    def state(self) -> dict[str, Any]:
        return {"name": self.name, "strategy": self.strategy, "n_features": self.n_features, "fpr": self.fpr,
                "threshold": self.threshold, "calibration": self.calibration}


def threshold_at_fpr(retain_scores: Tensor, fpr: float) -> float:
    """The score above which at most a fraction `fpr` of the retain scores lie."""
    if retain_scores.numel() == 0:
        raise ValueError("cannot calibrate a threshold without retain scores")
    allowed = int(math.floor(fpr * retain_scores.numel() + 1e-9))  # 0.29 * 100 is 28.999... in floats
    ordered = retain_scores.sort(descending=True).values
    return float(ordered[min(allowed, ordered.numel() - 1)])


def _summaries(encode: Encoder, inputs: Sequence[Any], d_sae: int) -> Tensor:
    codes, index, n = encode(inputs)
    return max_activations(codes, index, n, d_sae).cpu()


def save_concepts(concepts: Sequence[Concept], directory: str | Path) -> Path:
    """Write fitted concepts as concepts.json + concepts.safetensors (feature indices, readout weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unfitted = [c.name for c in concepts if not c.fitted]
    if unfitted:
        raise ValueError(f"cannot save unfitted concepts: {unfitted}")
    tensors = {f"features.{c.name}": c.features.contiguous() for c in concepts}
    tensors |= {f"weights.{c.name}": c.weights.contiguous() for c in concepts if c.weights is not None}
    save_file(tensors, str(directory / CONCEPTS_WEIGHTS))
    (directory / CONCEPTS_JSON).write_text(json.dumps([c.state() for c in concepts], indent=2) + "\n")
    return directory


def load_concepts(directory: str | Path) -> list[Concept]:
    directory = Path(directory)
    if not (directory / CONCEPTS_JSON).exists():
        raise FileNotFoundError(f"no {CONCEPTS_JSON} in {directory}")
    tensors = load_file(str(directory / CONCEPTS_WEIGHTS))
    concepts = []
    for entry in json.loads((directory / CONCEPTS_JSON).read_text()):
        concept = Concept(entry["name"], strategy=entry["strategy"], n_features=entry["n_features"],
                          fpr=entry["fpr"])
        concept.features = tensors[f"features.{entry['name']}"]
        concept.weights = tensors.get(f"weights.{entry['name']}")
        concept.threshold = entry["threshold"]
        concept.calibration = entry["calibration"]
        concepts.append(concept)
    return concepts
