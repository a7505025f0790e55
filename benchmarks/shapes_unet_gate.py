"""Would a gate inside the UNet catch the colour words the text gate cannot read? A measured design.

    python benchmarks/shapes_unet_gate.py --threads 2                            # the suite's 200 prompts per group
    python benchmarks/shapes_unet_gate.py --n 60 --world-seed 2000 --threads 2   # the selection prompts

The shipped `red` concept lives on the text encoder's embedding output, where the SAE hardly holds rare words
("crimson": relative reconstruction error 0.7-0.8, `benchmarks/shapes_paraphrase.py`), so it flags no paraphrase.
The UNet, though, draws red the same way whatever word asked for it. This script measures a gate in the UNet's
own feature space, in the manner of SAeUron (an SAE on a diffusion UNet's cross-attention block, every timestep,
the error term kept), built from the library's own parts: `Gate` (a (B, C, H, W) block output is gated with each
position as a token), a `probe` `Concept` and its `ConceptPolicy`. It measures a design; nothing is saved.

1. Harvest: the world's training captions (world seed 7000, not a concept split or bench seed) are drawn with
   the recipe's settings; at the `--block` output every position of the prompt half of the classifier-free-
   guidance batch, at every step, is a token.
2. A TopK SAE on those tokens (`sae_guard.train`, 8 x C latents, k 8).
3. The concept: `Concept(strategy="probe")` whose inputs are images, each its block output at step
   `--detect-step`: fitted on single-shape training captions with the colour against the other colours (world
   seeds 7100-7101), calibrated at `--fpr` on another such set (7200-7201).
4. The gate: at the detect step the concept's policy scores the prompt half; a flagged image stays flagged, and
   from then on every step multiplies its positive-weight latents by `--strength` (`deactivate`) as a delta at
   the block. Unflagged images, and the negative-prompt half, are never edited.

Rows: unguarded, the shipped text gate, the UNet gate alone, both, and the UNet edit on every image from the
detect step (a classifier that flags everything: what the edit alone can do). The suite's prompts and seeds
(prompt i of the suite from seed i), scored as `sae-guard bench erasure` scores them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sae_guard import SAE, Concept, train
from sae_guard.concepts.policy import ConceptPolicy
from sae_guard.erasure.loading import load_t2i_pipeline, load_t2i_recipe
from sae_guard.erasure.methods import Gate, Generation, Method, T2ISettings, Unguarded, draw
from sae_guard.erasure.scorers import ShapesScorer
from sae_guard.erasure.suite import BENCH_WORLD_SEED, run_suite, shapes_prompts
from sae_guard.hooks.gate import Edit, GateCall
from sae_guard.hooks.gate import Gate as HookGate
from sae_guard.hooks.hookpoints import find_hookpoint, hidden_of
from sae_guard.sae.codes import SparseCodes
from sae_guard.shapes.world import COLOURS, ShapesWorld

HARVEST_WORLD_SEED = 7000


@torch.no_grad()
def harvest(pipe: Any, block: str, captions: Sequence[str], settings: T2ISettings, seed: int) -> Tensor:
    """(captions, steps, positions, C) float32 block outputs of the prompt half (image i from seed `seed + i`)."""
    calls: list[Tensor] = []

    def record(_module: Any, _args: Any, output: Any) -> None:
        hidden = hidden_of(output)
        calls.append(hidden[hidden.shape[0] // 2:].flatten(2).transpose(1, 2).float())

    handle = pipe.unet.get_submodule(block).register_forward_hook(record)
    try:
        draw(pipe, captions, [seed + i for i in range(len(captions))], settings, desc="harvest")
    finally:
        handle.remove()
    steps = settings.steps
    return torch.cat([torch.stack(calls[i:i + steps], 1) for i in range(0, len(calls), steps)])


def image_encoder(sae: SAE) -> Any:
    """A `Concept` encoder whose inputs are images, each a (positions, C) block output."""

    @torch.no_grad()
    def encode(images: Sequence[Tensor]) -> tuple[SparseCodes, Tensor, int]:
        stacked = torch.stack(list(images))
        index = torch.arange(len(images)).repeat_interleave(stacked.shape[1])
        return sae.encode_sparse(stacked.flatten(0, 1)), index, len(images)

    return encode


class DetectThenEdit:
    """A gate's `decide` for a sampling loop: the policy judges the prompt half once, at `detect_step`; a flagged
    image's concept latents are edited from then on. `step` is advanced by a pre-hook on the UNet."""

    def __init__(self, policy: ConceptPolicy, detect_step: int, every_image: bool = False) -> None:
        self.policy, self.detect_step, self.every_image = policy, detect_step, every_image
        self.members = policy.members.any(0)
        self.reset()

    def reset(self) -> None:
        self.step, self.flagged = -1, None

    def __call__(self, call: GateCall) -> Tensor:
        half = call.n_prompts // 2
        prompt_half = call.prompt_index >= half
        if self.step == self.detect_step:
            codes = SparseCodes(call.codes.values[prompt_half], call.codes.indices[prompt_half])
            self.policy(GateCall(codes, call.prompt_index[prompt_half] - half, call.token_index[prompt_half], half,
                                 call.editing))
            verdicts = torch.tensor([v.flagged for v in self.policy.last_verdicts])
            self.flagged = torch.ones_like(verdicts) if self.every_image else verdicts
        chosen = torch.zeros_like(call.codes.values, dtype=torch.bool)
        if self.flagged is None or not bool(self.flagged.any()):
            return chosen
        flagged = prompt_half & self.flagged.to(prompt_half.device)[(call.prompt_index - half).clamp_min(0)]
        return flagged[:, None] & self.members[call.codes.indices] & (call.codes.values != 0)


class UNetGate(Method):
    """The design above, optionally on top of the shipped text gate (`text`)."""

    def __init__(self, block: str, sae: SAE, concept: Concept, detect_step: int, edit: Edit,
                 text: Gate | None = None, every_image: bool = False) -> None:
        self.block, self.sae, self.concept, self.edit, self.text = block, sae, concept, edit, text
        self.decide = DetectThenEdit(ConceptPolicy(sae, [concept], edit.mode), detect_step, every_image)
        self.name = "unet edit, all" if every_image else "text + unet gate" if text else "unet gate"

    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: T2ISettings) -> Generation:
        if settings.guidance_scale <= 1:
            raise ValueError("the UNet gate reads the prompt half of a classifier-free-guidance batch; "
                             f"guidance_scale {settings.guidance_scale} runs none")
        flags: list[bool] = []
        text_flags: list[bool] = []
        gate = HookGate(find_hookpoint(pipe.unet, self.block), self.sae, self.decide, self.edit).attach()
        step = pipe.unet.register_forward_pre_hook(lambda *_: setattr(self.decide, "step", self.decide.step + 1))
        guard = Gate.attach(pipe, self.text.sae, self.text.concepts, self.text.hookpoint, self.text.edit) \
            if self.text else None

        def end_batch() -> None:
            if self.decide.flagged is None:
                raise RuntimeError(f"detect step {self.decide.detect_step} is past the {settings.steps} steps")
            flags.extend(self.decide.flagged.tolist())
            if guard:
                text_flags.extend(v.flagged for v in guard.last_verdicts)
            self.decide.reset()

        try:
            images = draw(pipe, prompts, seeds, settings, desc=self.name, after_batch=end_batch)
        finally:
            gate.detach()
            step.remove()
            if guard:
                guard.detach()
        if guard:
            flags = [u or t for u, t in zip(flags, text_flags, strict=True)]
        return Generation(images, flags, [None] * len(prompts))


def fit_unet_concept(pipe: Any, block: str, sae: SAE, concept: str, n: int, detect_step: int, n_latents: int,
                     fpr: float, settings: T2ISettings) -> Concept:
    """The `probe` concept at `detect_step`, fitted and calibrated on single-shape training captions."""
    others = tuple(c for c in COLOURS if c != concept)
    splits = []
    for offset in (100, 200):  # fit, calibrate
        _, _, shows = ShapesWorld(two_shape_prob=0.0, colours=(concept,)).sample(n // 2, HARVEST_WORLD_SEED + offset,
                                                                                 "train")
        _, _, lacks = ShapesWorld(two_shape_prob=0.0, colours=others).sample(n, HARVEST_WORLD_SEED + offset + 1,
                                                                             "train")
        images = harvest(pipe, block, shows + lacks, settings, HARVEST_WORLD_SEED + offset)[:, detect_step]
        splits.append((list(images[:len(shows)]), list(images[len(shows):])))
    (target, retain), (calibrate_target, calibrate_retain) = splits
    fitted = Concept(concept, target=target, retain=retain, calibrate_target=calibrate_target,
                     calibrate_retain=calibrate_retain, strategy="probe", n_features=n_latents, fpr=fpr)
    return fitted.fit(image_encoder(sae), sae.d_sae, sae.W_dec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="shapes")
    parser.add_argument("--concept", default="red")
    parser.add_argument("--n", type=int, default=200, help="prompts per group of the suite")
    parser.add_argument("--world-seed", type=int, default=BENCH_WORLD_SEED,
                        help="the suite's world seed (2000: the prompts the recipe's strength was chosen on)")
    parser.add_argument("--block", default="up_blocks.1.attentions.1")
    parser.add_argument("--harvest", type=int, default=320, help="captions drawn for the SAE, and per concept split")
    parser.add_argument("--latents", type=int, default=16)
    parser.add_argument("--detect-step", type=int, default=2)
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--strength", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t2i = load_t2i_recipe(args.recipe)
    pipe = load_t2i_pipeline(t2i.recipe)
    settings = t2i.settings

    _, _, captions = ShapesWorld().sample(args.harvest, HARVEST_WORLD_SEED, "train")
    tokens = harvest(pipe, args.block, captions, settings, HARVEST_WORLD_SEED)
    width = tokens.shape[-1]
    torch.manual_seed(0)
    sae = train(SAE.create("topk", d_in=width, d_sae=8 * width, k=8), tokens.reshape(-1, width),
                tokens=3_000_000, batch_size=4096).sae.train(False)
    concept = fit_unet_concept(pipe, args.block, sae, args.concept, args.harvest, args.detect_step, args.latents,
                               args.fpr, settings)
    edit = Edit("deactivate", args.strength)
    text = Gate(t2i.sae, t2i.concepts_named([args.concept]), t2i.hookpoint, t2i.edit)
    methods = [Unguarded(), text, UNetGate(args.block, sae, concept, args.detect_step, edit),
               UNetGate(args.block, sae, concept, args.detect_step, edit, text),
               UNetGate(args.block, sae, concept, args.detect_step, edit, every_image=True)]
    prompts = shapes_prompts(args.concept, args.n, seed=args.world_seed)
    result = run_suite(pipe, methods, prompts, ShapesScorer(args.concept), settings, seed=t2i.seed)
    calibration = concept.calibration
    print(f"{args.block}: {calibration['n_features']} latents, detect at step {args.detect_step}, threshold "
          f"{concept.threshold:.3g} (calibrate: FPR {calibration['fpr']:.3f}, TPR {calibration['tpr']:.3f}), "
          f"strength {args.strength:g}")
    print(result.table())


if __name__ == "__main__":
    main()
