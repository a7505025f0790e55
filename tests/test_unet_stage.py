"""The UNet stage: a second judge inside the UNet for the prompts the text gate could not read.

On the tiny ShapesWorld pipeline of test_erasure (real MiniLM, tiny untrained UNet) with its text SAE and `red`
concept; the stage's own SAE is tiny, and its concept's threshold is set by hand where a test needs the stage to
flag every prompt it judges, or none.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sae_guard
from sae_guard import cli
from sae_guard.adapters.unet_stage import UNetStage
from sae_guard.concepts import Concept
from sae_guard.concepts.policy import ConceptPolicy
from sae_guard.erasure import loading
from sae_guard.erasure.methods import Gate, T2ISettings, Unguarded
from sae_guard.erasure.unet_stage_build import build_into_assets
from sae_guard.hooks.gate import Edit, GateCall
from sae_guard.recipes import RecipeError, parse_recipe
from test_erasure import HOOKPOINT, RECIPE, tiny_recipe_pipeline, tiny_world  # noqa: F401 (fixtures)

BLOCK = "up_blocks.0.attentions.1"
SETTINGS = T2ISettings(image_size=32, steps=3, guidance_scale=4.0, batch_size=4)
PROMPTS = ["a red circle", "a vermilion circle", "a blue square", "a green triangle on the left"]
SEEDS = [3, 4, 5, 6]

pytestmark = pytest.mark.usefixtures("one_thread")


def stage_for(threshold: float, unread_error: float, detect_step: int = 1) -> UNetStage:
    """A stage on the tiny UNet whose concept flags every image it judges (threshold -1e30) or none (+1e30)."""
    torch.manual_seed(1)
    sae = sae_guard.SAE.create("topk", d_in=32, d_sae=64, k=4)
    concept = Concept("red", strategy="probe", n_features=8)
    concept.features, concept.weights, concept.threshold = torch.arange(8), torch.ones(8), threshold
    return UNetStage(BLOCK, sae, concept, detect_step, unread_error, Edit("deactivate", 0.0))


def text_errors(tiny_world) -> list[float]:
    pipe, sae, concept, _, _ = tiny_world
    g = sae_guard.guard(pipe, sae=sae, concepts=[concept], hookpoint=f"text_encoder.{HOOKPOINT}")
    try:
        return [v.error for v in g.classify(PROMPTS)]
    finally:
        g.detach()


def test_a_verdict_records_how_much_of_the_prompt_the_sae_could_not_read(tiny_world):
    pipe, sae, concept, _, _ = tiny_world
    g = sae_guard.guard(pipe, sae=sae, concepts=[concept], hookpoint=f"text_encoder.{HOOKPOINT}")
    try:
        verdict = g.classify(["a vermilion circle"])[0]
    finally:
        g.detach()
    batch = pipe.tokenizer(["a vermilion circle"], return_tensors="pt")
    point = sae_guard.hooks.find_hookpoint(pipe.text_encoder, HOOKPOINT)
    x = sae_guard.hooks.capture.capture_hidden(point, **batch)[0].float()
    with torch.no_grad():
        relative = (x - sae(x)).norm(dim=-1) / x.norm(dim=-1)
    assert verdict.error == pytest.approx(float(relative.max()), rel=1e-4)
    assert 0 < verdict.error


def test_policy_error_is_per_input_and_absent_without_states():
    torch.manual_seed(0)
    sae = sae_guard.SAE.create("topk", d_in=8, d_sae=16, k=2)
    concept = Concept("c", strategy="probe")
    concept.features, concept.weights, concept.threshold = torch.arange(4), torch.ones(4), 0.0
    policy = ConceptPolicy(sae, [concept], "deactivate")
    x = torch.randn(5, 8)
    with torch.no_grad():
        codes, index = sae.encode_sparse(x), torch.tensor([0, 0, 1, 1, 1])
        policy(GateCall(codes, index, torch.tensor([0, 1, 0, 1, 2]), 2, False, x))
        relative = (x - sae(x)).norm(dim=-1) / x.norm(dim=-1)
    assert [v.error for v in policy.last_verdicts] == pytest.approx([float(relative[:2].max()),
                                                                     float(relative[2:].max())], rel=1e-5)
    policy(GateCall(codes, index, torch.tensor([0, 1, 0, 1, 2]), 2, False))
    assert [v.error for v in policy.last_verdicts] == [None, None]


def test_only_unflagged_prompts_the_text_gate_could_not_read_are_judged_and_edited(tiny_world):
    pipe, sae, concept, _, _ = tiny_world
    point = f"text_encoder.{HOOKPOINT}"
    errors = text_errors(tiny_world)
    unread = sorted(errors[1:])
    cut = (unread[-1] + unread[-2]) / 2  # the least readable unflagged prompt is judged, the others are not
    judged = errors.index(unread[-1])
    before = Unguarded().generate(pipe, PROMPTS, SEEDS, SETTINGS)
    text_only = Gate(sae, [concept], point).generate(pipe, PROMPTS, SEEDS, SETTINGS)
    flag_all = Gate(sae, [concept], point, unet_stage=stage_for(-1e30, cut)).generate(
        pipe, PROMPTS, SEEDS, SETTINGS)
    assert text_only.flagged[0] and not any(text_only.flagged[1:])
    for i in range(len(PROMPTS)):
        same = np.array_equal(flag_all.images[i], text_only.images[i])
        assert same == (i != judged), f"prompt {i} ({PROMPTS[i]!r}): judged {i == judged}, image same {same}"
    assert flag_all.flagged == [True] + [i == judged for i in range(1, len(PROMPTS))]
    assert flag_all.verdicts[judged].action == "deactivate" and flag_all.verdicts[judged].concepts == ["red"]

    flag_none = Gate(sae, [concept], point, unet_stage=stage_for(1e30, 0.0)).generate(
        pipe, PROMPTS, SEEDS, SETTINGS)
    assert flag_none.flagged == text_only.flagged
    assert all(np.array_equal(a, b) for a, b in zip(flag_none.images, text_only.images))
    assert pipe.unet._forward_pre_hooks == {} and pipe.unet.get_submodule(BLOCK)._forward_hooks == {}
    after = Unguarded().generate(pipe, PROMPTS, SEEDS, SETTINGS)
    assert np.array_equal(after.images, before.images)  # detached: the pipeline is as before


def test_the_edit_starts_at_the_detect_step(tiny_world):
    pipe, sae, concept, _, _ = tiny_world
    point = f"text_encoder.{HOOKPOINT}"
    seen: list[torch.Tensor] = []
    handle = pipe.unet.get_submodule(BLOCK).register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
    try:
        runs = [Gate(sae, [concept], point, unet_stage=stage_for(-1e30, 0.0, step)).generate(
            pipe, PROMPTS[1:2], SEEDS[1:2], SETTINGS) for step in (0, 2)]
        Unguarded().generate(pipe, PROMPTS[1:2], SEEDS[1:2], SETTINGS)
    finally:
        handle.remove()
    steps = SETTINGS.steps
    from_0, from_2, reference = seen[:steps], seen[steps:2 * steps], seen[2 * steps:]
    assert not torch.equal(from_0[0][1], reference[0][1])  # the prompt half, edited from step 0
    assert torch.equal(from_0[0][0], reference[0][0])  # the negative half never
    assert all(torch.equal(a, b) for a, b in zip(from_2[:2], reference[:2]))  # steps 0-1 untouched
    assert not torch.equal(from_2[2][1], reference[2][1])
    assert runs[0].flagged == runs[1].flagged == [True]


def test_a_stage_saves_and_loads_and_refuses_an_unfitted_concept(tmp_path):
    stage = stage_for(0.25, 0.5, detect_step=2)
    loaded = UNetStage.load(stage.save(tmp_path / "unet"))
    assert (loaded.block, loaded.detect_step, loaded.unread_error) == (BLOCK, 2, 0.5)
    assert loaded.concept.threshold == 0.25 and torch.equal(loaded.concept.features, stage.concept.features)
    assert torch.equal(loaded.sae.W_dec, stage.sae.W_dec)
    with pytest.raises(ValueError, match="not fitted"):
        UNetStage(BLOCK, stage.sae, Concept("red"))
    with pytest.raises(FileNotFoundError, match="stage.json"):
        UNetStage.load(tmp_path)


UNET_TABLE = """
[guard.unet]
block = "{block}"
prompts = "sae_guard.shapes.concepts:unet_stage_prompts"
captions = 10
sae_tokens = 2000
detect_step = 1
n_features = 4
fpr = 0.5
"""


def test_recipe_unet_table_is_checked():
    import tomllib

    good = tomllib.loads(RECIPE.format(hookpoint=HOOKPOINT) + UNET_TABLE.format(block=BLOCK))
    assert parse_recipe(good).guard.unet.captions == 10
    for key, value, message in (("fpr", 1.5, "fpr"), ("detect_step", -1, "detect_step"), ("colour", 1, "unknown"),
                                ("prompts", "sae_guard.shapes.concepts:nothing", "not a function")):
        bad = json.loads(json.dumps(good))
        bad["guard"]["unet"][key] = value
        with pytest.raises(RecipeError, match=message):
            parse_recipe(bad)


def test_build_into_assets_then_the_recipe_loads_its_stage(tiny_recipe_pipeline, tmp_path, capsys):  # noqa: F811
    pipe, _, _, assets, recipe_file = tiny_recipe_pipeline
    recipe = tmp_path / "staged.toml"
    recipe.write_text(recipe_file.read_text().replace('name = "tiny-shapes"', 'name = "staged"')
                      + UNET_TABLE.format(block=BLOCK))
    with pytest.raises(FileNotFoundError, match="no unet/"):
        loading.load_t2i_recipe(recipe, assets)
    report = build_into_assets(recipe, assets, progress=False)
    assert report["channels"] == 32 and report["concept"]["name"] == "red"
    assert report["concept"]["n_calibrate_target"] == 5 and report["concept"]["n_calibrate_retain"] == 10
    t2i = loading.load_t2i_recipe(recipe, assets)
    assert t2i.unet_stage.block == BLOCK and t2i.unet_stage.concept.fitted and t2i.unet_stage.unread_error == 0.5
    assert t2i.unet_stage_for(t2i.concepts_named(["red"])) is t2i.unet_stage
    recipe.write_text(recipe.read_text() + "unread_error = 0.7\nstrength = -2.0\n")  # runtime settings: no rebuild
    stage = loading.load_t2i_recipe(recipe, assets).unet_stage
    assert stage.unread_error == 0.7 and stage.edit == Edit("deactivate", -2.0)
    recipe.write_text(recipe.read_text().replace("detect_step = 1", "detect_step = 0"))
    with pytest.raises(RecipeError, match="rebuild"):
        loading.load_t2i_recipe(recipe, assets)
    recipe.write_text(recipe.read_text().replace("detect_step = 0", "detect_step = 1"))
    out, prompts = tmp_path / "images", tmp_path / "prompts.txt"
    prompts.write_text("a crimson circle\n")
    assert cli.main(["generate", str(recipe), "--prompts", str(prompts), "--out", str(out), "--seed", "0", "--assets",
                     str(assets), "--steps", "1"]) == 2  # one step never reaches the detect step
    assert "never reach" in capsys.readouterr().err
