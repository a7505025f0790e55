"""Recipes: one TOML file names a model, a hookpoint, an SAE, its training prompts and its concepts.

    recipe = load_recipe("minilm-prompts")     # pipelines/minilm-prompts.toml in a checkout, else the packaged copy
    build(recipe, data_dir="../shared/data/prompts")   # harvest -> train the SAE -> fit concepts -> save assets
    g = load_guard(recipe)                     # the model with the trained SAE and fitted concepts attached
    g.classify(["a photo of a cat"])[0].flagged

A recipe's trained assets live inside the package, in `sae_guard/assets/<assets>/` (default: the recipe's name):
`sae/` (cfg.json + sae.safetensors, stored fp16 to stay small; loading casts to fp32), `concepts/`
(concepts.json + concepts.safetensors), `recipe.toml` (the recipe they were built from, so an installed package
finds it by name) and `training.json` (what `build` measured). The SAE is rounded to fp16 before the concepts are
fitted, so the shipped thresholds were calibrated on exactly the weights that load back.

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

import copy
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import prompts as prompt_sets
from .adapters.guard import Guard, guard
from .concepts import STRATEGIES, Concept, load_concepts, save_concepts
from .hooks.gate import EDIT_MODES, Edit
from .sae.base import SAE
from .sae.codes import SparseCodes
from .sae.metrics import evaluate
from .sae.registry import architectures, get_architecture
from .train import harvest, train

PACKAGE_ROOT = Path(__file__).resolve().parent
ASSETS_ROOT = PACKAGE_ROOT / "assets"
CHECKOUT_PIPELINES = PACKAGE_ROOT.parent / "pipelines"  # present in a source checkout only
RECIPE_COPY = "recipe.toml"
TRAINING_REPORT = "training.json"
HARVEST_BATCH = 64


class RecipeError(ValueError):
    """A recipe that cannot be found or does not make sense, with the reason."""


# ---------------------------------------------------------------------------------------------------- models
def _load_minilm(spec: "ModelSpec", device: str | torch.device | None) -> tuple[torch.nn.Module, Any]:
    from .adapters.minilm import load_minilm

    return load_minilm(device)


def _load_shapes_text_encoder(spec: "ModelSpec", device: str | torch.device | None) -> tuple[torch.nn.Module, Any]:
    """The ShapesWorld pipeline's text encoder (MiniLM, attention-masked, 32 tokens): its SAE's model.
    Generation loads the whole pipeline (`sae_guard.erasure.loading`)."""
    from .shapes.t2i import text_components

    model, tokenizer = text_components()
    return (model.to(device) if device is not None else model), tokenizer


# kind -> loader(spec, device) -> (model, tokenizer). A new family (a diffusers pipeline named by hub id) adds one.
MODEL_KINDS: dict[str, Callable[["ModelSpec", str | torch.device | None], tuple[Any, Any]]] = {
    "minilm": _load_minilm,
    "shapes-t2i": _load_shapes_text_encoder,
}


# ---------------------------------------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class ModelSpec:
    kind: str
    id: str | None = None  # hub id or local path, for kinds that load named weights


@dataclass(frozen=True)
class SAESpec:
    architecture: str = "topk"
    d_sae: int = 4096
    tokens: int = 1_000_000
    batch_size: int = 4096
    lr: float | None = None
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)  # the variant's own config fields (k, ...)


@dataclass(frozen=True)
class DataSpec:
    sets: tuple[str, ...] = ()
    concept_fit: bool = True
    exclude_evaluation: bool = True
    split_seed: int = prompt_sets.SEED


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    dataset: str
    strategy: str = "coverage"
    n_features: int = 32
    fpr: float = 0.01


@dataclass(frozen=True)
class UNetStageSpec:
    """[guard.unet] of a text-to-image recipe: a second judge inside the UNet, for the first [guard] concept, on
    the prompts the text SAE cannot fully read (sae_guard.adapters.unet_stage). `prompts` names a function
    `f(concept, n)` giving the captions its SAE is trained on and the fit / calibrate captions of its concept."""

    block: str
    prompts: str
    detect_step: int = 2
    unread_error: float = 0.5
    fpr: float = 0.3
    n_features: int = 16
    strength: float = 0.0
    captions: int = 320  # captions drawn for the SAE, and for each concept split
    sae_tokens: int = 3_000_000  # block positions its SAE trains on (epochs over the harvest)

    @property
    def edit(self) -> Edit:
        return Edit("deactivate", self.strength)


@dataclass(frozen=True)
class GuardSpec:
    concepts: tuple[str, ...] = ()  # empty: every concept of the recipe
    mode: str = "deactivate"
    strength: float = 0.0
    unet: UNetStageSpec | None = None

    @property
    def edit(self) -> Edit:
        return Edit(self.mode, self.strength)


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    hookpoint: str
    sae: SAESpec
    data: DataSpec
    concepts: tuple[ConceptSpec, ...]
    guard: GuardSpec = GuardSpec()
    description: str = ""
    assets_name: str = ""
    source: Path | None = None  # the file it was read from
    text: str = ""  # that file's text, copied beside the assets

    @property
    def assets(self) -> Path:
        """The package folder holding this recipe's trained SAE and concepts."""
        return ASSETS_ROOT / (self.assets_name or self.name)


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file by path, or by bare name: pipelines/<name>.toml in a checkout, else the packaged copy."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    looks_like_path = path.suffix == ".toml" or len(path.parts) > 1
    if looks_like_path:
        raise RecipeError(f"no recipe file {path}")
    candidates = [CHECKOUT_PIPELINES / f"{path.name}.toml", ASSETS_ROOT / path.name / RECIPE_COPY]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(available_recipes()) or "none"
    raise RecipeError(f"no recipe named {str(name_or_path)!r} (looked for {', '.join(map(str, candidates))}); "
                      f"known recipes: {known}")


def available_recipes() -> list[str]:
    """Names a bare-name lookup finds: the checkout's pipelines and the packaged copies."""
    names = {p.stem for p in CHECKOUT_PIPELINES.glob("*.toml")} if CHECKOUT_PIPELINES.is_dir() else set()
    if ASSETS_ROOT.is_dir():
        names |= {p.parent.name for p in ASSETS_ROOT.glob(f"*/{RECIPE_COPY}")}
    return sorted(names)


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """Read and check a recipe (see the module docstring for the format)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    path = find_recipe(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path} is not valid TOML: {error}") from None
    try:
        return parse_recipe(raw, source=path, text=text)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


def parse_recipe(raw: Mapping[str, Any], source: Path | None = None, text: str = "") -> Recipe:
    """A checked Recipe from a parsed TOML mapping."""
    _known_keys(raw, "the recipe", {"name", "description", "hookpoint", "assets", "model", "sae", "data", "concepts",
                                    "guard", "t2i"})  # [t2i]: drawing settings of text-to-image recipes (erasure.loading)
    name = _string(raw, "name", "the recipe")
    hookpoint = _string(raw, "hookpoint", "the recipe")
    assets_name = _string(raw, "assets", "the recipe", default=name)
    if Path(assets_name).name != assets_name or assets_name.startswith("."):
        raise RecipeError(f"assets must be a plain folder name inside sae_guard/assets, got {assets_name!r}")
    concepts = _concepts(raw.get("concepts"))
    return Recipe(
        name=name, model=_model(_table(raw, "model")), hookpoint=hookpoint, sae=_sae(_table(raw, "sae")),
        data=_data(_table(raw, "data")), concepts=concepts, guard=_guard(raw.get("guard", {}), concepts),
        description=_string(raw, "description", "the recipe", default=""), assets_name=assets_name,
        source=source, text=text,
    )


def _model(table: Mapping[str, Any]) -> ModelSpec:
    _known_keys(table, "[model]", {"kind", "id"})
    kind = _string(table, "kind", "[model]")
    if kind not in MODEL_KINDS:
        raise RecipeError(f"[model] kind {kind!r} is not supported; known kinds: {', '.join(MODEL_KINDS)}")
    return ModelSpec(kind, _string(table, "id", "[model]", default=None))


def _sae(table: Mapping[str, Any]) -> SAESpec:
    defaults = SAESpec()
    architecture = _string(table, "architecture", "[sae]", default=defaults.architecture)
    if architecture not in architectures():
        raise RecipeError(f"[sae] architecture {architecture!r} is not registered; known: {', '.join(architectures())}")
    common = {"architecture", "d_sae", "tokens", "batch_size", "lr", "seed"}
    variant_fields = {f.name for f in dataclasses.fields(get_architecture(architecture).config_class)}
    variant_fields -= {"architecture", "d_in", "d_sae", "metadata"}
    _known_keys(table, "[sae]", common | variant_fields)
    lr = table.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < 1):
        raise RecipeError(f"[sae] lr must be a number in (0, 1), got {lr!r}")
    return SAESpec(
        architecture=architecture,
        d_sae=_positive_int(table, "d_sae", "[sae]", defaults.d_sae),
        tokens=_positive_int(table, "tokens", "[sae]", defaults.tokens),
        batch_size=_positive_int(table, "batch_size", "[sae]", defaults.batch_size),
        lr=float(lr) if lr is not None else None,
        seed=_int(table, "seed", "[sae]", defaults.seed),
        options={k: v for k, v in table.items() if k in variant_fields},
    )


def _data(table: Mapping[str, Any]) -> DataSpec:
    _known_keys(table, "[data]", {"sets", "concept_fit", "exclude_evaluation", "split_seed"})
    sets = table.get("sets")
    if not isinstance(sets, list) or not sets or not all(isinstance(s, str) for s in sets):
        raise RecipeError("[data] sets must be a non-empty list of prompt-set names (functions of sae_guard.prompts)")
    for name in sets:
        prompt_function(name, "[data] sets")
    flags = {}
    for key in ("concept_fit", "exclude_evaluation"):
        value = table.get(key, getattr(DataSpec, key))
        if not isinstance(value, bool):
            raise RecipeError(f"[data] {key} must be true or false, got {value!r}")
        flags[key] = value
    return DataSpec(tuple(sets), split_seed=_int(table, "split_seed", "[data]", prompt_sets.SEED), **flags)


def _concepts(entries: Any) -> tuple[ConceptSpec, ...]:
    if not isinstance(entries, list) or not entries:
        raise RecipeError("a recipe needs at least one [[concepts]] entry")
    specs = []
    for number, entry in enumerate(entries, 1):
        where = f"[[concepts]] #{number}"
        if not isinstance(entry, dict):
            raise RecipeError(f"{where} must be a table")
        _known_keys(entry, where, {f.name for f in dataclasses.fields(ConceptSpec)})
        name = _string(entry, "name", where)
        dataset = _string(entry, "dataset", where)
        prompt_function(dataset, f"{where} dataset")
        strategy = _string(entry, "strategy", where, default="coverage")
        if strategy not in STRATEGIES:
            raise RecipeError(f"{where} strategy {strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
        fpr = entry.get("fpr", 0.01)
        if not isinstance(fpr, (int, float)) or isinstance(fpr, bool) or not 0 < fpr < 1:
            raise RecipeError(f"{where} fpr must be in (0, 1), got {fpr!r}")
        specs.append(ConceptSpec(name, dataset, strategy, _positive_int(entry, "n_features", where, 32), float(fpr)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RecipeError(f"concept names must be unique, got {names}")
    return tuple(specs)


def _guard(table: Any, concepts: Sequence[ConceptSpec]) -> GuardSpec:
    if not isinstance(table, dict):
        raise RecipeError("[guard] must be a table")
    _known_keys(table, "[guard]", {"concepts", "mode", "strength", "unet"})
    names = table.get("concepts", [c.name for c in concepts])
    known = [c.name for c in concepts]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RecipeError("[guard] concepts must be a non-empty list of concept names")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RecipeError(f"[guard] concepts {unknown} are not concepts of the recipe ({', '.join(known)})")
    mode = _string(table, "mode", "[guard]", default="deactivate")
    strength = table.get("strength", 0.0)
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
        raise RecipeError(f"[guard] strength must be a number, got {strength!r}")
    try:
        Edit(mode, float(strength))
    except ValueError as error:
        raise RecipeError(f"[guard] {error} (modes: {', '.join(EDIT_MODES)})") from None
    unet = _unet_stage(table["unet"]) if "unet" in table else None
    return GuardSpec(tuple(dict.fromkeys(names)), mode, float(strength), unet)


def _unet_stage(table: Any) -> UNetStageSpec:
    where = "[guard.unet]"
    if not isinstance(table, dict):
        raise RecipeError(f"{where} must be a table")
    _known_keys(table, where, {f.name for f in fields(UNetStageSpec)})
    numbers = {}
    for key, low, high in (("unread_error", 0.0, math.inf), ("fpr", 0.0, 1.0), ("strength", -math.inf, 0.0)):
        value = table.get(key, getattr(UNetStageSpec, key))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise RecipeError(f"{where} {key} must be a number in [{low}, {high}], got {value!r}")
        numbers[key] = float(value)
    spec = UNetStageSpec(block=_string(table, "block", where), prompts=_string(table, "prompts", where),
                         detect_step=_int(table, "detect_step", where, UNetStageSpec.detect_step),
                         n_features=_positive_int(table, "n_features", where, UNetStageSpec.n_features),
                         captions=_positive_int(table, "captions", where, UNetStageSpec.captions),
                         sae_tokens=_positive_int(table, "sae_tokens", where, UNetStageSpec.sae_tokens), **numbers)
    if spec.detect_step < 0:
        raise RecipeError(f"{where} detect_step must be >= 0, got {spec.detect_step}")
    prompt_function(spec.prompts, where)
    return spec


def prompt_function(name: str, where: str) -> Callable[..., Any]:
    """A bare name in sae_guard.prompts, or "package.module:function" anywhere importable."""
    module_name, _, function_name = name.rpartition(":") if ":" in name else (prompt_sets.__name__, "", name)
    try:
        module = importlib.import_module(module_name) if module_name else None
    except ImportError as error:
        raise RecipeError(f"{where}: cannot import {module_name!r} for {name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if function_name.startswith("_") or not inspect.isfunction(function):
        raise RecipeError(f"{where}: {name!r} is not a function of {module_name or 'a module'}")
    return function


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    table = raw.get(key)
    if not isinstance(table, dict):
        raise RecipeError(f"the recipe needs a [{key}] table")
    return table


def _known_keys(table: Mapping[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")


_MISSING = object()


def _string(table: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> Any:
    if key not in table:
        if default is _MISSING:
            raise RecipeError(f"{where} needs {key!r}")
        return default
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where} {key} must be a non-empty string, got {value!r}")
    return value


def _int(table: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecipeError(f"{where} {key} must be an integer, got {value!r}")
    return value


def _positive_int(table: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = _int(table, key, where, default)
    if value <= 0:
        raise RecipeError(f"{where} {key} must be positive, got {value}")
    return value


# ---------------------------------------------------------------------------------------------------- data
def load_model(recipe: Recipe, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """The recipe's model and tokenizer."""
    return MODEL_KINDS[recipe.model.kind](recipe.model, device)


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
    datasets = concept_datasets(recipe, data_dir).values()
    pool: list[str] = []
    for name in recipe.data.sets:
        prompts = prompt_function(name, "sets")(folder=data_dir)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RecipeError(f"sae_guard.prompts.{name} did not return a list of prompts")
        pool += prompts
    if recipe.data.concept_fit:
        pool += [p for d in datasets for p in (*d.fit.target, *d.fit.retain)]
    removed = set().union(*(d.held_out() for d in datasets))
    if recipe.data.exclude_evaluation:
        removed |= set(prompt_sets.evaluation_prompts(data_dir, seed=recipe.data.split_seed))
    return [p for p in prompt_sets.clean(pool) if p not in removed]


def concept_prompts(datasets: Mapping[str, prompt_sets.ConceptData]) -> list[str]:
    """Every fit and calibrate prompt of every concept, once: what fitting the concepts reads."""
    return list(dict.fromkeys(p for d in datasets.values() for s in (d.fit, d.calibrate) for p in (*s.target,
                                                                                                   *s.retain)))


def harvest_order(prompts: Sequence[str]) -> list[str]:
    """The order prompts are harvested in (by length: less padding; training shuffles tokens anyway)."""
    return sorted(prompts, key=len)


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
    """Real tokens of each prompt as the harvest and the guard read it: truncated at the tokenizer's limit."""
    encoded = tokenizer(list(prompts), truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return [len(ids) for ids in encoded]


class HarvestedCodes:
    """A `Concept.fit` encoder that reads prompts' activations from a harvest instead of running the model again.

    `activations` are the real tokens of `harvest_order(prompts)`, prompt after prompt (`harvest_activations`).
    """

    def __init__(self, sae: SAE, activations: torch.Tensor, prompts: Sequence[str], tokenizer: Any,
                 chunk: int = 8192) -> None:
        ordered = harvest_order(prompts)
        counts = torch.tensor(token_counts(tokenizer, ordered), dtype=torch.long)
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
        values, indices = [], []
        for part in rows.split(self.chunk):
            codes = self.sae.encode_sparse(self.activations[part].to(self.sae.W_enc.device, torch.float32))
            values.append(codes.values)
            indices.append(codes.indices)
        if not values:
            empty = torch.zeros(0, 1)
            return SparseCodes(empty, empty.long()), owners, len(prompts)
        return SparseCodes(torch.cat(values), torch.cat(indices)), owners.to(values[0].device), len(prompts)


# ---------------------------------------------------------------------------------------------------- build
def build(recipe: Recipe | str | Path, data_dir: str | Path | None = None, out: str | Path | None = None,
          work_dir: str | Path | None = None, progress: bool = True, sae: str | Path | None = None) -> dict[str, Any]:
    """Harvest activations, train the SAE, fit the concepts and save them all; return what was measured.

    out: where the assets go (default: the recipe's folder inside the package).
    work_dir: activation cache and training checkpoints (default: <tmp>/sae-guard-<recipe name>); rerunning an
        interrupted build with the same work_dir harvests nothing again and resumes training where it stopped.
    sae: a folder holding this recipe's trained SAE (its packaged `sae/`, say): the concepts are fitted on it and
        nothing is trained, so concepts are added or refitted without retraining. The SAE must have been trained
        on the prompts the recipe names now (checked by their token count), so no calibrate or test prompt of the
        current splits was among them.
    """
    recipe = load_recipe(recipe)
    out = Path(out) if out is not None else recipe.assets
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


def save_assets(recipe: Recipe, sae: SAE, concepts: Sequence[Concept], out: Path, report: Mapping[str, Any]) -> Path:
    """Write sae/ (fp16), concepts/, recipe.toml and training.json as the folder `out`, replacing it whole.

    Everything is written into a temporary sibling first and renamed into place, so a reader never sees a half-
    written folder and a failure leaves the old one.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-new-", dir=out.parent))
    try:
        copy.deepcopy(sae).cpu().half().save(staging / "sae")
        save_concepts(concepts, staging / "concepts")
        if recipe.text:
            (staging / RECIPE_COPY).write_text(recipe.text, encoding="utf-8")
        (staging / TRAINING_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        make_readable(staging)
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent)) / out.name
        if out.exists():
            out.rename(retired)
        try:
            staging.rename(out)
        except BaseException:
            if retired.exists():
                retired.rename(out)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired.parent, ignore_errors=True)
    return out


def make_readable(folder: Path) -> None:
    """Package data is read by every user: folders 0755, files 0644 (temporary files are created owner-only)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _round_to_fp16(sae: SAE) -> None:
    """Round every weight to fp16 precision in place (kept fp32), as the shipped files will hold it."""
    with torch.no_grad():
        for tensor in [*sae.parameters(), *sae.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().to(tensor.dtype))


def _fingerprint(parts: Sequence[Any]) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- use
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
    fitted = {c.name: c for c in load_concepts(folder / "concepts")}
    expected = [c.name for c in recipe.concepts]
    if sorted(fitted) != sorted(expected):
        raise RecipeError(f"assets in {folder} hold concepts {sorted(fitted)}, the recipe names {expected}; "
                          f"rebuild them")
    names = list(concepts if concepts is not None else recipe.guard.concepts or expected)
    unknown = [n for n in names if n not in fitted]
    if unknown or not names:
        raise RecipeError(f"no concepts {unknown or names} in recipe {recipe.name!r} (it has {', '.join(expected)})")
    return guard(model, sae=sae, concepts=[fitted[n] for n in names], hookpoint=recipe.hookpoint,
                 tokenizer=tokenizer, edit=recipe.guard.edit)
