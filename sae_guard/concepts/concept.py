"""A concept: the SAE features that carry it and one calibrated threshold.

    nudity = Concept("nudity", target=[...prompts showing it...], retain=[...prompts that must pass...])

Fitting (done by `guard`, or by `fit` on encoded inputs) splits target and retain inputs into a part
for picking features and a held-out part for calibration: the threshold lets through all but a
stated fraction (`fpr`) of held-out retain inputs, and the true-positive rate on held-out target
inputs is recorded beside it. Several concepts share one SAE; adding one needs no retraining.

Most strategies pick features, and an input's score is the largest energy they write at one of its tokens; the
`probe` strategy also weighs them, and the score is a linear readout of their maxima (`scoring`); `token_probe`
weighs them too, and the score is the largest linear readout of one token's code.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..sae.codes import SparseCodes
from .scoring import feature_slots, input_scores, max_activations, readout_scores, token_energies, token_readout_scores
from .selection import STRATEGIES, TOKEN_STRATEGIES

MIN_CALIBRATE = 5  # held-out target and retain inputs, each, below which a threshold and its TPR mean nothing
POOR_TPR = 0.5  # a calibrated TPR below this warns (PoorConceptWarning): the concept misses most of its examples

CONCEPTS_JSON = "concepts.json"


class PoorConceptWarning(UserWarning):
    """A fitted concept that flags under half of its own held-out target inputs at its FPR."""
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
        for side in ("target", "retain", "calibrate_target", "calibrate_retain"):
            inputs = getattr(self, side)
            if isinstance(inputs, (str, bytes)):
                raise TypeError(f"concept {self.name!r}: {side} must be a list of inputs, not one string (it would be "
                                f"read character by character); write {side}=[{inputs!r}]")
            if inputs is not None and not hasattr(inputs, "__len__"):
                raise TypeError(f"concept {self.name!r}: {side} must be a list of inputs, got {type(inputs).__name__}")
        if not isinstance(self.n_features, int) or isinstance(self.n_features, bool) or self.n_features < 1:
            raise ValueError(f"concept {self.name!r}: n_features must be a positive integer, got {self.n_features!r}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"concept {self.name!r}: holdout must be in (0, 1), got {self.holdout}")
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
    def readout(self) -> str:
        """How scores are read: "energy" (features only), "linear" (weighed feature maxima, `probe`) or "token"
        (the best token's weighed code, `token_probe`)."""
        if self.weights is None:
            return "energy"
        return "token" if self.strategy in TOKEN_STRATEGIES else "linear"

    @property
    def fitted(self) -> bool:
        return self.features is not None and self.threshold is not None

    # ---------------------------------------------------------------------- fitting
    def fit(self, encode: Encoder, d_sae: int, W_dec: Tensor) -> "Concept":
        """Pick features on one part of the inputs and calibrate the threshold on the other."""
        if not len(self.target):
            raise ValueError(f"concept {self.name!r} has no target inputs: give examples that show it")
        if _same_inputs(self.target, self.retain):
            raise ValueError(f"concept {self.name!r}: its target and retain inputs are the same, so nothing tells "
                             "the concept apart; retain inputs are ones that must pass")
        fit_t, cal_t = self._split(self.target, self.calibrate_target, salt=1)
        fit_r, cal_r = self._split(self.retain, self.calibrate_retain, salt=2)
        for side, held_out, given in (("target", cal_t, self.calibrate_target), ("retain", cal_r,
                                                                                 self.calibrate_retain)):
            if len(held_out) < MIN_CALIBRATE:
                how = (f"pass calibrate_{side} with at least {MIN_CALIBRATE} inputs" if given is not None else
                       f"give at least {math.ceil(MIN_CALIBRATE / self.holdout)} {side} inputs ({self.holdout:.0%} "
                       f"are held out) or calibrate_{side}=[...]")
                raise ValueError(f"concept {self.name!r} has {len(held_out)} held-out {side} inputs to calibrate on; "
                                 f"a threshold needs at least {MIN_CALIBRATE}: {how}")
        if self.strategy in TOKEN_STRATEGIES:
            if not len(fit_r):
                raise ValueError(f"concept {self.name!r}: the {self.strategy} strategy needs retain inputs to fit on")
            picked = STRATEGIES[self.strategy](encode(fit_t), encode(fit_r), n_features=self.n_features)
        else:
            target_max = _summaries(encode, fit_t, d_sae)
            retain_max = _summaries(encode, fit_r, d_sae) if len(fit_r) else target_max.new_zeros(0, d_sae)
            picked = STRATEGIES[self.strategy](target_max, retain_max, n_features=self.n_features)
        features, weights = picked if isinstance(picked, tuple) else (picked, None)
        if not features.numel():
            raise ValueError(f"concept {self.name!r}: the {self.strategy} strategy chose no feature telling its "
                             f"{len(fit_t)} target from its {len(fit_r)} retain inputs at this hookpoint; try another "
                             "strategy, hookpoint or more varied examples")
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
            "readout": self.readout,
        }
        self._check_calibration()
        return self

    def _check_calibration(self) -> None:
        tpr, fitted_on = self.calibration["tpr"], (
            f"strategy {self.strategy!r}, {int(self.features.numel())} features, fitted on "
            f"{self.calibration['n_fit_target']} target / {self.calibration['n_fit_retain']} retain inputs and "
            f"calibrated on {self.calibration['n_calibrate_target']} / {self.calibration['n_calibrate_retain']}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"concept {self.name!r}: its threshold came out {self.threshold} ({fitted_on})")
        if tpr == 0:
            raise ValueError(f"concept {self.name!r} flags none of its held-out target inputs at FPR {self.fpr:g}: it "
                             f"could never flag ({fitted_on}); give more varied examples or another strategy")
        if tpr < POOR_TPR:
            warnings.warn(f"concept {self.name!r} flags only {tpr:.0%} of its held-out target inputs at FPR "
                          f"{self.fpr:g} ({fitted_on})", PoorConceptWarning, stacklevel=3)

    def scores(self, encode: Encoder, inputs: Sequence[Any], d_sae: int, W_dec: Tensor) -> Tensor:
        """Each input's score for this concept."""
        if not len(inputs):
            return torch.zeros(0)
        codes, index, n = encode(inputs)
        return self.score_codes(codes, index, n, W_dec)[0].cpu()

    def score_codes(self, codes: SparseCodes, input_index: Tensor, n_inputs: int, W_dec: Tensor,
                    lookup: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(n_inputs,) scores from the codes of every real token, and (N,) the tokens that carry the concept:
        energy above the threshold (energy readout), a positive-weight feature's maximum (linear readout), or a
        token score above the threshold (token readout).
        `lookup`: this concept's `lookup()` table when the caller holds it (a gate scores every pass)."""
        if lookup is None:
            lookup = self.lookup(W_dec.shape[0], W_dec.device)
        if self.readout == "token":
            return token_readout_scores(codes, input_index, n_inputs, lookup, self.weights, self.threshold)
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
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(self.seed * 31 + salt)).tolist()
        n_hold = max(1, int(round(self.holdout * len(inputs))))
        return [inputs[i] for i in order[n_hold:]], [inputs[i] for i in order[:n_hold]]

    # ---------------------------------------------------------------------- files
    def state(self) -> dict[str, Any]:
        return {"name": self.name, "strategy": self.strategy, "n_features": self.n_features, "fpr": self.fpr,
                "threshold": self.threshold, "calibration": self.calibration}


def _same_inputs(target: Sequence[Any], retain: Sequence[Any]) -> bool:
    """Whether two input lists hold the same inputs (strings and other hashables; tensors are not compared)."""
    try:
        return bool(len(retain)) and set(target) == set(retain)
    except TypeError:
        return False


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
