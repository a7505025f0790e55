"""Ways to keep a text-to-image pipeline from drawing a concept, run on the same prompts and seeds.

    images, flagged = Gate(sae, concepts, hookpoint).generate(pipe, prompts, seeds, settings)

- `Unguarded`: the pipeline as it is (the reference every other method is compared with);
- `Gate`: sae_guard's gate (`guard_pipeline`): flagged prompts get the concept's latents edited as a delta at the
  hookpoint, unflagged prompts pass bit-identical; with a recipe's UNet stage (`adapters.unet_stage`), the
  prompts it did not flag but could not fully read are judged again while their image is drawn;
- `KeywordFilter`: a prompt naming one of the concept's words has those words deleted;
- `NegativePrompt`: the concept's name as the negative prompt of every prompt;
- `InterpretThenDeactivate`: ItD (Tian et al. 2025) as released: the concept's features are the union of each
  target prompt's top latents minus every retain prompt's top latents (the `itd` strategy); a prompt's score is
  the mean squared change of the hookpoint's output when those latents are multiplied by -8 (tokens after the
  first) and decoded without the SAE's error term; a prompt scoring at least 0.99 x the lowest score of the
  target prompts has its whole hookpoint output (every position) replaced by that edited reconstruction. The
  positive prompt is encoded with the hook and handed to the pipeline as `prompt_embeds`, as ItD does; it is
  padded as the pipeline pads, so ItD's unflagged prompts also pass unchanged.

Every method draws image i from `torch.Generator().manual_seed(seeds[i])`, so images differ only where the
method changed something.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..adapters.diffusers import PipelineGuard, guard_pipeline
from ..adapters.unet_stage import AttachedUNetStage, UNetStage
from ..concepts.concept import Concept
from ..concepts.policy import Verdict, merge_verdicts
from ..hooks.gate import Edit
from ..hooks.hookpoints import find_hookpoint, hook_hidden
from ..sae.base import SAE


@dataclass(frozen=True)
class T2ISettings:
    """How images are drawn: size, denoising steps, classifier-free guidance, images per pipeline call."""

    image_size: int = 32
    steps: int = 20
    guidance_scale: float = 4.0
    batch_size: int = 16

    @classmethod
    def from_table(cls, table: dict[str, Any] | None) -> "T2ISettings":
        """From a recipe's [t2i] table (its `image_size`, `steps`, `guidance_scale`; other keys ignored)."""
        table = table or {}
        defaults = cls()
        return cls(image_size=int(table.get("image_size", defaults.image_size)),
                   steps=int(table.get("steps", defaults.steps)),
                   guidance_scale=float(table.get("guidance_scale", defaults.guidance_scale)),
                   batch_size=int(table.get("batch_size", defaults.batch_size)))


@dataclass
class Generation:
    """A method's output: float images (n, H, W, 3) in [0, 1] and, per prompt, whether the method acted on it."""

    images: np.ndarray
    flagged: list[bool]
    verdicts: list[Verdict | None]

    def pil(self) -> list[Image.Image]:
        return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in self.images]


def draw(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: T2ISettings, desc: str = "drawing",
         after_batch: Any = None, **call: Any) -> np.ndarray:
    """Images for `prompts`, batch by batch, image i from seed `seeds[i]`; `call` goes to every pipeline call, its
    per-prompt values (tensors and lists as long as `prompts`: `prompt_embeds`, `negative_prompt`) sliced per batch.
    `after_batch()` runs after each call."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    chunks = []
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc=desc, unit="batch", leave=False):
        stop = start + settings.batch_size
        kwargs = {k: v[start:stop] if isinstance(v, (torch.Tensor, list)) and len(v) == len(prompts) else v
                  for k, v in call.items()}
        if "prompt_embeds" not in kwargs:
            kwargs["prompt"] = list(prompts[start:stop])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:stop]]
        out = pipe(generator=generators, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                   height=settings.image_size, width=settings.image_size, output_type="np", **kwargs)
        chunks.append(np.asarray(out.images, dtype=np.float32))
        if after_batch is not None:
            after_batch()
    return np.concatenate(chunks) if chunks else np.zeros((0, settings.image_size, settings.image_size, 3),
                                                          np.float32)


class Method(ABC):
    name: str = "method"

    @abstractmethod
    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: T2ISettings) -> Generation:
        ...


class Unguarded(Method):
    name = "unguarded"

    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: T2ISettings) -> Generation:
        images = draw(pipe, prompts, seeds, settings, desc=self.name)
        return Generation(images, [False] * len(prompts), [None] * len(prompts))


class GuardedPipeline:
    """The text guard on a pipeline and, when given, the UNet stage: one merged verdict per prompt."""

    def __init__(self, text: PipelineGuard, stage: AttachedUNetStage | None = None) -> None:
        self.text, self.stage = text, stage

    @property
    def gates(self) -> list[Any]:
        return [*self.text.gates, *([self.stage.gate] if self.stage else [])]

    @property
    def last_verdicts(self) -> list[Verdict]:
        text = self.text.last_verdicts
        judged = self.stage.last_verdicts if self.stage else []
        if len(judged) != len(text):
            return text
        return [merge_verdicts([[t], [u]])[0] if u is not None else t for t, u in zip(text, judged)]

    def detach(self) -> None:
        if self.stage:
            self.stage.detach()
        self.text.detach()


class Gate(Method):
    """sae_guard's gate on the pipeline's text encoder (fitted concepts; only the positive prompt is edited), with
    the recipe's UNet stage behind it when it has one."""

    name = "sae-guard gate"

    def __init__(self, sae: SAE, concepts: Sequence[Concept], hookpoint: str, edit: Edit | None = None,
                 unet_stage: UNetStage | None = None) -> None:
        self.sae, self.concepts, self.hookpoint, self.edit = sae, list(concepts), hookpoint, edit or Edit()
        self.unet_stage = unet_stage

    @staticmethod
    def attach(pipe: Any, sae: SAE, concepts: Sequence[Concept], hookpoint: str, edit: Edit | None = None,
               unet_stage: UNetStage | None = None) -> GuardedPipeline:
        text = guard_pipeline(pipe, sae=sae, concepts=list(concepts), hookpoint=hookpoint, edit=edit or Edit())
        return GuardedPipeline(text, unet_stage.attach(pipe, text) if unet_stage else None)

    @staticmethod
    def check_steps(unet_stage: UNetStage | None, steps: int) -> None:
        """Refuse sampling too short for the UNet stage to judge (its prompts would pass unjudged)."""
        if unet_stage is not None and steps <= unet_stage.detect_step:
            raise ValueError(f"the UNet stage judges at step {unet_stage.detect_step} (counted from 0); {steps} "
                             "steps never reach it")

    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: T2ISettings) -> Generation:
        verdicts: list[Verdict] = []
        self.check_steps(self.unet_stage, settings.steps)
        guard = self.attach(pipe, self.sae, self.concepts, self.hookpoint, self.edit, self.unet_stage)
        try:
            images = draw(pipe, prompts, seeds, settings, desc=self.name,
                          after_batch=lambda: verdicts.extend(guard.last_verdicts))
        finally:
            guard.detach()
        return Generation(images, [v.flagged for v in verdicts], list(verdicts))


class KeywordFilter(Method):
    """Deletes the concept's words from the prompts that hold one (whole words, any case)."""

    name = "keyword filter"

    def __init__(self, words: Sequence[str]) -> None:
        if not words:
            raise ValueError("a keyword filter needs at least one word")
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def filtered(self, prompt: str) -> str:
        return re.sub(r"\s+", " ", self.pattern.sub("", prompt)).strip()

    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: T2ISettings) -> Generation:
        flagged = [self.pattern.search(p) is not None for p in prompts]
        images = draw(pipe, [self.filtered(p) for p in prompts], seeds, settings, desc=self.name)
        return Generation(images, flagged, [None] * len(prompts))


class NegativePrompt(Method):
    name = "negative prompt"

    def __init__(self, concept: str) -> None:
        self.concept = concept

    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: T2ISettings) -> Generation:
        images = draw(pipe, prompts, seeds, settings, desc=self.name, negative_prompt=[self.concept] * len(prompts))
        return Generation(images, [True] * len(prompts), [None] * len(prompts))


ITD_STRENGTH = -8.0
ITD_MARGIN = 0.99


class InterpretThenDeactivate(Method):
    """ItD as released (see the module docstring). `features` come from the `itd` strategy; `calibrate` sets the
    threshold from target prompts."""

    name = "ItD"

    def __init__(self, sae: SAE, features: torch.Tensor, hookpoint: str, threshold: float | None = None) -> None:
        self.sae, self.features, self.hookpoint, self.threshold = sae, features.long(), hookpoint, threshold

    def _reconstruct(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(edited reconstruction, per-prompt score) for hidden states (B, T, d)."""
        sae = self.sae
        x = hidden.float().to(sae.W_enc.device)
        codes = sae.encode(x)
        flip = torch.zeros(codes.shape[-1], dtype=torch.bool, device=codes.device)
        flip[self.features.to(codes.device)] = True
        edited = codes.clone()
        edited[:, 1:, :] = torch.where(flip, edited[:, 1:, :] * ITD_STRENGTH, edited[:, 1:, :])
        recon = sae.decode(edited)
        return recon, (recon - x).pow(2).mean(dim=(1, 2))

    @contextmanager
    def _hooked(self, pipe: Any, replace: bool) -> Iterator[list[torch.Tensor]]:
        scores: list[torch.Tensor] = []

        def hook(hidden: torch.Tensor) -> torch.Tensor | None:
            recon, score = self._reconstruct(hidden)
            scores.append(score.cpu())
            if not replace:
                return None
            chosen = (score >= self.threshold).to(hidden.device)
            if not bool(chosen.any()):
                return None
            return torch.where(chosen[:, None, None], recon.to(hidden.device, hidden.dtype), hidden)

        handle = hook_hidden(find_hookpoint(pipe, self.hookpoint).module, hook, prepend=True)
        try:
            yield scores
        finally:
            handle.remove()

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: Sequence[str], replace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's prompt embeddings, encoded as `encode_prompt` does, with the ItD hook; and the scores."""
        inputs = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        use_mask = getattr(pipe.text_encoder.config, "use_attention_mask", False)
        device = pipe.text_encoder.device
        with self._hooked(pipe, replace) as scores:
            embeds = pipe.text_encoder(inputs.input_ids.to(device),
                                       attention_mask=inputs.attention_mask.to(device) if use_mask else None)[0]
        return embeds.to(pipe.text_encoder.dtype), torch.cat(scores)

    def calibrate(self, pipe: Any, target_prompts: Sequence[str]) -> float:
        """ItD's rule: 0.99 x the lowest score among the target prompts."""
        if not len(target_prompts):
            raise ValueError("ItD calibrates its threshold on target prompts; none given")
        _, scores = self.encode(pipe, target_prompts, replace=False)
        self.threshold = ITD_MARGIN * float(scores.min())
        return self.threshold

    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: T2ISettings) -> Generation:
        if self.threshold is None:
            raise RuntimeError("calibrate ItD's threshold first (InterpretThenDeactivate.calibrate)")
        embeds, scores = self.encode(pipe, prompts)
        images = draw(pipe, prompts, seeds, settings, desc=self.name, prompt_embeds=embeds)
        return Generation(images, (scores >= self.threshold).tolist(), [None] * len(prompts))
