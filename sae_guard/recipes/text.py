"""Prompt recipes: a text model's SAE trained on prompt sets, concepts fitted on prompt datasets.

    build("minilm-prompts", data_dir="../shared/data/prompts")   # harvest -> train -> fit concepts -> save
    load_guard("minilm-prompts").classify(["a photo of a cat"])
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import prompts as prompt_sets
from ..adapters.guard import Guard, guard
from ..cache import cache_root
from ..concepts import Concept
from ..sae.base import SAE
from ..sae.codes import SparseCodes
from ..sae.metrics import evaluate
from ..train import harvest, train
from .assets import TRAINING_REPORT, attached_concepts, fingerprint as _fingerprint, log as _log, round_to_fp16 as _round_to_fp16, \
    save_assets
from .errors import RecipeError
from .models import load_model
from .spec import Recipe, load_recipe, prompt_function

HARVEST_BATCH = 64


def concept_datasets(recipe: Recipe, data_dir: str | Path | None = None) -> dict[str, prompt_sets.ConceptData]:
    """Each concept's fit / calibrate / test splits, by concept name."""
    datasets = {}
    for spec in recipe.concepts:
        data = prompt_function(spec.dataset, "dataset")(data_dir, recipe.data.split_seed)
        if not isinstance(data, prompt_sets.ConceptData):
            raise RecipeError(f"sae_guard.prompts.{spec.dataset} returned {type(data).__name__}, not a ConceptData")
        datasets[spec.name] = data
    return datasets


def training_prompts(recipe: Recipe, data_dir: str | Path | None = None) -> list[str]:
    """The SAE's training prompts: the recipe's sets (+ concept fit splits), minus every held-out prompt."""
    datasets = list(concept_datasets(recipe, data_dir).values())
    pool: list[str] = []
    for name in recipe.data.sets:
        prompts = prompt_function(name, "sets")(folder=data_dir)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RecipeError(f"sae_guard.prompts.{name} did not return a list of prompts")
        pool += prompts
    return prompt_sets.training_pool(pool, datasets, data_dir, recipe.data.split_seed, recipe.data.concept_fit,
                                     recipe.data.exclude_evaluation)


def concept_prompts(datasets: Mapping[str, prompt_sets.ConceptData]) -> list[str]:
    """Every fit and calibrate prompt of every concept, once: what fitting the concepts reads."""
    return list(dict.fromkeys(p for d in datasets.values() for s in (d.fit, d.calibrate) for p in (*s.target,
                                                                                                   *s.retain)))


def harvest_order(prompts: Sequence[str]) -> list[str]:
    """The order prompts are harvested in (by length: less padding; training shuffles tokens anyway)."""
    return sorted(prompts, key=len)


def default_out(recipe: Recipe) -> Path:
    """Where a build writes its assets unless told: the cache, never the installed package."""
    return cache_root() / "recipes" / (recipe.assets_name or recipe.name)


def default_work_dir(recipe: Recipe) -> Path:
    return Path(tempfile.gettempdir()) / f"sae-guard-{recipe.name}"


def activation_cache_file(recipe: Recipe, prompts: Sequence[str], cache_dir: str | Path) -> Path:
    """Where `harvest_activations` keeps the activations of `prompts` at the recipe's hookpoint.

    The file holds one fp16 tensor, "activations": the real tokens of `harvest_order(prompts)`, prompt by prompt.
    """
    key = _fingerprint([recipe.model.kind, recipe.model.id, recipe.hookpoint, *prompts])
    return Path(cache_dir) / f"activations-{key}.safetensors"


def harvest_activations(recipe: Recipe, model: Any, tokenizer: Any, prompts: Sequence[str],
                        cache_dir: str | Path | None = None) -> torch.Tensor:
    """(n_tokens, d) fp16 activations of every real token of `prompts` at the hookpoint, each prompt on its own.

    Prompts run one per row, as the guard sees them (not packed into blocks). With `cache_dir`, the tensor is
    kept there (`activation_cache_file`) and read back on the next call.
    """
    cached = activation_cache_file(recipe, prompts, cache_dir) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return load_file(str(cached))["activations"]
    activations = harvest(model, recipe.hookpoint, harvest_order(prompts), tokenizer=tokenizer, mode="sequential",
                          batch_size=HARVEST_BATCH, dtype=torch.float16).to_tensor()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_file({"activations": activations.contiguous()}, str(cached))
    return activations


def token_counts(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """Real tokens of each prompt as the harvest reads it: truncated at the tokenizer's limit."""
    return [len(flags) for flags in special_token_flags(tokenizer, prompts)]


def special_token_flags(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Per prompt, 1 for each special token ([CLS], [SEP]) of its real tokens, as the harvest reads them."""
    encoded = tokenizer(list(prompts), truncation=True, max_length=tokenizer.model_max_length,
                        return_special_tokens_mask=True)
    return encoded["special_tokens_mask"]


class HarvestedCodes:
    """A `Concept.fit` encoder that reads prompts' activations from a harvest instead of running the model again.

    `activations` are the real tokens of `harvest_order(prompts)`, prompt after prompt (`harvest_activations`).
    Concepts read content tokens only, as a guard scores them (`adapters.text`): special tokens are left out.
    """

    def __init__(self, sae: SAE, activations: torch.Tensor, prompts: Sequence[str], tokenizer: Any,
                 chunk: int = 8192) -> None:
        ordered = harvest_order(prompts)
        flags = special_token_flags(tokenizer, ordered)
        counts = torch.tensor([len(f) for f in flags], dtype=torch.long)
        self.content = torch.tensor([flag == 0 for f in flags for flag in f], dtype=torch.bool)
        if int(counts.sum()) != activations.shape[0]:
            raise ValueError(f"{activations.shape[0]} harvested tokens, but the prompts tokenize to "
                             f"{int(counts.sum())}")
        self.sae, self.activations, self.chunk = sae, activations, chunk
        self.counts, self.starts = counts, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.position = {p: i for i, p in enumerate(ordered)}

    def rows(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row numbers of `prompts`' tokens, in order, and the prompt number of each row."""
        ids = torch.tensor([self.position[p] for p in prompts], dtype=torch.long)
        counts = self.counts[ids]
        owners = torch.repeat_interleave(torch.arange(len(ids)), counts)
        first = torch.repeat_interleave(self.starts[ids], counts)
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        return first + within, owners

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[SparseCodes, torch.Tensor, int]:
        rows, owners = self.rows(prompts)
        content = self.content[rows]
        rows, owners = rows[content], owners[content]
        values, indices = [], []
        for part in rows.split(self.chunk):
            codes = self.sae.encode_sparse(self.activations[part].to(self.sae.W_enc.device, torch.float32))
            values.append(codes.values)
            indices.append(codes.indices)
        if not values:
            empty = torch.zeros(0, 1)
            return SparseCodes(empty, empty.long()), owners, len(prompts)
        return SparseCodes(torch.cat(values), torch.cat(indices)), owners.to(values[0].device), len(prompts)


def build(recipe: Recipe | str | Path, data_dir: str | Path | None = None, out: str | Path | None = None,
          work_dir: str | Path | None = None, progress: bool = True, sae: str | Path | None = None) -> dict[str, Any]:
    """Harvest activations, train the SAE, fit the concepts and save them all; return what was measured.

    out: where the assets go (default: `default_out(recipe)` in the cache; the package's own folder,
        `recipe.assets`, only when given).
    work_dir: activation cache and training checkpoints (default: <tmp>/sae-guard-<recipe name>); rerunning an
        interrupted build with the same work_dir harvests nothing again and resumes training where it stopped.
    sae: a folder holding this recipe's trained SAE (its packaged `sae/`, say): the concepts are fitted on it and
        nothing is trained, so concepts are added or refitted without retraining. The SAE must have been trained
        on the prompts the recipe names now (checked by their token count), so no calibrate or test prompt of the
        current splits was among them.
    """
    recipe = load_recipe(recipe)
    out = Path(out) if out is not None else default_out(recipe)
    work = Path(work_dir) if work_dir is not None else default_work_dir(recipe)
    started = time.perf_counter()
    datasets = concept_datasets(recipe, data_dir)
    check_concept_data(datasets)
    prompts = training_prompts(recipe, data_dir)
    if not prompts:
        raise RecipeError(f"recipe {recipe.name!r} has no training prompts in {prompt_sets.prompts_dir(data_dir)}")
    model, tokenizer = load_model(recipe)
    sae_given = sae is not None
    if sae_given:
        sae, train_figures, unique_tokens = _given_sae(recipe, Path(sae), tokenizer, prompts)
    else:
        _log(progress, f"{recipe.name}: harvesting {len(prompts)} prompts at {recipe.hookpoint}")
        activations = harvest_activations(recipe, model, tokenizer, prompts, work)
        unique_tokens = activations.shape[0]
        sae, train_figures = _trained_sae(recipe, activations, work, progress)
        del activations

    fitting = concept_prompts(datasets)
    _log(progress, f"{recipe.name}: harvesting the concepts' {len(fitting)} fit and calibrate prompts")
    codes = HarvestedCodes(sae, harvest_activations(recipe, model, tokenizer, fitting, work), fitting, tokenizer)
    held_out_prompts = list(dict.fromkeys(p for d in datasets.values() for p in (*d.calibrate.target,
                                                                                  *d.calibrate.retain)))
    held_out = evaluate(sae, codes.activations[codes.rows(held_out_prompts)[0]].float())

    _log(progress, f"{recipe.name}: fitting concepts {[c.name for c in recipe.concepts]}")
    concepts = [Concept(spec.name, target=datasets[spec.name].fit.target, retain=datasets[spec.name].fit.retain,
                        calibrate_target=datasets[spec.name].calibrate.target,
                        calibrate_retain=datasets[spec.name].calibrate.retain, strategy=spec.strategy,
                        n_features=spec.n_features, fpr=spec.fpr).fit(codes, sae.d_sae, sae.W_dec.detach())
                for spec in recipe.concepts]
    _check_against_the_live_model(model, tokenizer, recipe, sae, concepts, codes, held_out_prompts)
    empty = [c.name for c in concepts if not c.features.numel()]
    if empty:
        raise RecipeError(f"concepts {empty}: their strategy found no feature telling target from retain prompts "
                          f"at this hookpoint; the assets in {out} are left as they were")

    report = {
        "recipe": recipe.name, "hookpoint": recipe.hookpoint, "training_prompts": len(prompts),
        "unique_tokens": unique_tokens, "tokens_trained": int(train_figures.get("tokens", 0)) or None,
        "epochs": round(train_figures["tokens"] / unique_tokens, 2) if "tokens" in train_figures else None,
        "train": train_figures, "sae_given": sae_given,
        "held_out": {"prompts": len(held_out_prompts), **held_out},
        "concepts": {c.name: {"features": c.features.tolist(), "threshold": c.threshold, **c.calibration}
                     for c in concepts},
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_assets(recipe, sae, concepts, out, report)
    for finished in work.glob(f"*-{_run_key(recipe, unique_tokens)}"):
        shutil.rmtree(finished, ignore_errors=True)  # a rebuild trains afresh (the harvest stays cached)
    _log(progress, f"{recipe.name}: assets written to {out}")
    return report


def _check_against_the_live_model(model: Any, tokenizer: Any, recipe: Recipe, sae: SAE, concepts: Sequence[Concept],
                                  codes: HarvestedCodes, prompts: Sequence[str], n: int = 16) -> None:
    """The guarded model must score a sample of prompts as the harvest did, fp16 storage aside: the harvest keeps
    activations in fp16, so a latent at the edge of a token's top k may fall on the other side of it, and one score
    in eight may differ; a stale cache (other prompts, another model) changes them all."""
    sample = list(prompts[:: max(1, len(prompts) // n)][:n])
    with guard(model, sae=sae, concepts=concepts, hookpoint=recipe.hookpoint, tokenizer=tokenizer) as live:
        verdicts = live.classify(sample)
    for concept in concepts:
        harvested = concept.scores(codes, sample, sae.d_sae, sae.W_dec.detach())
        seen = torch.tensor([v.scores[concept.name] for v in verdicts])
        tolerance = 0.02 * max(abs(concept.threshold), 1e-6)
        differ = ~torch.isclose(seen, harvested, rtol=0.02, atol=tolerance)
        if int(differ.sum()) > len(sample) // 8:
            raise RuntimeError(f"concept {concept.name!r}: the live model scores {seen.tolist()}, the harvest "
                               f"{harvested.tolist()}; the activation cache in the work folder is stale")


def check_concept_data(datasets: Mapping[str, prompt_sets.ConceptData]) -> None:
    """Every concept needs target prompts to learn from and target and retain prompts to calibrate on."""
    for name, data in datasets.items():
        missing = [f"{split} {side}" for split, side in (("fit", "target"), ("calibrate", "target"),
                                                         ("calibrate", "retain"))
                   if not getattr(data.split(split), side)]
        if missing:
            raise RecipeError(f"concept {name!r} has no {' / '.join(missing)} prompts: give it prompts that show "
                              f"the concept and prompts that must pass")


def _run_key(recipe: Recipe, n_tokens: int) -> str:
    return _fingerprint([json.dumps(dataclasses.asdict(recipe.sae), sort_keys=True, default=str), recipe.model.kind,
                         recipe.model.id, recipe.hookpoint, n_tokens])


def _given_sae(recipe: Recipe, folder: Path, tokenizer: Any, prompts: Sequence[str]) -> tuple[SAE, dict, int]:
    """A trained SAE of this recipe, its training figures (from the training.json beside it, if any) and the
    number of unique tokens it was trained on, after checking it belongs to the recipe as it reads now."""
    sae = SAE.load(folder)
    meta = sae.cfg.metadata
    if meta.get("hookpoint") != recipe.hookpoint or meta.get("model") != dataclasses.asdict(recipe.model):
        raise RecipeError(f"the SAE in {folder} was trained at {meta.get('hookpoint')!r} of {meta.get('model')}, "
                          f"the recipe names {recipe.hookpoint!r} of {dataclasses.asdict(recipe.model)}")
    unique_tokens = sum(token_counts(tokenizer, prompts))
    if meta.get("unique_tokens") != unique_tokens:
        raise RecipeError(f"the SAE in {folder} was trained on {meta.get('unique_tokens')} unique tokens, the "
                          f"recipe's training prompts hold {unique_tokens}: the prompt sets or splits changed "
                          f"since, so train it again")
    report = folder.parent / TRAINING_REPORT
    figures = json.loads(report.read_text()).get("train", {}) if report.is_file() else {}
    return sae, figures, unique_tokens


def _trained_sae(recipe: Recipe, activations: torch.Tensor, work: Path, progress: bool) -> tuple[SAE, dict]:
    """Train the recipe's SAE (resuming from work/checkpoint-KEY), rounded to fp16 precision; kept in
    work/trained-KEY until the build finishes, so a build that fails after training does not train again."""
    spec, key = recipe.sae, _run_key(recipe, activations.shape[0])
    trained = work / f"trained-{key}"
    if (trained / "figures.json").is_file():
        return SAE.load(trained / "sae"), json.loads((trained / "figures.json").read_text())
    torch.manual_seed(spec.seed)
    sae = SAE.create(spec.architecture, d_in=activations.shape[1], d_sae=spec.d_sae, **dict(spec.options))
    _log(progress, f"{recipe.name}: training {spec.architecture} d_sae={spec.d_sae} on {activations.shape[0]} "
                   f"unique tokens for {spec.tokens} tokens")
    sae, figures = train(sae, activations, tokens=spec.tokens, batch_size=spec.batch_size, lr=spec.lr,
                         seed=spec.seed, checkpoint_dir=work / f"checkpoint-{key}",
                         checkpoint_every=max(spec.tokens // 10, spec.batch_size), progress=progress)
    _round_to_fp16(sae)
    sae.cfg.metadata.update({"hookpoint": recipe.hookpoint, "model": dataclasses.asdict(recipe.model),
                             "recipe": recipe.name, "unique_tokens": int(activations.shape[0])})
    figures = {k: v for k, v in figures.items() if isinstance(v, (int, float))}
    sae.save(trained / "sae")
    (trained / "figures.json").write_text(json.dumps(figures, indent=2))
    return sae, figures


def load_guard(recipe: Recipe | str | Path, assets: str | Path | None = None,
               device: str | torch.device | None = None, concepts: Sequence[str] | None = None) -> Guard:
    """The recipe's model with its trained SAE and fitted concepts attached, ready to `classify` and to gate.

    concepts: the names to attach (default: the recipe's [guard] concepts, else all); the edit is the [guard] one.
    """
    recipe = load_recipe(recipe)
    folder = Path(assets) if assets is not None else recipe.assets
    if not (folder / "sae").is_dir() or not (folder / "concepts").is_dir():
        raise FileNotFoundError(f"recipe {recipe.name!r} has no trained assets in {folder}; build them with "
                                f"`sae-guard train {recipe.name} --data DIR`")
    model, tokenizer = load_model(recipe, device)
    sae = SAE.load(folder / "sae", device=device)
    return guard(model, sae=sae, concepts=attached_concepts(recipe, folder, concepts), hookpoint=recipe.hookpoint,
                 tokenizer=tokenizer, edit=recipe.guard.edit)
