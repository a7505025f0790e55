"""`guard(model, sae=..., concepts=[...])`: patch an SAE gate into a live model.

    g = guard(model, sae=sae, concepts=[Concept("nudity", target=[...], retain=[...])], tokenizer=tok)
    model(**inputs)          # same call, same outputs, flagged inputs edited at the hookpoint
    g.last_verdicts          # one Verdict per input of that call
    g.classify(["a prompt"])  # verdicts without running the rest of the model
    g.detach()               # the model is exactly as before

Concepts given unfitted are fitted here: their target and retain inputs are run through the model up
to the hookpoint, encoded by the SAE, and their features and threshold chosen (see `Concept`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..concepts.concept import Concept
from ..concepts.policy import ConceptPolicy, Verdict, merge_verdicts
from ..hooks.capture import capture_hidden
from ..hooks.gate import Edit, Gate
from ..hooks.hookpoints import Hookpoint, find_hookpoint
from ..sae.base import SAE
from ..sae.codes import SparseCodes
from . import text


class Guard:
    """A live model with SAE gates attached. Also a context manager that detaches on exit."""

    def __init__(self, target: Any, gates: list[Gate], policies: list[ConceptPolicy], tokenizers: list[Any]):
        """One tokenizer per gate: the one that turns strings into inputs of the gate's model."""
        self.target, self.gates, self.policies, self.tokenizers = target, gates, policies, tokenizers
        for gate in gates:
            gate.attach()

    @property
    def concepts(self) -> list[Concept]:
        return [c for policy in self.policies for c in policy.concepts]

    @property
    def last_verdicts(self) -> list[Verdict]:
        """Verdicts of this thread's last guarded call, one per input."""
        return merge_verdicts([policy.last_verdicts for policy in self.policies])

    def classify(self, inputs: Sequence[str] | str, batch_size: int = 32) -> list[Verdict]:
        """Verdicts for `inputs` without editing and without running the model past the hookpoints.

        An empty or blank prompt asks for nothing: it is not run through the model, and its verdict is "pass" with
        every score 0 (a model would otherwise score its bare special tokens, which some concepts fire on).
        """
        if isinstance(inputs, str):
            inputs = [inputs]
        asked = [text for text in inputs if text.strip()]
        scored = iter(self._classify(asked, batch_size))
        return [next(scored) if text.strip() else self._unscored() for text in inputs]

    def _unscored(self) -> Verdict:
        concepts = self.concepts
        return Verdict(False, {c.name: 0.0 for c in concepts}, {c.name: c.threshold for c in concepts}, "pass")

    def _classify(self, inputs: Sequence[str], batch_size: int) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for start in range(0, len(inputs), batch_size):
            chunk = list(inputs[start : start + batch_size])
            per_gate = []
            for gate, policy, tokenizer in zip(self.gates, self.policies, self.tokenizers):
                if tokenizer is None:
                    raise ValueError("classifying strings needs a tokenizer: pass tokenizer=... to guard()")
                with gate_mode(gate, "score"):
                    model_inputs = text.tokenize(tokenizer, gate.hookpoint.model, chunk,
                                                 text.device_of(gate.hookpoint.model))
                    capture_hidden(gate.hookpoint, **model_inputs)
                per_gate.append(policy.last_verdicts)
            verdicts.extend(merge_verdicts(per_gate))
        return verdicts

    def detach(self) -> None:
        """Remove every hook; the model's outputs are again exactly those of the unguarded model."""
        for gate in self.gates:
            gate.detach()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


@contextmanager
def gate_mode(gate: Gate, mode: str) -> Iterator[None]:
    previous = gate.mode
    gate.mode = mode
    try:
        yield
    finally:
        gate.mode = previous


def guard(target: Any, sae: SAE, concepts: Sequence[Concept], hookpoint: str | None = None, tokenizer: Any = None,
          edit: Edit | None = None, mode: str = "deactivate", strength: float = 0.0, batch_size: int = 32) -> Guard:
    """Attach `sae` at `hookpoint` of `target` as a classifier and gate for `concepts`.

    hookpoint: a module path (default: the SAE's recorded hookpoint, else two-thirds up the layers).
    edit / mode / strength: what flagged latents become (see `Edit`); default removes them.
    """
    if not isinstance(target, nn.Module):
        from .diffusers import guard_pipeline  # noqa: PLC0415  (only pipelines reach here)

        return guard_pipeline(target, sae=sae, concepts=concepts, hookpoint=hookpoint, edit=edit or Edit(mode, strength),
                              batch_size=batch_size)
    if not concepts:
        raise ValueError("guard() needs at least one concept")
    name = hookpoint or sae.cfg.metadata.get("hookpoint") or text.default_hookpoint(target)
    point = find_hookpoint(target, name)
    edit = edit or Edit(mode, strength)
    gate, policy = build_gate(point, sae, concepts, tokenizer, edit, batch_size)
    return Guard(target, [gate], [policy], [tokenizer])


def build_gate(point: Hookpoint, sae: SAE, concepts: Sequence[Concept], tokenizer: Any, edit: Edit,
               batch_size: int) -> tuple[Gate, ConceptPolicy]:
    """Check the SAE fits the hookpoint, fit unfitted concepts there, and build the gate."""
    sae.eval()
    encoder = PromptEncoder(point, sae, tokenizer, batch_size)
    width = encoder.width()
    if width != sae.d_in:
        raise ValueError(f"SAE d_in={sae.d_in} does not match the width {width} of hookpoint {point.name!r}")
    for concept in concepts:
        if not concept.fitted:
            concept.fit(encoder, sae.d_sae, sae.W_dec.detach())
    policy = ConceptPolicy(sae, concepts, edit.mode)
    return Gate(point, sae, policy, edit, mask_fn=text.mask_fn_for(point.model)), policy


class PromptEncoder:
    """Strings -> SAE codes of their real tokens at a hookpoint: what concepts are fitted on."""

    def __init__(self, point: Hookpoint, sae: SAE, tokenizer: Any, batch_size: int = 32) -> None:
        self.point, self.sae, self.tokenizer, self.batch_size = point, sae, tokenizer, batch_size

    def width(self) -> int:
        if self.tokenizer is None:
            raise ValueError("fitting concepts from strings needs a tokenizer: pass tokenizer=... to guard()")
        return self._hidden(["a"])[0].shape[-1]

    def _hidden(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        model = self.point.model
        inputs = text.tokenize(self.tokenizer, model, texts, text.device_of(model))
        hidden = capture_hidden(self.point, **inputs)
        real = text.real_tokens(self.point, inputs)
        if real is None:
            real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return hidden, real

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> tuple[SparseCodes, Tensor, int]:
        values, indices, owners = [], [], []
        for start in range(0, len(texts), self.batch_size):
            hidden, real = self._hidden(list(texts[start : start + self.batch_size]))
            rows, cols = real.nonzero(as_tuple=True)
            codes = self.sae.encode_sparse(hidden[rows, cols].to(self.sae.W_enc.device, torch.float32))
            values.append(codes.values)
            indices.append(codes.indices)
            owners.append(rows.to(codes.values.device) + start)
        width = max(v.shape[-1] for v in values)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
        return SparseCodes(torch.cat([pad(v) for v in values]), torch.cat([pad(i) for i in indices])), \
            torch.cat(owners), len(texts)
