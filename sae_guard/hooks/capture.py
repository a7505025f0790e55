"""Run a model only as far as a hookpoint and hand back the hidden state there.

The hook raises once the hooked module has produced its output, so nothing after it runs: reading
layer 8 of a 12-layer encoder costs 9 layers, not 12.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .hookpoints import Hookpoint, hook_site


class _StopForward(Exception):
    """Raised by the capture hook once the hooked module has run."""


@torch.no_grad()
def capture_hidden(hookpoint: Hookpoint, *args: Any, **kwargs: Any) -> Tensor:
    """Call `hookpoint.model(*args, **kwargs)` in eval mode and return the hookpoint's hidden state.

    Hooks registered in front of this one (a gate) have already run when it is read, so a guarded
    model's capture sees the gate's edits, and the gate sees the call.
    """
    captured: list[Tensor] = []

    def stop(hidden: Tensor) -> None:
        captured.append(hidden)
        raise _StopForward

    handle = hook_site(hookpoint, stop, prepend=False)
    try:
        with eval_mode(hookpoint.model):
            hookpoint.model(*args, **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"hookpoint {hookpoint.name!r} did not run during the forward pass")
    return captured[0]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, restoring the previous mode of every submodule."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
