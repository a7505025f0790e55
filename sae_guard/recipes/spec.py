"""The recipe format: a TOML file read into checked, frozen specs (see the package docstring for the keys).

Parsing knows every kind of recipe's common tables ([model], [sae], [data], [[concepts]], [guard]); a recipe kind
(`recipes.KINDS`) may name more top-level tables of its own, kept unparsed in `Recipe.tables` for it to read.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import prompts as prompt_sets
from ..concepts import STRATEGIES
from ..hooks.gate import EDIT_MODES, Edit
from ..sae.registry import architectures, get_architecture
from .errors import RecipeError
from .models import MODEL_KINDS

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
ASSETS_ROOT = PACKAGE_ROOT / "assets"
CHECKOUT_PIPELINES = PACKAGE_ROOT.parent / "pipelines"  # present in a source checkout only
RECIPE_COPY = "recipe.toml"

COMMON_TABLES = {"kind", "name", "description", "hookpoint", "assets", "model", "sae", "data", "concepts", "guard"}
# recipe kind -> the top-level tables of its own (kept in Recipe.tables); the module building each is in KINDS
RECIPE_KINDS: dict[str, set[str]] = {
    "text": {"t2i"},  # [t2i]: drawing settings of text-to-image recipes (erasure.loading)
    "recsys": {"sasrec"},  # [sasrec]: the recommender's size and training (recipes.recsys)
    "vision": {"images"},  # [images]: the SAE's and the concepts' images, the token scope (recipes.vision)
}


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
    kind: str = "text"  # a key of recipes.KINDS: which module builds and loads it
    tables: Mapping[str, Any] = field(default_factory=dict)  # the kind's own top-level tables, unparsed

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
    kind = _string(raw, "kind", "the recipe", default="text")
    if kind not in RECIPE_KINDS:
        raise RecipeError(f"recipe kind {kind!r} is unknown; known kinds: {', '.join(RECIPE_KINDS)}")
    own = RECIPE_KINDS[kind]
    _known_keys(raw, "the recipe", COMMON_TABLES | own)
    name = _string(raw, "name", "the recipe")
    hookpoint = _string(raw, "hookpoint", "the recipe")
    assets_name = _string(raw, "assets", "the recipe", default=name)
    if Path(assets_name).name != assets_name or assets_name.startswith("."):
        raise RecipeError(f"assets must be a plain folder name inside sae_guard/assets, got {assets_name!r}")
    text_kind = kind == "text"  # other kinds may leave [data] and [[concepts]] out and read their own tables
    concepts = _concepts(raw.get("concepts")) if text_kind or "concepts" in raw else ()
    data = _data(_table(raw, "data")) if text_kind or "data" in raw else DataSpec()
    return Recipe(
        name=name, model=_model(_table(raw, "model")), hookpoint=hookpoint, sae=_sae(_table(raw, "sae")),
        data=data, concepts=concepts, guard=_guard(raw.get("guard", {}), concepts) if concepts else GuardSpec(),
        description=_string(raw, "description", "the recipe", default=""), assets_name=assets_name,
        source=source, text=text, kind=kind, tables={key: raw[key] for key in own if key in raw},
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
