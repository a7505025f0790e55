"""The concepts' side of a gate: score every input, flag it, choose what to edit, keep verdicts.

A `ConceptPolicy` is the `decide` callable a `Gate` asks on every pass: it scores each input for each
concept over its real tokens (`Concept.score_codes`), flags the inputs whose score exceeds the concept's
threshold, and chooses the flagged concepts' latents on the flagged inputs' tokens for editing.

Each verdict also records how much of the input the SAE could not read: the largest relative reconstruction
error ||x - x_hat|| / ||x|| over its real tokens. A word the SAE never learned lives in that error, where no
concept can see it, so a high error says "not flagged" means "not known" rather than "known clean".
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..hooks.gate import GateCall
from ..sae.base import SAE
from ..sae.codes import SparseCodes
from .concept import Concept
from .scoring import latent_contributions, token_scores


@dataclass
class Verdict:
    """What the guard decided about one input."""

    flagged: bool
    scores: dict[str, float]
    thresholds: dict[str, float]
    action: str  # "pass", "flag" (classification only), or the edit applied ("deactivate", ...)
    concepts: list[str] = field(default_factory=list)  # the concepts that flagged it
    tokens: dict[str, list[int]] = field(default_factory=dict)  # positions whose energy exceeded the threshold
    error: float | None = None  # largest relative reconstruction error of the SAE over the real tokens
    windows: int = 1  # how many windows of a text longer than one model call were read (the largest score kept)
    # per flagged concept, the latents that carried it (`scoring.latent_contributions`); filled only while
    # `explaining(...)`, so ordinary verdicts cost nothing more
    latents: dict[str, list[dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class ConceptPolicy:
    def __init__(self, sae: SAE, concepts: Sequence[Concept], action: str) -> None:
        unfitted = [c.name for c in concepts if not c.fitted]
        if unfitted:
            raise ValueError(f"concepts {unfitted} are not fitted; fit them (guard() does) before gating")
        broken = [c.name for c in concepts if not math.isfinite(c.threshold)]
        if broken:
            raise ValueError(f"concepts {broken} have a NaN or infinite threshold: they would never flag (or always); "
                             "refit them")
        names = [c.name for c in concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"concept names must be unique, got {names}")
        self.sae, self.concepts, self.action = sae, list(concepts), action
        device = sae.W_dec.device
        self.members = torch.stack([c.members(sae.d_sae, device) for c in concepts]) if concepts else \
            torch.zeros(0, sae.d_sae, dtype=torch.bool, device=device)
        self.lookups = [c.lookup(sae.d_sae, device) for c in concepts]
        self.thresholds = torch.tensor([c.threshold for c in concepts], dtype=torch.float32, device=device)
        self._state = threading.local()
        self.explain = False  # fill Verdict.latents (see `explaining`)

    @property
    def last_verdicts(self) -> list[Verdict]:
        """Verdicts of this thread's last pass through the gate, one per input."""
        return getattr(self._state, "verdicts", [])

    def __call__(self, call: GateCall) -> Tensor:
        codes = call.codes
        per_concept = [c.score_codes(codes, call.prompt_index, call.n_prompts, self.sae.W_dec, lookup)
                       for c, lookup in zip(self.concepts, self.lookups)]
        scores = torch.stack([s for s, _ in per_concept], -1) if per_concept else \
            codes.values.new_zeros(call.n_prompts, 0)  # (B, C)
        fired = torch.stack([f for _, f in per_concept], -1) if per_concept else \
            torch.zeros(codes.values.shape[0], 0, dtype=torch.bool, device=codes.values.device)  # (N, C)
        read = torch.zeros(call.n_prompts, dtype=torch.bool, device=scores.device)
        read[call.prompt_index.to(scores.device)] = True  # an input with no scoring position says nothing: never flagged
        flagged = (scores > self.thresholds) & read[:, None]
        self._state.verdicts = self._verdicts(scores, flagged, fired, call, self._errors(call))
        token_flags = flagged[call.prompt_index]  # (N, C)
        member_of = self.members.T[codes.indices]  # (N, k, C)
        return (member_of & token_flags[:, None, :]).any(-1) & (codes.values != 0)

    def _errors(self, call: GateCall) -> list[float | None]:
        """Per input, the largest relative reconstruction error over its real tokens (None without the states)."""
        if call.states is None:
            return [None] * call.n_prompts
        x = call.states
        relative = (x - self.sae.decode(call.codes)).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
        worst = relative.new_zeros(call.n_prompts).scatter_reduce(0, call.prompt_index, relative, "amax")
        return worst.tolist()

    def _verdicts(self, scores: Tensor, flagged: Tensor, fired: Tensor, call: GateCall,
                  errors: list[float | None]) -> list[Verdict]:
        names = [c.name for c in self.concepts]
        thresholds = dict(zip(names, self.thresholds.tolist()))
        verdicts = []
        scores_list, flagged_list = scores.tolist(), flagged.tolist()
        for b in range(call.n_prompts):
            hits = [name for name, f in zip(names, flagged_list[b]) if f]
            tokens, latents = {}, {}
            if hits:
                rows = call.prompt_index == b
                for c, name in enumerate(names):
                    if flagged_list[b][c]:
                        tokens[name] = call.token_index[rows & fired[:, c]].tolist()
                        if self.explain:
                            latents[name] = self._explain(c, call, rows)
            action = "pass" if not hits else (self.action if call.editing else "flag")
            verdicts.append(Verdict(bool(hits), dict(zip(names, scores_list[b])), thresholds, action, hits, tokens,
                                    errors[b], latents=latents))
        return verdicts


    def _explain(self, c: int, call: GateCall, rows: Tensor) -> list[dict]:
        concept = self.concepts[c]
        codes = SparseCodes(call.codes.values[rows], call.codes.indices[rows])
        tokens = call.token_index[rows]
        if concept.readout == "token":  # its score is one token's: the latents that carried that token
            best = int(token_scores(codes, self.lookups[c], concept.weights).argmax())
            keep = slice(best, best + 1)
            codes, tokens = SparseCodes(codes.values[keep], codes.indices[keep]), tokens[keep]
        return latent_contributions(codes, tokens, self.lookups[c], concept.weights, self.sae.W_dec)


@contextmanager
def explaining(policies: Sequence[ConceptPolicy]) -> Iterator[None]:
    """Within the block, verdicts of these policies name the latents that carried each flagged concept
    (`Verdict.latents`): `with explaining(guard.policies): guard.classify(prompts)`."""
    previous = [p.explain for p in policies]
    for policy in policies:
        policy.explain = True
    try:
        yield
    finally:
        for policy, before in zip(policies, previous):
            policy.explain = before


def merge_verdicts(per_gate: Sequence[Sequence[Verdict]]) -> list[Verdict]:
    """One verdict per input from several gates: flagged by any; per concept the gate with the largest margin;
    the largest reconstruction error of any gate."""
    per_gate = [v for v in per_gate if v]
    if not per_gate:
        return []
    if len(per_gate) == 1:
        return list(per_gate[0])
    merged = []
    for parts in zip(*per_gate):
        scores, thresholds, tokens, latents, hits = {}, {}, {}, {}, []
        for part in parts:
            for name, score in part.scores.items():
                margin = score / max(part.thresholds[name], 1e-12)
                if name not in scores or margin > scores[name] / max(thresholds[name], 1e-12):
                    scores[name], thresholds[name] = score, part.thresholds[name]
            for name in part.concepts:
                if name not in hits:
                    hits.append(name)
                tokens.setdefault(name, part.tokens.get(name, []))
                if name in part.latents:
                    latents.setdefault(name, part.latents[name])
        actions = [p.action for p in parts if p.action != "pass"]
        errors = [p.error for p in parts if p.error is not None]
        merged.append(Verdict(bool(hits), scores, thresholds, actions[0] if actions else "pass", hits, tokens,
                              max(errors) if errors else None, latents=latents))
    return merged
