"""A second judge inside a text-to-image UNet, for the prompts the text gate cannot read.

    text = guard(pipe, sae=text_sae, concepts=[red])                  # the text gate (a PipelineGuard)
    stage = UNetStage("up_blocks.1.attentions.1", unet_sae, unet_red, detect_step=2, unread_error=0.5)
    handle = stage.attach(pipe, text)
    pipe(prompts)                 # same call; unread prompts are judged again while their image is drawn
    handle.last_verdicts          # one per prompt: None where the stage did not judge it
    handle.detach(); text.detach()

The text gate reads a prompt through its SAE. A word the SAE never learned ("crimson") stays in the SAE's
reconstruction error, where no concept can see it, so the prompt passes unflagged; `Verdict.error` records how
much of each prompt went unread. The UNet, though, draws a colour the same way whatever word asked for it. So a
prompt the text gate did not flag, but could not fully read (its verdict's error above `unread_error`), is
judged again in the UNet's own feature space: at sampling step `detect_step` the concept (a `Concept` whose
inputs are images: the block's (positions, channels) output, scored through the stage's SAE) reads the image
being drawn, and a flagged image has the concept's latents edited at the block (a `Gate`: delta, error term
kept) from that step to the last. Prompts the text gate read fully, flagged or not, are never judged here, so
what they give is what the text gate alone gives (bit-identical images where it did not flag). A prompt the
text gate did not see at all (`prompt_embeds` given) is judged: nothing vouched for it.

With classifier-free guidance the UNet's batch is [negative half; prompt half]: only the prompt half is judged
and edited. A new pipeline call is recognised by its first timestep (sampling runs timesteps downwards).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..concepts.concept import Concept, load_concepts, save_concepts
from ..concepts.policy import ConceptPolicy, Verdict
from ..hooks.gate import Edit, Gate, GateCall
from ..hooks.hookpoints import find_hookpoint
from ..sae.base import SAE
from ..sae.codes import SparseCodes
from .guard import Guard

STAGE_JSON = "stage.json"


@dataclass
class UNetStage:
    """Where the judge sits (`block` inside `pipe.unet`), what it reads with (`sae`, `concept`), when it judges
    (`detect_step`, counted from 0), which prompts it judges (text error above `unread_error`), and the edit."""

    block: str
    sae: SAE
    concept: Concept
    detect_step: int = 2
    unread_error: float = 0.5
    edit: Edit = Edit("deactivate", 0.0)

    def __post_init__(self) -> None:
        if not self.concept.fitted:
            raise ValueError(f"the UNet stage's concept {self.concept.name!r} is not fitted")
        if self.detect_step < 0:
            raise ValueError(f"detect_step must be >= 0, got {self.detect_step}")
        if self.unread_error < 0:
            raise ValueError(f"unread_error must be >= 0, got {self.unread_error}")

    def judges(self, verdict: Verdict) -> bool:
        """Whether the text gate's verdict leaves the prompt to this stage: not flagged, and not fully read (no
        error recorded counts as not read)."""
        return not verdict.flagged and (verdict.error is None or verdict.error > self.unread_error)

    def attach(self, pipe: Any, text_guard: Guard) -> "AttachedUNetStage":
        return AttachedUNetStage(self, pipe, text_guard)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.sae.save(folder / "sae")
        save_concepts([self.concept], folder / "concepts")
        (folder / STAGE_JSON).write_text(json.dumps({
            "block": self.block, "detect_step": self.detect_step, "unread_error": self.unread_error,
            "edit": {"mode": self.edit.mode, "strength": self.edit.strength}}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "UNetStage":
        folder = Path(folder)
        if not (folder / STAGE_JSON).is_file():
            raise FileNotFoundError(f"{folder} holds no UNet stage ({STAGE_JSON} missing)")
        spec = json.loads((folder / STAGE_JSON).read_text())
        concepts = load_concepts(folder / "concepts")
        if len(concepts) != 1:
            raise ValueError(f"{folder}: a UNet stage holds one concept, found {len(concepts)}")
        return cls(spec["block"], SAE.load(folder / "sae"), concepts[0], int(spec["detect_step"]),
                   float(spec["unread_error"]), Edit(spec["edit"]["mode"], float(spec["edit"]["strength"])))


def image_encoder(sae: SAE) -> Any:
    """A `Concept` encoder whose inputs are images, each a (positions, channels) block output."""

    @torch.no_grad()
    def encode(images: Sequence[Tensor]) -> tuple[SparseCodes, Tensor, int]:
        stacked = torch.stack([torch.as_tensor(image) for image in images]).float()
        index = torch.arange(len(images)).repeat_interleave(stacked.shape[1])
        return sae.encode_sparse(stacked.flatten(0, 1).to(sae.W_dec.device)), index.to(sae.W_dec.device), len(images)

    return encode


@dataclass
class _CallState:
    """Where one thread's pipeline call stands: its step, and what the stage decided at the detect step."""

    step: int = -1
    last_timestep: float | None = None
    judged: Tensor | None = None  # per prompt: judged by the stage (the text gate let it pass unread)
    flagged: Tensor | None = None  # per prompt: judged and flagged, so edited from the detect step on
    verdicts: list[Verdict | None] = field(default_factory=list)


class AttachedUNetStage:
    """The stage on a live pipeline: a `Gate` at the block whose `decide` judges once per pipeline call, and a
    pre-hook on the UNet counting steps (per thread, as the text gate's state is). `detach()` removes both."""

    def __init__(self, stage: UNetStage, pipe: Any, text_guard: Guard) -> None:
        self.stage, self.pipe, self.text_guard = stage, pipe, text_guard
        self.policy = ConceptPolicy(stage.sae, [stage.concept], stage.edit.mode)
        self.members = self.policy.members.any(0)
        self._local = threading.local()
        self.gate = Gate(find_hookpoint(pipe.unet, stage.block), stage.sae, self._decide, stage.edit).attach()
        self._handle = pipe.unet.register_forward_pre_hook(self._count_step, with_kwargs=True)

    @property
    def _call(self) -> _CallState:
        if not hasattr(self._local, "call"):
            self._local.call = _CallState()
        return self._local.call

    @property
    def last_verdicts(self) -> list[Verdict | None]:
        """Per prompt of this thread's last call: the stage's verdict, or None where the text gate had read it."""
        return list(self._call.verdicts)

    def detach(self) -> None:
        self.gate.detach()
        self._handle.remove()

    def _count_step(self, _module: Any, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        value = float(torch.as_tensor(timestep).flatten()[0]) if timestep is not None else None
        call = self._call
        if call.last_timestep is None or value is None or value > call.last_timestep:
            call = self._local.call = _CallState()  # a new pipeline call
        call.last_timestep = value
        call.step += 1

    def _unread(self, n_prompts: int) -> Tensor:
        """Which prompts of this call the text gate let pass without having read them."""
        verdicts = self.text_guard.last_verdicts
        if len(verdicts) != n_prompts:  # the text gate saw no text this call
            return torch.ones(n_prompts, dtype=torch.bool)
        return torch.tensor([self.stage.judges(v) for v in verdicts])

    def _decide(self, call: GateCall) -> Tensor:
        chosen = torch.zeros_like(call.codes.values, dtype=torch.bool)
        state = self._call
        guided = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        n_prompts = call.n_prompts // 2 if guided else call.n_prompts
        offset = call.n_prompts - n_prompts  # the prompt half comes second
        prompt_rows = call.prompt_index >= offset
        if state.step == self.stage.detect_step and state.judged is None:
            self._judge(state, call, prompt_rows, offset, n_prompts)
        if state.flagged is None or not bool(state.flagged.any()) or not call.editing:
            return chosen
        flagged = prompt_rows & state.flagged.to(call.prompt_index.device)[(call.prompt_index - offset).clamp_min(0)]
        return flagged[:, None] & self.members[call.codes.indices] & (call.codes.values != 0)

    def _judge(self, state: _CallState, call: GateCall, prompt_rows: Tensor, offset: int, n_prompts: int) -> None:
        state.judged = self._unread(n_prompts)
        codes = SparseCodes(call.codes.values[prompt_rows], call.codes.indices[prompt_rows])
        self.policy(GateCall(codes, call.prompt_index[prompt_rows] - offset, call.token_index[prompt_rows],
                             n_prompts, call.editing))
        verdicts = self.policy.last_verdicts
        state.flagged = torch.tensor([v.flagged for v in verdicts]) & state.judged
        state.verdicts = [v if judged else None for v, judged in zip(verdicts, state.judged.tolist())]
