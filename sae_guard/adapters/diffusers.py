"""Guarding diffusers text-to-image pipelines: SAE gates on their text encoders, positive prompts only.

    g = guard(pipe, sae=sae, concepts=[Concept("zebra", target=[...], retain=[...])])
    image = pipe("a zebra at the beach").images[0]   # same call, same output type; edited if flagged
    g.last_verdicts                                   # one Verdict per prompt of that call
    g.classify(["a zebra"])                           # runs the text encoders only up to the hookpoints
    g.detach()                                        # the pipeline object is exactly as before

Supported layouts (diffusers 0.42): StableDiffusionPipeline (CLIP `text_encoder`), StableDiffusionXL
(two CLIP encoders; the pipeline reads `hidden_states[-2]`, which the gate's `prepend=True` hook keeps
edited under transformers 5), StableDiffusion3 (two CLIP + T5 `text_encoder_3`) and Flux (CLIP pooled
`text_encoder` + T5 `text_encoder_2`). `sae` may be one SAE or a dict {hookpoint: SAE}, one gate each;
`concepts` a list (every gate gets its own copy, fitted on that gate's SAE) or a dict {hookpoint: [...]}.

Arming: only the positive prompt is edited. The pipeline's class is swapped, for the guard's lifetime,
for a subclass with the same name whose `__call__` and `encode_prompt` wrap the originals (Python
looks `__call__` up on the type, so an instance attribute could not wrap it; the swap adds nothing to
the instance's `__dict__`, and `detach()` swaps the original class back):
- inside `encode_prompt`, every gate is "off" except on the first call of each guarded text encoder,
  which is the positive prompt (`prompt` for text_encoder, `prompt_2` for text_encoder_2, ...): SD,
  SDXL and SD3 encode the negative prompt in a second call of the same encoders;
- inside a pipeline call, only the first `encode_prompt` is the positive one: Flux with true CFG calls
  `encode_prompt` a second time for the negative prompt, which then runs with every gate "off";
- an `encode_prompt` given precomputed `prompt_embeds` encodes no positive text, so nothing is armed;
- text-encoder calls outside `encode_prompt` (e.g. `pipe.text_encoder(ids)`, or another pipeline
  built from these components) meet the gates in their usual mode: edited.

What the gate sees: the prompt exactly as the pipeline encodes it. CLIP prompts are padded to 77
without an attention mask; their real tokens run up to and including the first end-of-text token.
SD3 and Flux call T5 without an attention mask on prompts padded to `max_sequence_length` (256 and 512
by default), so T5 attends to the padding and its hidden states depend on that length: concepts are
fitted, and `classify` tokenizes, padded to the same length (the pipeline's default unless given),
and the real tokens are those up to and including the first `</s>` (the EOS rule of `text.eos_mask`).
Padding positions are never scored or edited. Unmasked T5 padding has attended to the prompt, so it
carries some of it past the hooked block; the blocks after it re-read the edited real tokens, so a
hookpoint below the last block (the default sits two-thirds up) lets the edit reach the padding too.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from ..concepts.concept import Concept
from ..concepts.policy import ConceptPolicy, Verdict, merge_verdicts
from ..hooks.gate import Edit, Gate
from ..hooks.hookpoints import Hookpoint, find_hookpoint
from ..sae.base import SAE
from . import text
from .guard import Guard, build_gate, check_recorded_hookpoint, check_sae
from .text import TextAdapter

TEXT_ENCODER = "text_encoder"


class PipelineGuard(Guard):
    """A diffusers pipeline with SAE gates on its text encoders, armed for positive prompts only."""

    def __init__(self, pipe: Any, gates: list[Gate], policies: list[ConceptPolicy], adapters: list[TextAdapter]):
        self._local = threading.local()
        self._original_class = type(pipe)
        self._guarded_class: type | None = _guarded_class(self._original_class, self)
        self._gates_of: dict[str, list[int]] = {}
        for i, gate in enumerate(gates):
            self._gates_of.setdefault(gate.hookpoint.component, []).append(i)
        super().__init__(pipe, gates, policies, adapters)
        self._handles = [gates[indices[0]].hookpoint.model.register_forward_pre_hook(
            functools.partial(self._arm, component), with_kwargs=True) for component, indices in self._gates_of.items()]
        pipe.__class__ = self._guarded_class

    @property
    def last_verdicts(self) -> list[Verdict]:
        """One verdict per prompt of this thread's last guarded pipeline call (or `encode_prompt`)."""
        return merge_verdicts(getattr(self._local, "verdicts", []))

    def detach(self) -> None:
        """Remove every hook and give the pipeline its own class back."""
        if self._guarded_class is not None:
            if type(self.target) is not self._guarded_class:
                raise RuntimeError("another guard was attached to this pipeline after this one: detach it first")
            self.target.__class__ = self._original_class
            self._guarded_class = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        super().detach()

    # ------------------------------------------------------------------ arming
    @contextmanager
    def _pipeline_call(self) -> Iterator[None]:
        """Count `encode_prompt` calls within one pipeline call: the first one is the positive prompt."""
        outer = getattr(self._local, "encodes", None)
        self._local.encodes = 0
        try:
            yield
        finally:
            self._local.encodes = outer

    @contextmanager
    def _encoding(self, encode: Any, pipe: Any, args: tuple, kwargs: dict) -> Iterator[None]:
        """Within `encode_prompt`: gates off, except on each encoder's first call when the call is positive."""
        state = self._local
        if getattr(state, "calls", None) is not None:  # a nested encode_prompt: the outer one decides
            yield
            return
        encodes = getattr(state, "encodes", None)
        first = not encodes  # None outside a pipeline call: every direct encode_prompt stands alone
        if encodes is not None:
            state.encodes = encodes + 1
        positive = first and _encodes_text(encode, pipe, args, kwargs)
        modes = [gate.mode for gate in self.gates]
        state.calls, state.positive, state.modes = {}, positive, modes
        if first:
            state.verdicts = []
        for gate in self.gates:
            gate.mode = "off"
        try:
            yield
            if positive:  # gates that ran armed hold this call's verdicts
                state.verdicts = [self.policies[i].last_verdicts for component, indices in self._gates_of.items()
                                  if state.calls.get(component) for i in indices if modes[i] != "off"]
        finally:
            for gate, mode in zip(self.gates, modes):
                gate.mode = mode
            state.calls = None

    def _arm(self, component: str, _module: Any, _args: tuple, _kwargs: dict) -> None:
        """Forward pre-hook on a guarded text encoder: arm its gates for its first call in `encode_prompt`."""
        state = self._local
        calls = getattr(state, "calls", None)
        if calls is None:
            return
        count = calls.get(component, 0)
        calls[component] = count + 1
        for i in self._gates_of[component]:
            self.gates[i].mode = state.modes[i] if state.positive and count == 0 else "off"


def _guarded_class(base: type, guard: PipelineGuard) -> type:
    """`base` with `__call__` and `encode_prompt` wrapped to arm `guard`; same name, same signatures."""

    @functools.wraps(base.__call__)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        _refuse_instance_overrides(self)  # set after guarding: the gates could not tell positive from negative
        with guard._pipeline_call():
            return base.__call__(self, *args, **kwargs)

    @functools.wraps(base.encode_prompt)
    def encode_prompt(self: Any, *args: Any, **kwargs: Any) -> Any:
        with guard._encoding(base.encode_prompt, self, args, kwargs):
            return base.encode_prompt(self, *args, **kwargs)

    namespace = {"__call__": __call__, "encode_prompt": encode_prompt, "__module__": base.__module__,
                 "__qualname__": base.__qualname__, "__doc__": base.__doc__}
    return type(base.__name__, (base,), namespace)


def _refuse_instance_overrides(pipe: Any) -> None:
    """The guard arms its gates through the pipeline's class; a `__call__` or `encode_prompt` set on the instance
    would bypass it (the negative prompt edited, no verdicts), so it is refused rather than silently ignored."""
    overridden = [name for name in ("__call__", "encode_prompt") if name in vars(pipe)]
    if overridden:
        raise TypeError(f"{type(pipe).__name__} has {', '.join(overridden)} overridden on the instance; the guard "
                        "arms its gates around the class's methods, so it cannot guard it. Subclass the pipeline "
                        f"instead, or `del pipe.{overridden[0]}`")


def _encodes_text(encode: Any, pipe: Any, args: tuple, kwargs: dict) -> bool:
    """False when `encode_prompt` was handed precomputed positive `prompt_embeds` (no text to guard)."""
    try:
        bound = inspect.signature(encode).bind_partial(pipe, *args, **kwargs)
    except TypeError:  # the real call will raise the user-facing error
        return True
    return bound.arguments.get("prompt_embeds") is None


# ---------------------------------------------------------------------- building
def guard_pipeline(pipe: Any, sae: SAE | Mapping[str, SAE],
                   concepts: Sequence[Concept] | Mapping[str, Sequence[Concept]], hookpoint: str | None = None,
                   edit: Edit | None = None, batch_size: int = 32,
                   max_sequence_length: int | None = None, allow_other_hookpoint: bool = False) -> PipelineGuard:
    """Attach SAE gates to `pipe`'s text encoders as classifiers and gates for `concepts`.

    sae: one SAE (at `hookpoint`), or a dict {hookpoint: SAE} for several encoders or layers.
    hookpoint: `text_encoder.encoder.layers.8`-style path (either transformers spelling). None picks
        two-thirds up the first text encoder whose width is the SAE's (ItD: layer 8 of 12).
    concepts: fitted here when unfitted, with the encoder's own tokenizer, as the pipeline encodes.
    max_sequence_length: what T5 prompts are padded to when fitting and classifying (default: the
        pipeline's own default, 256 for SD3 and 512 for Flux); see the module docstring.
    """
    if not concepts:
        raise ValueError("guard() needs at least one concept")
    _refuse_instance_overrides(pipe)
    if not callable(getattr(type(pipe), "encode_prompt", None)):
        raise TypeError(f"{type(pipe).__name__} has no encode_prompt; the guard arms its gates around it to tell "
                        "the positive prompt from the negative one")
    saes = _saes_by_hookpoint(pipe, sae, hookpoint)
    per_gate = _concepts_by_hookpoint(pipe, concepts, list(saes))
    if max_sequence_length is None:
        max_sequence_length = _default_sequence_length(pipe)
    gates, policies, adapters = [], [], []
    for name, (point, gate_sae) in saes.items():
        check_recorded_hookpoint(pipe, point, gate_sae, allow_other_hookpoint)
        adapter = TextAdapter(point.model, tokenizer=_tokenizer_for(pipe, point, max_sequence_length))
        gate, policy = build_gate(point, gate_sae, per_gate[name], adapter, edit or Edit(), batch_size)
        gates.append(gate)
        policies.append(policy)
        adapters.append(adapter)
    return PipelineGuard(pipe, gates, policies, adapters)


def _saes_by_hookpoint(pipe: Any, sae: SAE | Mapping[str, SAE],
                       hookpoint: str | None) -> dict[str, tuple[Hookpoint, SAE]]:
    for one in (sae.values() if isinstance(sae, Mapping) else [sae]):
        check_sae(one)
    if isinstance(sae, Mapping):
        if hookpoint is not None:
            raise ValueError("pass either hookpoint=... with one SAE, or a dict {hookpoint: SAE}, not both")
        if not sae:
            raise ValueError("the dict of SAEs is empty")
        named = dict(sae)
    else:
        named = {hookpoint or _recorded_hookpoint(pipe, sae) or _default_hookpoint(pipe, sae): sae}
    resolved: dict[str, tuple[Hookpoint, SAE]] = {}
    for name, one in named.items():
        point = _text_hookpoint(pipe, name)
        if point.name in resolved:
            raise ValueError(f"hookpoint {name!r} is given twice (it resolves to {point.name!r})")
        resolved[point.name] = (point, one)
    return resolved


def _text_hookpoint(pipe: Any, name: str) -> Hookpoint:
    point = find_hookpoint(pipe, name)
    if not (point.component or "").startswith(TEXT_ENCODER):
        raise ValueError(f"hookpoint {name!r} is on {point.component or type(pipe).__name__!r}; pipeline gates "
                         f"sit on text encoders ({', '.join(_text_encoders(pipe)) or 'none found'})")
    return point


def _concepts_by_hookpoint(pipe: Any, concepts: Sequence[Concept] | Mapping[str, Sequence[Concept]],
                           names: list[str]) -> dict[str, list[Concept]]:
    """Each gate's concepts. A shared list is copied per gate: a fitted concept belongs to one SAE."""
    if isinstance(concepts, Mapping):
        given = {_text_hookpoint(pipe, key).name: list(value) for key, value in concepts.items()}
        unknown = sorted(set(given) - set(names))
        missing = [name for name in names if not given.get(name)]
        if unknown or missing:
            raise ValueError(f"concepts are keyed by hookpoint: {', '.join(unknown)} has no SAE" if unknown else
                             f"no concepts for hookpoint {', '.join(missing)}")
        return given
    concepts = list(concepts)
    if len(names) == 1:
        return {names[0]: concepts}
    fitted = [c.name for c in concepts if c.fitted]
    if fitted:
        raise ValueError(f"concepts {fitted} are fitted, so they belong to one SAE; with several hookpoints pass "
                         "concepts={hookpoint: [...]} or unfitted concepts (each gate fits its own copy)")
    return {name: [copy.deepcopy(c) for c in concepts] for name in names}


def _text_encoders(pipe: Any) -> list[str]:
    components = getattr(pipe, "components", {})
    return sorted(name for name, module in components.items()
                  if name.startswith(TEXT_ENCODER) and module is not None and hasattr(module, "named_modules"))


def _default_hookpoint(pipe: Any, sae: SAE) -> str:
    """Two-thirds up the first text encoder as wide as the SAE."""
    widths = {}
    for component in _text_encoders(pipe):
        config = getattr(getattr(pipe, component), "config", None)
        widths[component] = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if widths[component] == sae.d_in:
            return f"{component}.{text.default_hookpoint(getattr(pipe, component))}"
    raise ValueError(f"no text encoder of {type(pipe).__name__} has the SAE's width d_in={sae.d_in} "
                     f"(widths: {widths}); pass hookpoint=...")


def _recorded_hookpoint(pipe: Any, sae: SAE) -> str | None:
    """The SAE's recorded hookpoint on this pipeline: as written, or inside the first text encoder holding it."""
    recorded = sae.cfg.metadata.get("hookpoint")
    if not recorded:
        return None
    for name in (recorded, *(f"{component}.{recorded}" for component in _text_encoders(pipe))):
        try:
            _text_hookpoint(pipe, name)
            return name
        except (LookupError, ValueError):
            continue
    return None


def _default_sequence_length(pipe: Any) -> int | None:
    parameter = inspect.signature(type(pipe).encode_prompt).parameters.get("max_sequence_length")
    return parameter.default if parameter is not None and isinstance(parameter.default, int) else None


def _tokenizer_for(pipe: Any, point: Hookpoint, max_sequence_length: int | None) -> Any:
    """The tokenizer the pipeline pairs with the hooked encoder (text_encoder_2 -> tokenizer_2)."""
    name = point.component.replace(TEXT_ENCODER, "tokenizer", 1)
    tokenizer = getattr(pipe, name, None)
    if tokenizer is None:
        raise ValueError(f"{type(pipe).__name__} has no {name} for {point.component}; it is needed to fit and "
                         "classify prompts")
    if text.is_clip_text(point.model):
        return tokenizer  # text.tokenize pads CLIP to 77 without a mask, as every pipeline does
    # StableDiffusionPipeline passes the mask only to encoders whose config asks for it (`use_attention_mask`)
    with_mask = bool(getattr(getattr(point.model, "config", None), "use_attention_mask", False))
    return PaddedTokenizer(tokenizer, max_sequence_length or tokenizer.model_max_length, with_mask)


class PaddedTokenizer:
    """A tokenizer as pipelines call it for T5 or BERT encoders: padded to a fixed length, truncated, with the
    attention mask only where the pipeline passes one.

    `text.tokenize` asks for dynamic padding and an attention mask; this answers with the pipeline's
    own layout instead, so fitted thresholds and `classify` scores match what a pipeline call sees.
    """

    def __init__(self, tokenizer: Any, length: int, with_mask: bool = False) -> None:
        self.tokenizer, self.model_max_length, self.with_mask = tokenizer, length, with_mask

    def __call__(self, texts: Sequence[str], **_layout: Any) -> dict[str, Any]:
        encoded = self.tokenizer(list(texts), padding="max_length", max_length=self.model_max_length,
                                 truncation=True, return_tensors="pt")
        if self.with_mask:
            return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        return {"input_ids": encoded["input_ids"]}

    def __getattr__(self, name: str) -> Any:  # everything else is the pipeline's tokenizer
        if name.startswith("__") or name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)
