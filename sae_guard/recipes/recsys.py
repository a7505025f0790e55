"""Recommender recipes: a SASRec trained on MovieLens-100k, its RecSAE on the user representation, genre concepts.

    build("movielens-sasrec")                     # train SASRec -> harvest states -> train the SAE -> fit concepts
    g = load_guard("movielens-sasrec")            # the SASRec with its SAE and genre concepts attached
    g.classify([[50, 181, 172]])[0].concepts      # which genres this user's representation carries

The recipe's own table is [sasrec] (the model's size and training: SASRec's keyword arguments plus `epochs`, `lr`,
`batch_size`, `seed`). Each [[concepts]] entry is a genre: `dataset` names a function f(data, genre, users) ->
(target, retain) histories (`sae_guard.analysis.rec_concepts:genre_fans`: fans of the genre against non-fans),
called on the fit users only (even ids; odd ids stay held out for `sae-guard rec`). The model is saved beside the
SAE and concepts (`sasrec/`), so the assets are the whole recommender.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters.guard import Guard, guard
from ..adapters.recsys import SASRec, fit_sasrec, load_sasrec, save_sasrec, training_windows
from ..analysis.rec_concepts import split_users
from ..concepts import Concept
from ..recsys_data import load_movielens
from ..sae.base import SAE
from ..train import train
from .assets import attached_concepts, log, save_assets
from .errors import RecipeError
from .spec import Recipe, load_recipe, prompt_function
from .text import default_out

TRAINING = {"epochs": 10, "lr": 1e-3, "batch_size": 128, "seed": 0}
MODEL_DIR = "sasrec"


def sasrec_settings(recipe: Recipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """([sasrec] model keyword arguments, training settings), checked against SASRec's signature."""
    table = dict(recipe.tables.get("sasrec", {}))
    model_keys = set(inspect.signature(SASRec).parameters) - {"n_items"}
    unknown = set(table) - model_keys - set(TRAINING)
    if unknown:
        raise RecipeError(f"[sasrec] has unknown keys {sorted(unknown)}; known: {sorted(model_keys | set(TRAINING))}")
    return ({k: v for k, v in table.items() if k in model_keys},
            {k: table.get(k, default) for k, default in TRAINING.items()})


def build(recipe: Recipe | str | Path, data_dir: str | Path | None = None, out: str | Path | None = None,
          work_dir: str | Path | None = None, progress: bool = True, sae: str | Path | None = None,
          wheel: str | Path | None = None) -> dict[str, Any]:
    """Train the SASRec, its SAE (or take `sae`, a trained one beside its model) and the genre concepts; save them.

    data_dir and work_dir are unused (the data is MovieLens-100k from `wheel`, default the cache's copy). `sae`: the
    sae/ folder of this recipe's assets; it and the model beside it (../sasrec) are reused, only concepts refitted.
    """
    recipe = load_recipe(recipe)
    out = Path(out) if out is not None else default_out(recipe)
    data = load_movielens(wheel)
    model_args, settings = sasrec_settings(recipe)
    torch.manual_seed(settings["seed"])
    if sae is not None:
        model, sae_model = load_sasrec(Path(sae).parent / MODEL_DIR), SAE.load(sae)
        figures: dict[str, Any] = {"reused": str(sae)}
    else:
        log(progress, f"{recipe.name}: training SASRec for {settings['epochs']} epochs")
        model = fit_sasrec(SASRec(data.n_items, **model_args), data.train_sequences, epochs=settings["epochs"],
                           batch_size=settings["batch_size"], lr=settings["lr"], seed=settings["seed"],
                           log=(lambda m: log(progress, m)))
        sae_model, figures = _train_sae(recipe, model, data, progress)
    sae_model.eval()
    fit_users, _ = split_users(len(data.sequences))
    concepts = []
    for spec in recipe.concepts:
        target, retain = prompt_function(spec.dataset, "[[concepts]] dataset")(data, spec.name, fit_users)
        concepts.append(Concept(spec.name, target=target, retain=retain, strategy=spec.strategy,
                                n_features=spec.n_features, fpr=spec.fpr, seed=recipe.data.split_seed))
    log(progress, f"{recipe.name}: fitting {len(concepts)} genre concepts on {len(fit_users)} fit users")
    guard(model, sae=sae_model, concepts=concepts, hookpoint=recipe.hookpoint).detach()  # fits them
    report = {"recipe": recipe.name, "sae": figures,
              "concepts": {c.name: {**c.calibration, "threshold": c.threshold} for c in concepts}}
    save_assets(recipe, sae_model, concepts, out, report, extra=lambda folder: save_sasrec(model, folder / MODEL_DIR))
    return report


def _train_sae(recipe: Recipe, model: SASRec, data, progress: bool) -> tuple[SAE, dict[str, Any]]:
    """RecSAE's recipe: the SAE trains on the user state at every valid position of the training windows."""
    spec = recipe.sae
    x, _ = training_windows(data.train_sequences, model.max_len)
    with torch.no_grad():
        states = model(x)[x != 0]
    torch.manual_seed(spec.seed)
    sae = SAE.create(spec.architecture, d_in=states.shape[1], d_sae=spec.d_sae, **dict(spec.options))
    log(progress, f"{recipe.name}: training {spec.architecture} d_sae={spec.d_sae} on {len(states)} user states")
    sae, figures = train(sae, states, tokens=spec.tokens, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
                         progress=progress)
    sae.cfg.metadata.update({"hookpoint": recipe.hookpoint, "model": dataclasses.asdict(recipe.model),
                             "recipe": recipe.name, "states": int(states.shape[0])})
    return sae, {k: v for k, v in figures.items() if isinstance(v, (int, float))} | {"states": int(states.shape[0])}


def load_guard(recipe: Recipe | str | Path, assets: str | Path | None = None,
               device: str | torch.device | None = None, concepts: Sequence[str] | None = None) -> Guard:
    """The recipe's SASRec with its SAE and genre concepts attached: `classify(histories)` gives per-user verdicts,
    and the model's scores are gated with the [guard] edit."""
    recipe = load_recipe(recipe)
    folder = Path(assets) if assets is not None else recipe.assets
    if not all((folder / part).is_dir() for part in (MODEL_DIR, "sae", "concepts")):
        raise FileNotFoundError(f"recipe {recipe.name!r} has no trained assets in {folder} (sasrec/, sae/, "
                                f"concepts/); build them with `sae-guard train {recipe.name}`")
    model = load_sasrec(folder / MODEL_DIR)
    if device is not None:
        model.to(device)
    sae = SAE.load(folder / "sae", device=device)
    return guard(model, sae=sae, concepts=attached_concepts(recipe, folder, concepts), hookpoint=recipe.hookpoint,
                 edit=recipe.guard.edit)
