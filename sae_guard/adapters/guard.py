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
from ..hooks.gate import Edit, Gate, scoring_positions
from ..hooks.hookpoints import Hookpoint, find_hookpoint
from ..sae.base import SAE
from ..sae.codes import SparseCodes
from .base import Adapter
from .registry import adapter_for


class Guard:
    """A live model with SAE gates attached. Also a context manager that detaches on exit."""

    def __init__(self, target: Any, gates: list[Gate], policies: list[ConceptPolicy], adapters: list[Adapter]):
        """One adapter per gate: the one that turns user inputs into calls of the gate's model."""
        self.target, self.gates, self.policies, self.adapters = target, gates, policies, adapters
        for gate in gates:
            gate.attach()

    @property
    def concepts(self) -> list[Concept]:
        return [c for policy in self.policies for c in policy.concepts]

    @property
    def tokenizers(self) -> list[Any]:
        return [adapter.tokenizer for adapter in self.adapters]

    @property
    def last_verdicts(self) -> list[Verdict]:
        """Verdicts of this thread's last guarded call, one per input."""
        return merge_verdicts([policy.last_verdicts for policy in self.policies])

    def classify(self, inputs: Sequence[Any] | str, batch_size: int = 32) -> list[Verdict]:
        """Verdicts for `inputs` without editing and without running the model past the hookpoints.

        Each input is scored on its content positions only (special tokens, padding and, for text, blank prompts
        score 0). A text longer than one call of the model reads is scored over every window of it, the largest
        score per concept taken (`Verdict.windows` says how many were read).
        """
        if inputs is None:
            raise TypeError("classify() needs inputs: a string, a list of strings, or the family's inputs (images, "
                            "histories), not None")
        if isinstance(inputs, str):
            inputs = [inputs]
        _check_batch_size(batch_size)
        per_gate = []
        for gate, policy, adapter in zip(self.gates, self.policies, self.adapters):
            verdicts: list[Verdict] = []
            with attached(gate):  # a detached guard still classifies; it is detached again afterwards
                for start in range(0, len(inputs), batch_size):
                    call = adapter.prepare(gate.hookpoint.model, inputs[start : start + batch_size])
                    with gate_mode(gate, "score"):
                        adapter.run(gate.hookpoint, call)
                    verdicts += merge_rows(policy.last_verdicts, call.owners, call.n_inputs)
            per_gate.append(verdicts)
        return merge_verdicts(per_gate)

    def attach(self) -> "Guard":
        """Hook the gates back in after `detach` (a no-op for gates already attached)."""
        for gate in self.gates:
            if not gate.attached:
                gate.attach()
        return self

    def detach(self) -> None:
        """Remove every hook; the model's outputs are again exactly those of the unguarded model."""
        for gate in self.gates:
            gate.detach()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({type(self.target).__name__},"]
        for gate, policy, adapter in zip(self.gates, self.policies, self.adapters):
            state = "attached" if gate.attached else "detached"
            lines.append(f"  gate at {gate.hookpoint.name!r} ({adapter.describe()}, {state}): {gate.sae!r}, "
                         f"edit={gate.edit.mode}({gate.edit.strength:g})")
            for concept in policy.concepts:
                lines.append(f"    {concept!r}")
        return "\n".join(lines) + "\n)"


@contextmanager
def attached(gate: Gate) -> Iterator[None]:
    was = gate.attached
    if not was:
        gate.attach()
    try:
        yield
    finally:
        if not was:
            gate.detach()


@contextmanager
def gate_mode(gate: Gate, mode: str) -> Iterator[None]:
    previous = gate.mode
    gate.mode = mode
    try:
        yield
    finally:
        gate.mode = previous


def merge_rows(verdicts: Sequence[Verdict], owners: Tensor, n_inputs: int) -> list[Verdict]:
    """One verdict per input from the verdicts of its rows (the windows of a long text): per concept the largest
    score, flagged if any row is."""
    if len(verdicts) == n_inputs and bool((owners == torch.arange(n_inputs)).all()):
        return list(verdicts)
    merged = []
    for number in range(n_inputs):
        rows = [[verdicts[i]] for i in (owners == number).nonzero().flatten().tolist()]
        one = merge_verdicts(rows)[0]
        one.windows = len(rows)
        merged.append(one)
    return merged


def _check_batch_size(batch_size: Any) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def guard(target: Any, sae: SAE, concepts: Sequence[Concept], hookpoint: str | None = None, tokenizer: Any = None,
          edit: Edit | None = None, mode: str = "deactivate", strength: float = 0.0, batch_size: int = 32,
          adapter: Adapter | None = None, allow_other_hookpoint: bool = False, **options: Any) -> Guard:
    """Attach `sae` at `hookpoint` of `target` as a classifier and gate for `concepts`.

    hookpoint: a module path (default: the SAE's recorded hookpoint, else the family's default). An SAE records
        where it was trained; attaching it elsewhere is refused (its latents mean nothing there) unless
        `allow_other_hookpoint=True` says the caller knows better.
    edit / mode / strength: what flagged latents become (see `Edit`); default removes them.
    adapter / options: the model family (`adapters.registry.adapter_for` picks it from the model's type; `options`
        are the family's own, e.g. a vision token scope).
    """
    if target is None:
        raise TypeError("guard() needs a model or a pipeline to attach to, got None")
    _check_batch_size(batch_size)
    if not isinstance(target, nn.Module):
        from .diffusers import guard_pipeline  # noqa: PLC0415  (only pipelines reach here)

        if options or adapter is not None:
            raise TypeError(f"pipelines take no adapter or family options, got {sorted(options) or 'adapter'}")
        return guard_pipeline(target, sae=sae, concepts=concepts, hookpoint=hookpoint, edit=edit or Edit(mode, strength),
                              batch_size=batch_size, allow_other_hookpoint=allow_other_hookpoint)
    check_sae(sae)
    if not concepts:
        raise ValueError("guard() needs at least one concept")
    adapter = adapter or adapter_for(target, tokenizer=tokenizer, **options)
    name = hookpoint or sae.cfg.metadata.get("hookpoint") or adapter.default_hookpoint(target)
    point = find_hookpoint(target, name)
    check_recorded_hookpoint(target, point, sae, allow_other_hookpoint)
    edit = edit or Edit(mode, strength)
    gate, policy = build_gate(point, sae, concepts, adapter, edit, batch_size)
    return adapter.make_guard(target, [gate], [policy])


def check_sae(sae: Any) -> None:
    """An SAE a gate can use: an SAE, with real weights, all finite (a NaN weight would pass everything)."""
    if sae is None or not isinstance(sae, SAE):
        raise TypeError(f"guard() needs sae=<a sae_guard SAE> (SAE.load(path) or SAE.create(...)), got "
                        f"{type(sae).__name__}")
    for name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
        if tensor.is_meta:
            raise ValueError(f"the SAE's {name} is on the meta device (no weights): load it with SAE.load(path) or "
                             "move it with .to_empty(device=...) and load a state dict first")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"the SAE's {name} holds NaN or inf: every score would be NaN and every input would "
                             "pass; retrain it or load an intact file")


def check_recorded_hookpoint(root: Any, point: Hookpoint, sae: SAE, allow: bool) -> None:
    """Refuse an SAE attached somewhere else than the hookpoint its metadata records (spellings of one module, such
    as transformers 4 and 5 paths, are the same hookpoint)."""
    recorded = sae.cfg.metadata.get("hookpoint")
    if not recorded or allow:
        return
    for where in (root, point.model):
        try:
            if find_hookpoint(where, recorded).module is point.module:
                return
        except (LookupError, ValueError, TypeError):
            continue
    raise ValueError(f"the SAE was trained at hookpoint {recorded!r}, but is being attached at {point.name!r}: its "
                     f"latents mean nothing there. Attach it at {recorded!r}, or pass allow_other_hookpoint=True if "
                     "the two are the same activations")


def build_gate(point: Hookpoint, sae: SAE, concepts: Sequence[Concept], adapter: Adapter, edit: Edit,
               batch_size: int) -> tuple[Gate, ConceptPolicy]:
    """Check the SAE fits the hookpoint, fit unfitted concepts there, and build the gate."""
    sae.eval()
    encoder = InputEncoder(point, sae, adapter, batch_size)
    unfitted = [c for c in concepts if not c.fitted]
    sample = adapter.probe_inputs() or (list(unfitted[0].target[:1]) if unfitted else None)
    if sample:
        width = encoder.width(sample)
        if width != sae.d_in:
            raise ValueError(f"SAE d_in={sae.d_in} does not match the width {width} of hookpoint {point.name!r}: "
                             "it was trained on another layer or model")
    for concept in unfitted:
        concept.fit(encoder, sae.d_sae, sae.W_dec.detach())
    policy = ConceptPolicy(sae, concepts, edit.mode)
    return Gate(point, sae, policy, edit, mask_fn=adapter.positions(point.model)), policy


class InputEncoder:
    """Inputs -> SAE codes of their scoring positions at a hookpoint: what concepts are fitted on."""

    def __init__(self, point: Hookpoint, sae: SAE, adapter: Adapter, batch_size: int = 32) -> None:
        self.point, self.sae, self.adapter, self.batch_size = point, sae, adapter, batch_size

    def width(self, sample: Sequence[Any]) -> int:
        return self._hidden(sample)[0].shape[-1]

    def _hidden(self, inputs: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor]:
        call = self.adapter.prepare(self.point.model, inputs)
        hidden = capture_hidden(self.point, *call.args, **call.kwargs)
        if hidden.ndim == 4:  # a feature map: its positions are the tokens, as the gate reads them
            hidden = hidden.flatten(2).transpose(1, 2)
        elif hidden.ndim == 2:  # one vector per input
            hidden = hidden[:, None]
        positions = self.adapter.positions(self.point.model)
        scoring = positions(call.args, call.kwargs) if positions is not None else None
        real = scoring_positions(scoring, hidden.shape[0], hidden.shape[1], hidden.device)
        return hidden, real, call.owners.to(hidden.device)

    @torch.no_grad()
    def __call__(self, inputs: Sequence[Any]) -> tuple[SparseCodes, Tensor, int]:
        values, indices, owners = [], [], []
        for start in range(0, len(inputs), self.batch_size):
            hidden, real, rows_owner = self._hidden(inputs[start : start + self.batch_size])
            rows, cols = real.nonzero(as_tuple=True)
            codes = self.sae.encode_sparse(hidden[rows, cols].to(self.sae.W_enc.device, torch.float32))
            values.append(codes.values)
            indices.append(codes.indices)
            owners.append(rows_owner[rows].to(codes.values.device) + start)
        width = max(v.shape[-1] for v in values)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
        return SparseCodes(torch.cat([pad(v) for v in values]), torch.cat([pad(i) for i in indices])), \
            torch.cat(owners), len(inputs)
