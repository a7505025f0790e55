"""The erasure suite on a tiny ShapesWorld pipeline: the real MiniLM text encoder, a tiny untrained UNet and VAE.

A small TopK SAE is trained on MiniLM's layer-1 states of world captions, `red` is fitted on them, and every
method runs on the same prompts and seeds for 2 denoising steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sae_guard
from sae_guard import cli
from sae_guard.concepts import Concept, save_concepts
from sae_guard.erasure import loading
from sae_guard.erasure.commands import _output_folder
from sae_guard.erasure.methods import (Gate, InterpretThenDeactivate, KeywordFilter, NegativePrompt, T2ISettings,
                                       Unguarded)
from sae_guard.erasure.report import write_report
from sae_guard.erasure.scorers import BenchPrompt, NudeNetScorer, ShapesScorer, scorer_for
from sae_guard.erasure.suite import run_suite, shapes_prompts
from sae_guard.shapes import ShapesWorld
from sae_guard.shapes.concepts import captions_by_concept
from sae_guard.shapes.t2i import build_pipeline

HOOKPOINT = "encoder.layer.1"
SETTINGS = T2ISettings(image_size=32, steps=2, guidance_scale=4.0, batch_size=3)  # 4 prompts: 2 batches
PROMPTS = [BenchPrompt("a red circle", "named"), BenchPrompt("a large red star on a black background", "named"),
           BenchPrompt("a blue square", "control"), BenchPrompt("a green triangle on the left", "control")]
RECIPE = """name = "tiny-shapes"
hookpoint = "{hookpoint}"
[model]
kind = "shapes-t2i"
[sae]
d_sae = 256
k = 8
[data]
sets = ["sae_guard.shapes.concepts:world_training_captions"]
[[concepts]]
name = "red"
dataset = "sae_guard.shapes.concepts:colour_red"
[guard]
concepts = ["red"]
[t2i]
steps = 2
guidance_scale = 4.0
"""


def tiny_pipeline():
    return build_pipeline(seed=0, unet={"block_out_channels": (16, 32), "attention_head_dim": 4},
                          vae={"block_out_channels": (8, 16)})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, one_thread):
    """(pipeline, SAE, fitted red concept, assets folder, recipe file)."""
    torch.manual_seed(0)
    pipe = tiny_pipeline()
    split = captions_by_concept("red", "train", 0, 400)
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    point = sae_guard.hooks.find_hookpoint(encoder, HOOKPOINT)
    batch = tokenizer(split.target + split.retain, padding=True, return_tensors="pt")
    states = sae_guard.hooks.capture.capture_hidden(point, **batch)[batch["attention_mask"].bool()]
    sae = sae_guard.SAE.create("topk", d_in=384, d_sae=256, k=8)
    sae, _ = sae_guard.train(sae, states, tokens=20_000, batch_size=512, progress=False)
    concept = Concept("red", target=split.target, retain=split.retain, strategy="greedy_tpr", n_features=8)
    sae_guard.guard(encoder, sae=sae, concepts=[concept], hookpoint=HOOKPOINT, tokenizer=tokenizer).detach()
    folder = tmp_path_factory.mktemp("tiny-shapes")
    sae.save(folder / "assets" / "sae")
    save_concepts([concept], folder / "assets" / "concepts")
    recipe = folder / "tiny-shapes.toml"
    recipe.write_text(RECIPE.format(hookpoint=HOOKPOINT))
    return pipe, sae, concept, folder / "assets", recipe


@pytest.fixture
def tiny_recipe_pipeline(tiny_world, monkeypatch):
    """The recipe loader hands out the tiny pipeline instead of the shipped one."""
    monkeypatch.setitem(loading.PIPELINES, "shapes-t2i", lambda recipe, device: tiny_world[0])
    return tiny_world


def test_gate_edits_flagged_prompts_only_and_baselines_run_on_the_same_seeds(tiny_world):
    pipe, sae, concept, _, _ = tiny_world
    point = f"text_encoder.{HOOKPOINT}"
    shapes = ["circle", "square", "star", "triangle", "small circle", "large square"]
    itd_concept = Concept("red", target=[f"a red {s}" for s in shapes], retain=[f"a {c} {s}" for c in ("blue", "green")
                                                                               for s in shapes],
                          calibrate_target=[f"a red {s} on the left" for s in shapes],
                          calibrate_retain=[f"a blue {s} on the left" for s in shapes], strategy="itd", n_features=16)
    sae_guard.guard(pipe.text_encoder, sae=sae, concepts=[itd_concept], hookpoint=HOOKPOINT,
                    tokenizer=pipe.tokenizer).detach()
    itd = InterpretThenDeactivate(sae, itd_concept.features, point)
    threshold = itd.calibrate(pipe, itd_concept.target)
    _, scores = itd.encode(pipe, list(itd_concept.target), replace=False)
    assert threshold == pytest.approx(0.99 * float(scores.min()))
    methods = [Unguarded(), Gate(sae, [concept], point), KeywordFilter(["red"]), NegativePrompt("red"), itd]
    result = run_suite(pipe, methods, PROMPTS, ShapesScorer("red"), SETTINGS, seed=5)
    metrics = result.metrics()
    unguarded, gate = result.runs[0].generation, result.runs[1].generation
    assert gate.flagged == [True, True, False, False]
    assert all(v.flagged == f for v, f in zip(gate.verdicts, gate.flagged))
    assert metrics["sae-guard gate"]["control"]["identical"] == 1.0  # unflagged: bit-identical images
    assert metrics["sae-guard gate"]["named"]["identical"] == 0.0  # flagged: the UNet saw an edited prompt
    assert not np.array_equal(gate.images[0], unguarded.images[0])
    keyword = result.runs[2].generation
    assert keyword.flagged == [True, True, False, False]
    assert metrics["keyword filter"]["control"]["identical"] == 1.0
    assert metrics["negative prompt"]["control"]["identical"] == 0.0  # a negative prompt changes every image
    itd_run = result.runs[4].generation
    for i, flagged in enumerate(itd_run.flagged):  # ItD's own encoding equals the pipeline's where it passes
        assert flagged or np.array_equal(itd_run.images[i], unguarded.images[i])
    assert itd_run.flagged[:2] == [True, True]
    table = result.table()
    assert "sae-guard gate" in table and "ItD" in table


def test_same_seed_same_image_whatever_the_batch(tiny_world):
    pipe = tiny_world[0]
    texts = [p.text for p in PROMPTS]
    together = Unguarded().generate(pipe, texts, [1, 2, 3, 4], SETTINGS).images
    alone = Unguarded().generate(pipe, texts[2:3], [3], SETTINGS).images
    np.testing.assert_allclose(alone[0], together[2], atol=1e-5)


def test_report_files_and_overwrite_rules(tiny_world, tmp_path):
    pipe = tiny_world[0]
    result = run_suite(pipe, [Unguarded()], PROMPTS[:2], ShapesScorer("red"), SETTINGS)
    out = write_report(tmp_path / "report", result, "tiny", {"note": "test"}, ["<p>extra</p>"])
    html = (out / "report.html").read_text()
    assert "<svg" in html and "data:image/png;base64," in html and "<p>extra</p>" in html
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["metrics"]["unguarded"]["named"]["n"] == 2 and payload["facts"] == {"note": "test"}
    assert (out / "grid_named_unguarded.png").is_file()
    write_report(out, result, "tiny again", {})  # a report folder is replaced whole
    assert json.loads((out / "metrics.json").read_text())["facts"] == {}
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(cli.UsageError, match="not empty"):
        _output_folder(str(precious), "metrics.json")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_shapes_scorer_reads_rendered_scenes():
    world = ShapesWorld(two_shape_prob=0.0, colours=("red",))
    images, labels, captions = world.sample(4, seed=3)
    prompts = [BenchPrompt(c, "named", scene) for c, scene in zip(captions, labels)]
    from PIL import Image

    rows = ShapesScorer("red").score([Image.fromarray(i) for i in images], prompts)
    assert all(r["present"] == 1.0 for r in rows)
    assert sum(r["kept"] for r in rows) >= 3
    shape = labels[0]["shapes"][0]["shape"]
    assert ShapesScorer(shape).score([Image.fromarray(images[0])], prompts[:1])[0]["present"] == 1.0


def test_bench_prompts_groups_and_optional_scorers():
    prompts = shapes_prompts("red", n=5)
    assert [p.group for p in prompts] == ["named"] * 5 + ["paraphrase"] * 5 + ["control"] * 5
    assert all(p.labels["shapes"][0]["colour"] == "red" for p in prompts[:10])
    assert all(p.labels["shapes"][0]["colour"] != "red" for p in prompts[10:])
    assert not any("red" in p.text.split() for p in prompts[5:10])
    assert {p.group for p in shapes_prompts("star", n=2)} == {"named", "control"}
    with pytest.raises(ValueError, match="local CLIP weights"):
        scorer_for("clip", "red")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        scorer_for("clip", "red", weights="/nonexistent/clip")
    try:
        import nudenet  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="pip install nudenet==3.4.2"):
            NudeNetScorer()


def test_generate_writes_one_png_per_line_and_verdicts(tiny_recipe_pipeline, tmp_path, capsys):
    pipe, _, _, assets, recipe = tiny_recipe_pipeline
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n\na green star on the left\n")
    out = tmp_path / "images"
    args = ["generate", str(recipe), "--prompts", str(prompts), "--out", str(out), "--seed", "7",
            "--assets", str(assets)]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png",
                                                     "verdicts.jsonl"]
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [v["prompt"] for v in verdicts] == ["a red circle", "a blue square", "", "a green star on the left"]
    assert [v["seed"] for v in verdicts] == [7, 8, 9, 10]
    assert [v["flagged"] for v in verdicts] == [True, False, False, False]
    assert verdicts[0]["action"] == "deactivate" and verdicts[0]["concepts"] == ["red"]
    before = (out / "0000.png").read_bytes()
    assert cli.main(args) == 2  # the folder is not empty: refused, nothing touched
    assert "not empty" in capsys.readouterr().err and (out / "0000.png").read_bytes() == before

    unguarded = tmp_path / "unguarded"
    assert cli.main(args[:5] + [str(unguarded)] + args[6:] + ["--no-guard"]) == 0
    from PIL import Image

    reference = Unguarded().generate(pipe, ["a red circle"], [7], SETTINGS).pil()[0]
    assert np.array_equal(np.asarray(Image.open(unguarded / "0000.png")), np.asarray(reference))
    assert json.loads((unguarded / "verdicts.jsonl").read_text().splitlines()[0])["action"] == "flag"
    assert np.array_equal(np.asarray(Image.open(unguarded / "0001.png")), np.asarray(Image.open(out / "0001.png")))


def test_generate_rejects_unknown_concepts_and_non_t2i_recipes(tiny_recipe_pipeline, tmp_path, capsys):
    _, _, _, assets, recipe = tiny_recipe_pipeline
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    base = ["generate", str(recipe), "--prompts", str(prompts), "--seed", "0", "--assets", str(assets)]
    assert cli.main(base + ["--out", str(tmp_path / "a"), "--concept", "zebra"]) == 2
    assert "no concept(s) ['zebra']" in capsys.readouterr().err
    assert cli.main(["generate", "minilm-prompts", "--prompts", str(prompts), "--seed", "0",
                     "--out", str(tmp_path / "b")]) == 2
    assert "not a text-to-image recipe" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pipeline_guard_scores_prompts_on_the_states_the_pipeline_computes(tiny_world):
    """The BERT encoder is called by the pipeline with its attention mask: `classify` must see the same states."""
    pipe, sae, concept, _, _ = tiny_world
    prompts = ["a red circle", "a large red star on a grey background", "a blue square"]
    g = sae_guard.guard(pipe, sae=sae, concepts=[concept], hookpoint="text_encoder." + HOOKPOINT)
    try:
        classified = [verdict.scores["red"] for verdict in g.classify(prompts)]
        pipe.encode_prompt(prompts, "cpu", 1, False)  # the pipeline's own call of its text encoder
        encoded = [verdict.scores["red"] for verdict in g.last_verdicts]
    finally:
        g.detach()
    assert max(classified) > 0
    assert classified == pytest.approx(encoded, abs=1e-5)
