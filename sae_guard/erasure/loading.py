"""A text-to-image recipe, loaded for generation: its pipeline, its trained SAE and concepts, where they sit.

A text-to-image recipe trains its SAE on the pipeline's text encoder (its `hookpoint` is a module path of that
encoder, so `sae-guard train` and `classify` work on the encoder alone) and adds two tables:

    [t2i]                       # how images are drawn (see methods.T2ISettings)
    image_size = 32
    steps = 20
    guidance_scale = 4.0
    [guard]                     # what `demo`, `generate` and `bench` erase by default (recipes.GuardSpec)
    concepts = ["red"]
    [guard.unet]                # optional: a second judge inside the UNet (adapters.unet_stage), built by
    block = "up_blocks.1.attentions.1"   # `sae-guard train` into the assets' unet/ folder (unet_stage_build)
    prompts = "sae_guard.shapes.concepts:unet_stage_prompts"

`PIPELINES` maps a recipe's `[model] kind` to the function loading its pipeline.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..adapters.unet_stage import UNetStage
from ..concepts.concept import Concept, load_concepts
from ..hooks.gate import Edit
from ..recipes import Recipe, RecipeError, load_recipe
from ..sae.base import SAE
from .methods import T2ISettings


def _shapes_pipeline(recipe: Recipe, device: str | torch.device) -> Any:
    from ..shapes.t2i import load_pipeline

    return load_pipeline(device)


PIPELINES: dict[str, Callable[[Recipe, str | torch.device], Any]] = {"shapes-t2i": _shapes_pipeline}
TEXT_ENCODER = "text_encoder"
UNET_STAGE_FOLDER = "unet"


@dataclass
class T2IRecipe:
    """Everything generation needs from a recipe."""

    recipe: Recipe
    sae: SAE
    concepts: list[Concept]
    settings: T2ISettings
    erase: list[str]  # the [guard] concepts
    edit: Edit
    seed: int
    unet_stage: UNetStage | None = None  # [guard.unet], for the first [guard] concept

    def unet_stage_for(self, concepts: Sequence[Concept]) -> UNetStage | None:
        """The UNet stage when it judges one of `concepts` (it was built for one concept only)."""
        stage = self.unet_stage
        return stage if stage is not None and stage.concept.name in {c.name for c in concepts} else None

    @property
    def hookpoint(self) -> str:
        """The recipe's hookpoint as a path inside the pipeline."""
        return f"{TEXT_ENCODER}.{self.recipe.hookpoint}"

    def concepts_named(self, names: Sequence[str] | None) -> list[Concept]:
        """The fitted concepts to erase (default: the [guard] ones), with a clear error for unknown names."""
        names = list(names or self.erase)
        known = {c.name: c for c in self.concepts}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RecipeError(f"recipe {self.recipe.name!r} has no concept(s) {unknown}; it has {sorted(known)}")
        if not names:
            raise RecipeError(f"recipe {self.recipe.name!r} names no [guard] concepts; pass --concept NAME")
        return [known[n] for n in names]


def recipe_tables(recipe: Recipe) -> dict[str, Any]:
    """The recipe file's raw tables (the [t2i] and [guard] tables are read from here)."""
    return tomllib.loads(recipe.text) if recipe.text else {}


def load_t2i_recipe(name: str | Path | Recipe, assets: str | Path | None = None, unet_stage: bool = True
                    ) -> T2IRecipe:
    """The recipe, its SAE and concepts (from its assets), its drawing settings and its [guard] defaults, and its
    UNet stage when it has a [guard.unet] table (`unet_stage=False`: not loaded, as when it is being built)."""
    recipe = load_recipe(name)
    if recipe.model.kind not in PIPELINES:
        raise RecipeError(f"recipe {recipe.name!r} is not a text-to-image recipe (model kind {recipe.model.kind!r}; "
                          f"text-to-image kinds: {', '.join(PIPELINES)})")
    folder = Path(assets) if assets is not None else recipe.assets
    if not (folder / "sae").is_dir() or not (folder / "concepts").is_dir():
        raise FileNotFoundError(f"recipe {recipe.name!r} has no trained assets in {folder}; build them with "
                                f"`sae-guard train {recipe.name} --data DIR`")
    t2i_table = recipe_tables(recipe).get("t2i", {})
    if not isinstance(t2i_table, dict):
        raise RecipeError(f"recipe {recipe.name!r}: [t2i] must be a table")
    try:
        settings = T2ISettings.from_table(t2i_table)
        seed = int(t2i_table.get("seed", 0))
    except (TypeError, ValueError) as error:
        raise RecipeError(f"recipe {recipe.name!r}: bad [t2i] value ({error})") from None
    stage = None
    if recipe.guard.unet is not None and unet_stage:
        if not (folder / UNET_STAGE_FOLDER).is_dir():
            raise FileNotFoundError(f"recipe {recipe.name!r} has a [guard.unet] table but no {UNET_STAGE_FOLDER}/ "
                                    f"in {folder}; build it with `sae-guard train {recipe.name} --data DIR`")
        stage = _stage_as_recipe_says(recipe, UNetStage.load(folder / UNET_STAGE_FOLDER))
    return T2IRecipe(recipe, SAE.load(folder / "sae"), load_concepts(folder / "concepts"), settings,
                     list(recipe.guard.concepts), recipe.guard.edit, seed, stage)


def _stage_as_recipe_says(recipe: Recipe, stage: UNetStage) -> UNetStage:
    """The built stage with the recipe's runtime settings (which prompts it judges, its edit), refused when the
    recipe now asks for another block or detect step than it was built for."""
    spec = recipe.guard.unet
    built, asked = (stage.block, stage.detect_step), (spec.block, spec.detect_step)
    if built != asked:
        raise RecipeError(f"recipe {recipe.name!r}: its UNet stage was built for block {built[0]!r} at step "
                          f"{built[1]}, the recipe asks for {asked[0]!r} at step {asked[1]}; rebuild it with "
                          f"`python -m sae_guard.erasure.unet_stage_build {recipe.name}`")
    return replace(stage, unread_error=spec.unread_error, edit=spec.edit)


def load_t2i_pipeline(recipe: Recipe, device: str | torch.device = "cpu") -> Any:
    """The recipe's trained pipeline, its per-step progress bar off (the suite shows one per batch)."""
    pipe = PIPELINES[recipe.model.kind](recipe, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
