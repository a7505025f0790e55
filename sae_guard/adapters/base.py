"""The family seam: what a guard needs to know about a model family, and nothing else.

A guard makes calls of its own (`classify`, fitting concepts) and watches the model's calls (the gate). Both need
the same three answers from the family, which an `Adapter` gives:
- `prepare(model, inputs)`: user inputs (strings, images, item histories, chats) -> one call of the hooked model,
  with `owners` saying which input each batch row belongs to (a long prompt split into windows has several rows);
- `positions(model)`: from a live call's arguments, the positions that score (real, content tokens; a vision
  token scope), so a verdict rests on what the input says and never on padding or special tokens;
- `default_hookpoint(model)`: where to attach when the caller and the SAE say nothing.
`run(point, call)` runs the model just past the hookpoint. Families register in `registry.FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..hooks.capture import capture_hidden
from ..hooks.hookpoints import Hookpoint, numbered_containers

# (args, kwargs) of a live call -> (batch, tokens) bool mask of the scoring positions, or a function
# (batch, tokens, device) -> that mask when it depends on the hidden state's shape, or None (every position scores)
MaskFn = Callable[[tuple, dict], "Tensor | Callable[[int, int, torch.device], Tensor] | None"]


@dataclass
class ModelCall:
    """One call of the guarded model made by the library itself (classify, concept fitting)."""

    args: tuple
    kwargs: dict
    owners: Tensor  # (batch,) long: which user input each batch row belongs to
    n_inputs: int

    @classmethod
    def one_row_each(cls, n: int, *args: Any, **kwargs: Any) -> "ModelCall":
        return cls(args, kwargs, torch.arange(n), n)


class Adapter:
    """A model family: how user inputs reach a hookpoint and which positions speak for an input."""

    name = "module"

    def __init__(self, model: Any, tokenizer: Any = None, **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} takes no options {sorted(options)}")
        self.tokenizer = tokenizer

    @classmethod
    def matches(cls, model: Any) -> bool:
        """Whether this family handles `model` (cheap: type and module-name checks)."""
        return False

    def default_hookpoint(self, model: nn.Module) -> str:
        """Two-thirds of the way through the first layer stack: where concepts are held (ItD: 8 of 12)."""
        containers = numbered_containers(model)
        if not containers:
            raise ValueError(f"cannot guess a hookpoint in {type(model).__name__}; pass hookpoint=...")
        name, _, span = containers[0].rpartition(".")
        n_layers = int(span.strip("[]").split("-")[1]) + 1
        return f"{name}.{max(0, (2 * n_layers) // 3)}"

    def prepare(self, model: nn.Module, inputs: Sequence[Any]) -> ModelCall:
        """One call of `model` for `inputs`: a tensor batched along dim 0, or a list of same-shaped tensors."""
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, Tensor) for x in inputs):
            if len({tuple(x.shape) for x in inputs}) > 1:
                raise ValueError(f"inputs of different shapes {sorted({tuple(x.shape) for x in inputs})} cannot be "
                                 "batched; pass them in separate calls")
            inputs = torch.stack(list(inputs))
        if isinstance(inputs, Tensor):
            return ModelCall.one_row_each(inputs.shape[0], inputs.to(device_of(model)))
        raise TypeError(f"{type(model).__name__} has no adapter that prepares {type(inputs).__name__} inputs; pass "
                        "a batched tensor, or inputs of a supported family")

    def positions(self, model: nn.Module) -> MaskFn | None:
        return None

    def probe_inputs(self) -> list[Any] | None:
        """A tiny input that reaches the hookpoint, to check an SAE's width when the guard is built (None: the
        width is checked on the first call)."""
        return None

    def run(self, point: Hookpoint, call: ModelCall) -> None:
        """Run the model far enough to pass the hookpoint (its gate sees the call)."""
        capture_hidden(point, *call.args, **call.kwargs)

    def describe(self) -> str:
        return self.name

    def make_guard(self, target: Any, gates: list, policies: list) -> Any:
        """The handle `guard()` returns for this family (a family with more to report, such as an LM's per-request
        prompt and response verdicts, returns its own `Guard` subclass)."""
        from .guard import Guard  # noqa: PLC0415  (guard.py builds on this module)

        return Guard(target, gates, policies, [self] * len(gates))


def device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
