"""Image recipes: a vision backbone (timm or open_clip), an SAE on its tokens, and concepts fitted on images.

    build("shapes-clip-vision")              # harvest training images' tokens -> train the SAE -> fit concepts
    g = load_guard("shapes-clip-vision")     # the model with its SAE and concepts attached
    g.classify([image])[0].concepts          # which concepts an image shows

The recipe's own table is [images]:

    [images]
    sae = "module:function"     # f(n, seed) -> the images the SAE trains on (PIL images or image tensors)
    n_sae = 4000                # how many
    n_concept = 1200            # images each concept's dataset function is asked for
    seed = 1000                 # their seed
    scope = "all"               # the vision token scope that scores and is edited ("all", "cls", "patches")

Each [[concepts]] `dataset` names f(name, n, seed) -> (target images, retain images). The model comes from
`[model] kind` (recipes.models); it is never trained here, so the assets are the SAE and concepts alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters.guard import Guard, guard
from ..adapters.vision import SCOPES, harvest_tokens
from ..concepts import Concept
from ..sae.base import SAE
from ..train import train
from .assets import attached_concepts, log, round_to_fp16, save_assets
from .errors import RecipeError
from .models import load_model
from .spec import Recipe, load_recipe, prompt_function
from .text import default_out

IMAGES = {"sae": None, "n_sae": 4000, "n_concept": 1200, "seed": 1000, "scope": "all"}


def image_settings(recipe: Recipe) -> dict[str, Any]:
    """The [images] table with its defaults, checked."""
    table = dict(recipe.tables.get("images", {}))
    unknown = set(table) - set(IMAGES)
    if unknown:
        raise RecipeError(f"[images] has unknown keys {sorted(unknown)}; known: {sorted(IMAGES)}")
    settings = IMAGES | table
    if not isinstance(settings["sae"], str):
        raise RecipeError("[images] sae must name a function f(n, seed) -> images, e.g. "
                          "'sae_guard.shapes.image_sets:training_images'")
    prompt_function(settings["sae"], "[images] sae")
    for key in ("n_sae", "n_concept"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] <= 0:
            raise RecipeError(f"[images] {key} must be a positive integer, got {settings[key]!r}")
    if settings["scope"] not in SCOPES:
        raise RecipeError(f"[images] scope must be one of {', '.join(SCOPES)}, got {settings['scope']!r}")
    return settings


def build(recipe: Recipe | str | Path, data_dir: str | Path | None = None, out: str | Path | None = None,
          work_dir: str | Path | None = None, progress: bool = True, sae: str | Path | None = None) -> dict[str, Any]:
    """Train the SAE on the training images' tokens (or take `sae`, a trained one), fit the concepts, save them.
    data_dir and work_dir are unused: the images come from the recipe's functions."""
    recipe = load_recipe(recipe)
    settings = image_settings(recipe)
    out = Path(out) if out is not None else default_out(recipe)
    model, _ = load_model(recipe)
    if sae is not None:
        sae_model, figures = SAE.load(sae), {"reused": str(sae)}
    else:
        images = prompt_function(settings["sae"], "[images] sae")(settings["n_sae"], settings["seed"])
        log(progress, f"{recipe.name}: harvesting {recipe.hookpoint} on {len(images)} images")
        tokens = harvest_tokens(model, recipe.hookpoint, images)
        spec = recipe.sae
        torch.manual_seed(spec.seed)
        sae_model = SAE.create(spec.architecture, d_in=tokens.shape[1], d_sae=spec.d_sae, **dict(spec.options))
        log(progress, f"{recipe.name}: training {spec.architecture} d_sae={spec.d_sae} on {len(tokens)} tokens")
        sae_model, trained = train(sae_model, tokens, tokens=spec.tokens, batch_size=spec.batch_size, lr=spec.lr,
                                   seed=spec.seed, progress=progress)
        sae_model.cfg.metadata.update({"hookpoint": recipe.hookpoint, "model": dataclasses.asdict(recipe.model),
                                       "recipe": recipe.name, "images": len(images)})
        figures = {k: v for k, v in trained.items() if isinstance(v, (int, float))} | {"tokens": len(tokens)}
    sae_model.eval()
    round_to_fp16(sae_model)  # the concepts are calibrated on the weights the shipped fp16 files load back as
    concepts = []
    for spec in recipe.concepts:
        target, retain = prompt_function(spec.dataset, "[[concepts]] dataset")(spec.name, settings["n_concept"],
                                                                             settings["seed"])
        concepts.append(Concept(spec.name, target=target, retain=retain, strategy=spec.strategy,
                                n_features=spec.n_features, fpr=spec.fpr, seed=recipe.data.split_seed))
    log(progress, f"{recipe.name}: fitting {len(concepts)} concepts")
    guard(model, sae=sae_model, concepts=concepts, hookpoint=recipe.hookpoint, scope=settings["scope"]).detach()
    report = {"recipe": recipe.name, "sae": figures,
              "concepts": {c.name: {**c.calibration, "threshold": c.threshold} for c in concepts}}
    save_assets(recipe, sae_model, concepts, out, report)
    return report


def load_guard(recipe: Recipe | str | Path, assets: str | Path | None = None,
               device: str | torch.device | None = None, concepts: Sequence[str] | None = None) -> Guard:
    """The recipe's model with its SAE and concepts attached: `classify(images)` gives one verdict per image, and
    the model's forward is gated with the [guard] edit on flagged images."""
    recipe = load_recipe(recipe)
    folder = Path(assets) if assets is not None else recipe.assets
    if not all((folder / part).is_dir() for part in ("sae", "concepts")):
        raise FileNotFoundError(f"recipe {recipe.name!r} has no trained assets in {folder} (sae/, concepts/); "
                                f"build them with `sae-guard train {recipe.name}`")
    model, _ = load_model(recipe, device)
    sae = SAE.load(folder / "sae", device=device)
    return guard(model, sae=sae, concepts=attached_concepts(recipe, folder, concepts), hookpoint=recipe.hookpoint,
                 edit=recipe.guard.edit, scope=image_settings(recipe)["scope"])
