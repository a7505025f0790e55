"""Recipes: one TOML file names a model, a hookpoint, an SAE, its training prompts and its concepts.

    recipe = load_recipe("minilm-prompts")     # pipelines/minilm-prompts.toml in a checkout, else the packaged copy
    build(recipe, data_dir="../shared/data/prompts")   # harvest -> train the SAE -> fit concepts -> save assets
    g = load_guard(recipe)                     # the model with the trained SAE and fitted concepts attached
    g.classify(["a photo of a cat"])[0].flagged

A recipe's shipped assets live inside the package, in `sae_guard/assets/<assets>/` (default: the recipe's name);
`build` writes new ones into the cache (`default_out`) or a folder it is given, the package's only when asked:
`sae/` (cfg.json + sae.safetensors, stored fp16 to stay small; loading casts to fp32), `concepts/`
(concepts.json + concepts.safetensors), `recipe.toml` (the recipe they were built from, so an installed package
finds it by name) and `training.json` (what `build` measured). The SAE is rounded to fp16 before the concepts are
fitted, so the shipped thresholds were calibrated on exactly the weights that load back.

Kinds: `kind = "text"` (the default) is a prompt recipe, built and loaded by `recipes.text`; every other kind is one
module of this package named in `KINDS`, which builds and loads it and may read top-level tables of its own
(`spec.RECIPE_KINDS`). Model loaders are in `recipes.models.MODEL_KINDS`.

Format (every key but `name`, `hookpoint`, `[model] kind` and the concepts' `name` / `dataset` has a default):

    name = "minilm-prompts"
    hookpoint = "encoder.layer.4"           # a module path of the model
    [model]
    kind = "minilm"                         # a key of MODEL_KINDS; `id` names hub weights for kinds that need them
    [sae]
    architecture = "topk"                   # any registered variant; keys beyond the ones below are its own
    d_sae = 4096                            #   config fields (k = 32 for topk), checked against its config class
    tokens = 3_000_000                      # activation vectors trained on (epochs over the harvested tokens)
    batch_size = 4096
    lr = 2e-4                               # omitted: the variant's default
    seed = 0
    [data]
    sets = ["coco", "diffusiondb"]          # functions returning prompts (see "Functions" below)
    concept_fit = true                      # also train on each concept's fit split
    exclude_evaluation = true               # drop the evaluation-only sets (`prompts.evaluation_prompts`)
    split_seed = 0                          # seed of the concept datasets' fit / calibrate / test splits
    [[concepts]]
    name = "nudity"
    dataset = "nudity"                      # a function returning a ConceptData (see "Functions" below)
    strategy = "greedy_tpr"                 # a key of sae_guard.concepts.STRATEGIES
    n_features = 32
    fpr = 0.01                              # threshold: this share of calibrate-split retain prompts is flagged
    [guard]                                 # what `load_guard` attaches by default
    concepts = ["nudity"]                   #   the concepts it gates (default: every concept of the recipe)
    mode = "deactivate"                     #   the edit on flagged tokens (sae_guard.Edit), default deactivate
    strength = 0.0                          #   with strength 0
    [guard.unet]                            # text-to-image recipes: a judge inside the UNet for prompts the
    block = "up_blocks.1.attentions.1"      #   SAE cannot fully read (UNetStageSpec; pipelines/shapes.toml)
    prompts = "module:function"

Functions: a bare name ("coco") is a function of sae_guard.prompts; "package.module:function" names any other
(e.g. "sae_guard.shapes.concepts:colour_red"). Set functions are called as f(folder=DATA_DIR); concept-dataset
functions as f(DATA_DIR, split_seed).

Calibrate and test prompts of every concept are removed from the SAE's training prompts; concepts pick features on
their fit split and set thresholds on their calibrate split; the test split is left to the benchmarks.
A build writes its assets into a temporary folder beside the destination and swaps it in at the end, so a build
that fails (a concept with no target prompts, no feature found, ...) leaves the previous assets as they were.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .assets import TRAINING_REPORT, make_readable, save_assets
from .errors import RecipeError
from .models import MODEL_KINDS, load_model
from .spec import (ASSETS_ROOT, CHECKOUT_PIPELINES, RECIPE_COPY, ConceptSpec, DataSpec, GuardSpec, ModelSpec, Recipe,
                   SAESpec, UNetStageSpec, available_recipes, find_recipe, load_recipe, parse_recipe, prompt_function)
from .text import (HarvestedCodes, activation_cache_file, check_concept_data, concept_datasets, concept_prompts,
                   default_out, default_work_dir, harvest_activations, harvest_order, token_counts, training_prompts)

# recipe kind -> the module of this package that builds and loads it (`build(recipe, ...)`, `load_guard(recipe, ...)`)
KINDS: dict[str, str] = {
    "text": "text",
    "recsys": "recsys",
    "vision": "vision",
}


def kind_module(recipe: Recipe) -> Any:
    return importlib.import_module(f"{__name__}.{KINDS[recipe.kind]}")


def build(recipe: Recipe | str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Train the recipe's SAE, fit its concepts and save them (see its kind's `build`); return what was measured."""
    recipe = load_recipe(recipe)
    return kind_module(recipe).build(recipe, *args, **kwargs)


def load_guard(recipe: Recipe | str | Path, *args: Any, **kwargs: Any) -> Any:
    """The recipe's model with its trained SAE and fitted concepts attached (see its kind's `load_guard`)."""
    recipe = load_recipe(recipe)
    return kind_module(recipe).load_guard(recipe, *args, **kwargs)


__all__ = [
    "ASSETS_ROOT", "CHECKOUT_PIPELINES", "KINDS", "MODEL_KINDS", "RECIPE_COPY", "TRAINING_REPORT", "ConceptSpec",
    "DataSpec", "GuardSpec", "HarvestedCodes", "ModelSpec", "Recipe", "RecipeError", "SAESpec", "UNetStageSpec",
    "activation_cache_file", "available_recipes", "build", "check_concept_data", "concept_datasets",
    "concept_prompts", "default_out", "default_work_dir", "find_recipe", "harvest_activations", "harvest_order", "load_guard",
    "load_model", "load_recipe", "make_readable", "parse_recipe", "prompt_function", "save_assets", "token_counts",
    "training_prompts",
]
