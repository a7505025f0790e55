"""The Gate: an SAE spliced into a live module that edits concept latents as a delta.

At the hooked module's output h (batch, tokens, d), for the real tokens of each input:

    z = sae.encode(h)            (fp32, on h's device, whatever the model's dtype)
    decision = decide(z, ...)    which (token, latent) entries to edit: the caller's policy
    h' = h + (z_edit - z) @ W_dec   on the edited tokens only

The SAE's own reconstruction error never enters the output, and an input with nothing to edit comes
back bit-identical (its rows are not touched at all). The Gate knows SAEs and tensors, not concepts:
`decide` (built by the concepts layer) says what to edit and records its verdicts.

Decisions are made on real tokens, but an edited input's other positions (padding) are read downstream too:
a Stable Diffusion UNet attends to all 77 states of the prompt, and under CLIP's causal attention the states
after the end token have read the whole prompt. So the latents edited on an input's real tokens are edited
at its other positions as well, wherever they fire there (ItD replaces the whole prompt for the same reason).
Those positions are encoded only for inputs that have an edit.

A (batch, d) state (pooled features, a recommender's user representation) is one token per input.
A (batch, channels, height, width) feature map (a UNet or CNN block) is read as a grid of tokens: each spatial
position is a token of width `channels`, and the edited map comes back in its own layout.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from ..sae.base import SAE
from ..sae.codes import SparseCodes, sparse_decode
from .hookpoints import Hookpoint, hook_site

EDIT_MODES = ("deactivate", "clamp", "scale", "steer")
MAX_STRENGTH = 1e4  # |strength| past this only produces inf/NaN or meaningless states on flagged inputs
COPY_REFUSED = ("a guarded model cannot be copied or pickled while its gates are attached (the copy would share or "
                "lose them): call guard.detach() first, copy or save the model, then guard the copy")


@dataclass(frozen=True)
class Edit:
    """How chosen latents change.

    deactivate: z -> strength * z, strength <= 0 (0 removes the feature; ItD uses -8)
    clamp:      z -> clamp(z, -strength, strength) (|z| capped at strength >= 0)
    scale:      z -> strength * z (any factor: 0.5 weakens, 2 amplifies)
    steer:      h -> h + strength * direction on the chosen tokens (direction: the unit mean of the
                chosen latents' decoder rows unless given)
    """

    mode: str = "deactivate"
    strength: float = 0.0
    direction: Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise ValueError(f"unknown edit mode {self.mode!r}; choose one of {', '.join(EDIT_MODES)}")
        if not isinstance(self.strength, (int, float)) or isinstance(self.strength, bool):
            raise TypeError(f"edit strength must be a number, got {self.strength!r}")
        if not math.isfinite(self.strength) or abs(self.strength) > MAX_STRENGTH:
            raise ValueError(f"edit strength must be finite and within +-{MAX_STRENGTH:g}, got {self.strength}: past "
                             "that a flagged input's hidden state turns to inf or NaN in fp16 and is garbage in fp32 "
                             "(ItD's strongest deactivation is -8)")
        if self.direction is not None and not bool(torch.isfinite(self.direction).all()):
            raise ValueError("the steering direction holds NaN or inf")
        if self.mode == "deactivate" and self.strength > 0:
            raise ValueError(f"deactivate needs strength <= 0 (0 zeroes the feature), got {self.strength}")
        if self.mode == "clamp" and self.strength < 0:
            raise ValueError(f"clamp needs a bound >= 0, got {self.strength}")

    def edited_values(self, values: Tensor) -> Tensor:
        if self.mode in ("deactivate", "scale"):
            return values * self.strength
        if self.mode == "clamp":
            return values.clamp(-self.strength, self.strength)
        return values  # steer leaves the codes alone

    def delta(self, codes: SparseCodes, chosen: Tensor, W_dec: Tensor) -> Tensor:
        """The (N, d) change to the hidden state of each token."""
        if self.mode == "steer":
            direction = self.direction
            if direction is None:
                direction = _mean_direction(codes.indices, chosen, W_dec)
            direction = direction.to(W_dec)
            rows = chosen.any(-1, keepdim=True).to(W_dec.dtype)
            return rows * (self.strength * direction)
        change = torch.where(chosen, self.edited_values(codes.values) - codes.values, torch.zeros_like(codes.values))
        return sparse_decode(SparseCodes(change, codes.indices), W_dec)


def _mean_direction(indices: Tensor, chosen: Tensor, W_dec: Tensor) -> Tensor:
    used = torch.unique(indices[chosen])
    if used.numel() == 0:
        return torch.zeros(W_dec.shape[-1], dtype=W_dec.dtype, device=W_dec.device)
    mean = W_dec[used].mean(0)
    return mean / mean.norm().clamp_min(1e-12)


@dataclass
class GateCall:
    """What one pass through the hooked module saw, handed to `decide`."""

    codes: SparseCodes  # (N, k) codes of the real tokens
    prompt_index: Tensor  # (N,) which input of the batch each real token belongs to
    token_index: Tensor  # (N,) its position within that input
    n_prompts: int
    editing: bool  # False: score only (classify), never edit
    states: Tensor | None = None  # (N, d) the fp32 states the codes were encoded from (for reconstruction error)


class Decide(Protocol):
    def __call__(self, call: GateCall) -> Tensor:
        """Return an (N, k) bool mask of the code entries to edit (all False to leave the batch alone)."""


MaskFn = Callable[[tuple, dict], Tensor | None]


class Gate:
    """One SAE at one hookpoint. `attach()` installs it; `detach()` removes every trace.

    `mask_fn(args, kwargs)` reads the real-token mask (batch, tokens) from the call of the model
    that owns the hookpoint (e.g. its attention mask); None means every token is real.
    """

    def __init__(self, hookpoint: Hookpoint, sae: SAE, decide: Decide, edit: Edit = Edit(),
                 mask_fn: MaskFn | None = None) -> None:
        self.hookpoint, self.sae, self.decide, self.edit = hookpoint, sae, decide, edit
        self.mask_fn = mask_fn
        self._state = threading.local()
        self._handles: list[Any] = []

    # -------------------------------------------------------------- per-thread call state
    MODES = ("edit", "score", "off")

    @property
    def mode(self) -> str:
        """This thread's mode: "edit" (score and edit), "score" (classify only) or "off" (pass through)."""
        return getattr(self._state, "mode", "edit")

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in self.MODES:
            raise ValueError(f"gate mode must be one of {self.MODES}, got {value!r}")
        self._state.mode = value

    def attach(self) -> "Gate":
        if self._handles:
            return self
        model = self.hookpoint.model
        self._handles.append(model.register_forward_pre_hook(self._capture_mask, with_kwargs=True, prepend=True))
        self._handles.append(hook_site(self.hookpoint, self._on_hidden, prepend=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __deepcopy__(self, memo: dict) -> "Gate":
        raise TypeError(COPY_REFUSED)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(COPY_REFUSED)

    def _capture_mask(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._state.mask = self.mask_fn(args, kwargs) if self.mask_fn is not None else kwargs.get("attention_mask")
        return None

    def _on_hidden(self, hidden: Tensor) -> Tensor | None:
        if hasattr(self._state, "mask"):
            mask = self._state.mask
            del self._state.mask  # one model call, one mask
        else:  # the model was entered below its root (open_clip's encode_image): a mask needing no call still holds
            mask = self.mask_fn((), {}) if self.mask_fn is not None else None
        mode = self.mode
        return None if mode == "off" else self.apply(hidden, mask, editing=mode == "edit")

    # -------------------------------------------------------------- the math
    @torch.no_grad()
    def apply(self, hidden: Tensor, mask: Tensor | None = None, editing: bool = True) -> Tensor | None:
        """Score `hidden` (batch, tokens, d), or a (batch, channels, height, width) map, and return its edited copy,
        or None if nothing changed."""
        if hidden.ndim == 4:  # a feature map: its positions are the tokens
            batch, channels, height, width = hidden.shape
            edited = self.apply(hidden.flatten(2).transpose(1, 2), mask, editing)
            return None if edited is None else edited.transpose(1, 2).reshape(batch, channels, height, width)
        if hidden.ndim == 2:  # (batch, d): one vector per input (pooled features, a user representation)
            hidden3 = hidden[:, None]
        elif hidden.ndim == 3:
            hidden3 = hidden
        else:
            raise ValueError("the gate expects (batch, tokens, d) hidden states or (batch, channels, height, width) "
                             f"feature maps, got shape {tuple(hidden.shape)}")
        batch, tokens, width = hidden3.shape
        if width != self.sae.d_in:
            raise ValueError(
                f"SAE width d_in={self.sae.d_in} does not match the hidden size {width} at {self.hookpoint.name}"
            )
        real = scoring_positions(mask, batch, tokens, hidden3.device)
        prompt_index, token_index = real.nonzero(as_tuple=True)
        states = self._states(hidden3, prompt_index, token_index)
        codes = self.sae.encode_sparse(states)
        device = codes.values.device
        call = GateCall(codes, prompt_index.to(device), token_index.to(device), batch, editing, states)
        chosen = self.decide(call)
        if not editing or not bool(chosen.any()):
            return None
        rows = chosen.any(-1)
        out = hidden3.clone()
        b, t = prompt_index[rows.to(prompt_index.device)], token_index[rows.to(token_index.device)]
        self._edit_rows(out, hidden3, b, t, SparseCodes(codes.values[rows], codes.indices[rows]), chosen[rows])
        self._edit_other_positions(out, hidden3, real, call, codes, chosen)
        return out if hidden.ndim == 3 else out[:, 0]

    def _states(self, hidden: Tensor, b: Tensor, t: Tensor) -> Tensor:
        """The states at positions (b, t) in fp32 on the SAE's device, refusing NaN and inf."""
        x = hidden[b, t].to(self.sae.W_enc.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError(f"non-finite activations (NaN/inf) at {self.hookpoint.name}; the model is unchanged")
        return x

    def _edit_rows(self, out: Tensor, hidden: Tensor, b: Tensor, t: Tensor, codes: SparseCodes, chosen: Tensor
                   ) -> None:
        delta = self.edit.delta(codes, chosen, self.sae.W_dec)
        out[b, t] = (hidden[b, t].float() + delta.to(hidden.device)).to(hidden.dtype)

    def _edit_other_positions(self, out: Tensor, hidden: Tensor, real: Tensor, call: GateCall, codes: SparseCodes,
                              chosen: Tensor) -> None:
        """At the non-real positions of inputs with an edit, edit the latents edited on that input's real tokens."""
        d_sae = self.sae.d_sae
        edited = torch.unique(call.prompt_index[:, None].expand_as(chosen)[chosen] * d_sae + codes.indices[chosen])
        inputs = torch.unique(edited // d_sae).to(real.device)
        others = torch.zeros_like(real)
        others[inputs] = ~real[inputs]
        b, t = others.nonzero(as_tuple=True)
        if not b.numel():
            return
        there = self.sae.encode_sparse(self._states(hidden, b, t))
        keys = b.to(there.indices.device)[:, None] * d_sae + there.indices
        chosen_there = torch.isin(keys, edited) & (there.values != 0)
        rows = chosen_there.any(-1)
        if rows.any():
            self._edit_rows(out, hidden, b[rows.to(b.device)], t[rows.to(t.device)],
                            SparseCodes(there.values[rows], there.indices[rows]), chosen_there[rows])


def scoring_positions(mask: Tensor | Callable | None, batch: int, tokens: int, device: torch.device) -> Tensor:
    """(batch, tokens) bool: the positions that score, from what a mask function answered for the call."""
    if callable(mask):  # the scoring positions depend on the hidden state's shape (a vision token scope)
        mask = mask(batch, tokens, device)
    if mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != (batch, tokens):
        if mask.shape[0] == batch and mask.shape[-1] >= tokens and mask.ndim == 2:
            mask = mask[:, -tokens:] if mask.shape[-1] > tokens else mask
        else:
            raise ValueError(f"token mask of shape {tuple(mask.shape)} does not match hidden states ({batch}, {tokens})")
    return mask.bool()
