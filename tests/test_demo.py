"""`sae-guard demo` end to end in its reduced mode (2 prompts per group, 1 denoising step) on the tiny pipeline."""

from __future__ import annotations

import json

import pytest

from sae_guard import cli
from test_erasure import tiny_recipe_pipeline, tiny_world  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_writes_report_metrics_and_prints_a_table(tiny_recipe_pipeline, tmp_path, capsys):
    _, _, _, assets, recipe = tiny_recipe_pipeline
    try:
        from sae_guard.prompts import prompts_dir

        prompts_dir()
    except FileNotFoundError as error:
        pytest.skip(f"prompt data not available ({error}); CI has it at ../shared/data/prompts")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--recipe", str(recipe), "--assets", str(assets)]
    assert cli.main(args + ["--n", "2", "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "sae-guard gate" in printed and "unguarded" in printed and "report:" in printed
    payload = json.loads((out / "metrics.json").read_text())
    gate = payload["metrics"]["sae-guard gate"]
    assert set(gate) >= {"named", "paraphrase", "control"}
    assert gate["named"]["flagged"] == 1.0 and gate["control"]["identical"] == 1.0
    verdicts = payload["facts"]["verdicts"]
    assert set(verdicts) == {"train", "heldout", "paraphrase", "general"}
    assert verdicts["train"]["target"] > 0.9 and verdicts["train"]["retain"] < 0.1
    html = (out / "report.html").read_text()
    assert "Classifier verdicts for 'red'" in html and html.count("<svg") == 2

    assert cli.main(args + ["--n", "0"]) == 2  # bad input
    assert json.loads((out / "metrics.json").read_text()) == payload  # the previous report is kept
