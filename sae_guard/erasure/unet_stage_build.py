"""Build a recipe's `[guard.unet]` stage: harvest a UNet block while drawing, train its SAE, fit its concept.

    stage, report = build_unet_stage(t2i, pipe)      # t2i: a loaded T2IRecipe whose [guard] has a unet table
    build_into_assets("shapes")                      # the same, saved as the recipe's assets' unet/ folder

`sae-guard train RECIPE` runs `build_into_assets` after the text SAE and concepts; this module's command runs it
alone, leaving them as they are:

    python -m sae_guard.erasure.unet_stage_build shapes [--out ASSETS]

1. Harvest: the spec's SAE captions are drawn with the recipe's settings (image i from seed `seed + i`); at
   the block's output every position of the prompt half of the guidance batch, at every step, is a token.
2. A TopK SAE on those tokens (8 x channels latents, k 8).
3. The concept: `Concept(strategy="probe")` whose inputs are images, each the block's output at the detect step,
   fitted on the spec's fit captions and its threshold calibrated at the spec's `fpr` on its calibrate captions.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapters.unet_stage import UNetStage, image_encoder
from ..concepts.concept import Concept
from ..hooks.hookpoints import hidden_of
from ..recipes import Recipe, RecipeError, load_recipe, make_readable, prompt_function
from ..sae.base import SAE
from ..train import train
from ..train.trainer import tenth_of_run_dead_tokens
from .loading import UNET_STAGE_FOLDER, T2IRecipe, load_t2i_pipeline, load_t2i_recipe
from .methods import T2ISettings, draw

SAE_EXPANSION, SAE_K = 8, 8
IMAGE_SEEDS = {"sae": 7000, "fit": 7100, "calibrate": 7200}  # image i of a harvest: seed + i


@torch.no_grad()
def harvest_block(pipe: Any, block: str, captions: Sequence[str], settings: T2ISettings, seed: int) -> Tensor:
    """(captions, steps, positions, channels) fp32 outputs of `block` on the prompt half (image i from seed + i)."""
    calls: list[Tensor] = []

    def record(_module: Any, _args: Any, output: Any) -> None:
        hidden = hidden_of(output)
        half = hidden.shape[0] // 2 if settings.guidance_scale > 1 else 0
        calls.append(hidden[half:].flatten(2).transpose(1, 2).float())

    handle = pipe.unet.get_submodule(block).register_forward_hook(record)
    try:
        draw(pipe, captions, [seed + i for i in range(len(captions))], settings, desc=f"harvest {block}")
    finally:
        handle.remove()
    steps = settings.steps
    return torch.cat([torch.stack(calls[i:i + steps], 1) for i in range(0, len(calls), steps)])


def build_unet_stage(t2i: T2IRecipe, pipe: Any, progress: bool = True) -> tuple[UNetStage, dict[str, Any]]:
    """The recipe's UNet stage for its first [guard] concept, and what was measured building it."""
    return build_unet_stages(t2i, pipe, progress=progress)[0]


def build_unet_stages(t2i: T2IRecipe, pipe: Any, fprs: Sequence[float] | None = None, progress: bool = True
                      ) -> list[tuple[UNetStage, dict[str, Any]]]:
    """One stage per calibration FPR (default: the recipe's), sharing one harvest, SAE and concept fit."""
    spec = t2i.recipe.guard.unet
    if spec is None:
        raise RecipeError(f"recipe {t2i.recipe.name!r} has no [guard.unet] table")
    if spec.detect_step >= t2i.settings.steps:
        raise RecipeError(f"[guard.unet] detect_step {spec.detect_step} is past the {t2i.settings.steps} steps")
    started = time.perf_counter()
    name = t2i.erase[0]
    sae_captions, fit, calibrate = prompt_function(spec.prompts, "[guard.unet]")(name, spec.captions)
    settings = t2i.settings
    tokens = harvest_block(pipe, spec.block, sae_captions, settings, IMAGE_SEEDS["sae"])
    width = tokens.shape[-1]
    torch.manual_seed(t2i.recipe.sae.seed)
    batch_size = min(4096, spec.sae_tokens)
    # the rate and dead window the shipped stages were built with (before the narrow-input defaults)
    sae = SAE.create("topk", d_in=width, d_sae=SAE_EXPANSION * width, k=SAE_K,
                     dead_tokens=tenth_of_run_dead_tokens(spec.sae_tokens, batch_size))
    result = train(sae, tokens.reshape(-1, width), tokens=spec.sae_tokens, batch_size=batch_size, lr=sae.width_lr(),
                   progress=progress)
    sae = result.sae.train(False)
    images = {}
    for split, captions in (("fit", fit), ("calibrate", calibrate)):
        drawn = harvest_block(pipe, spec.block, [*captions.target, *captions.retain], settings, IMAGE_SEEDS[split])
        images[split] = list(drawn[:, spec.detect_step])
    n_fit, n_cal = len(fit.target), len(calibrate.target)
    built = []
    for fpr in fprs or [spec.fpr]:
        concept = Concept(name, target=images["fit"][:n_fit], retain=images["fit"][n_fit:],
                          calibrate_target=images["calibrate"][:n_cal], calibrate_retain=images["calibrate"][n_cal:],
                          strategy="probe", n_features=spec.n_features, fpr=fpr)
        concept.fit(image_encoder(sae), sae.d_sae, sae.W_dec.detach())
        concept.target, concept.retain, concept.calibrate_target, concept.calibrate_retain = (), (), None, None
        report = {"block": spec.block, "channels": width, "d_sae": sae.d_sae, "k": SAE_K,
                  "sae_captions": len(sae_captions), "tokens_harvested": int(tokens.shape[:3].numel()),
                  "sae_train": result.metrics, "concept": {"name": name, "threshold": concept.threshold,
                                                           **concept.calibration},
                  "seconds": round(time.perf_counter() - started, 1)}
        built.append((UNetStage(spec.block, sae, concept, spec.detect_step, spec.unread_error, spec.edit), report))
    return built


def build_into_assets(recipe: str | Path | Recipe, out: str | Path | None = None, progress: bool = True
                      ) -> dict[str, Any]:
    """Build the recipe's stage and save it as `unet/` inside its assets (`out`, default the packaged folder),
    with what was measured in `unet/training.json`; return that report."""
    recipe = load_recipe(recipe)
    assets = Path(out) if out is not None else recipe.assets
    t2i = load_t2i_recipe(recipe, assets, unet_stage=False)
    stage, report = build_unet_stage(t2i, load_t2i_pipeline(recipe), progress)
    folder = stage.save(assets / UNET_STAGE_FOLDER)
    (folder / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    make_readable(folder)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a text-to-image recipe's [guard.unet] stage alone.")
    parser.add_argument("recipe", help="recipe name (e.g. shapes) or path to a .toml")
    parser.add_argument("--out", help="the recipe's assets folder (default: the packaged one)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(build_into_assets(args.recipe, args.out), indent=2))


if __name__ == "__main__":
    main()
