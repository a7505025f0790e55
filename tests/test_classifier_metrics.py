"""The classifier metrics and protocol of benchmarks/classifier_baselines.py on hand-made scores."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

from sae_guard.prompts import ConceptData, Split

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "classifier_baselines.py"
_spec = importlib.util.spec_from_file_location("classifier_baselines", _PATH)
cb = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cb  # dataclasses resolve their module through sys.modules
_spec.loader.exec_module(cb)


def test_threshold_lets_exactly_fpr_of_calibration_scores_through():
    retain = torch.arange(100.0)
    assert cb.calibrate_threshold(retain, 0.01) == 98.0  # only 99 lies above: 1 of 100
    assert cb.calibrate_threshold(retain, 0.05) == 94.0  # 95..99 lie above: 5 of 100
    assert cb.calibrate_threshold(retain, 0.0) == 99.0  # nothing above the maximum
    assert cb.flag_rate(retain, cb.calibrate_threshold(retain, 0.01)) == pytest.approx(0.01)


def test_ties_at_the_threshold_are_not_flagged():
    retain = torch.ones(100)
    threshold = cb.calibrate_threshold(retain, 0.01)
    assert threshold == 1.0 and cb.flag_rate(retain, threshold) == 0.0


def test_tpr_at_fpr_calibrates_on_calibration_scores_and_measures_on_test_scores():
    point = cb.tpr_at_fpr(
        torch.tensor([97.0, 98.5, 99.0, 150.0]), torch.tensor([10.0, 98.0, 99.0]), 0.01,
        calibration_retain_scores=torch.arange(100.0),
    )
    assert point.threshold == 98.0
    assert point.tpr == pytest.approx(3 / 4)
    assert point.fpr == pytest.approx(1 / 3)


@pytest.mark.parametrize(("target", "retain", "expected"), [
    ([3.0, 4.0], [1.0, 2.0], 1.0),
    ([1.0, 2.0], [3.0, 4.0], 0.0),
    ([5.0, 5.0], [5.0], 0.5),
    ([1.0, 2.0, 3.0], [2.0, 0.0], 4.5 / 6),  # pairs won: 1 + (0.5 + 1) + 2 of 6
])
def test_auroc_known_answers(target, retain, expected):
    assert cb.auroc(torch.tensor(target), torch.tensor(retain)) == pytest.approx(expected)


def test_auroc_matches_pair_counting_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (40,), generator=generator).float()
    retain = torch.randint(0, 4, (30,), generator=generator).float()
    wins = sum(1.0 if t > r else 0.5 if t == r else 0.0 for t, r in itertools.product(target, retain))
    assert cb.auroc(target, retain) == pytest.approx(wins / (40 * 30))


def test_keywords_match_whole_words_case_insensitively():
    score = cb.keyword_scorer(["van gogh", "gogh", "nude"])
    prompts = ["In the style of VAN GOGH", "gogh's sunflowers", "goghish hills", "a denuded hillside", "Nude."]
    assert score(prompts).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def _toy_data() -> ConceptData:
    return ConceptData(
        "toy",
        fit=Split(["t1", "t2"], ["r1", "r2"]),
        calibrate=Split(["t3"], [f"c{i}" for i in range(10)]),
        test=Split(["t4", "t5"], ["r3", "r4"]),
    )


def test_evaluate_fits_without_test_and_thresholds_on_calibrate():
    seen: list[ConceptData] = []
    values = {"t4": 5.0, "t5": 0.5, "r3": 0.0, "r4": 3.0, **{f"c{i}": float(i) / 10 for i in range(10)}}

    def fit(data: ConceptData):
        seen.append(data)
        return lambda prompts: torch.tensor([values.get(p, 0.0) for p in prompts])

    row = cb.evaluate(cb.Method("toy", fit), _toy_data(), {"extra": ["t4", "r3"]}, fpr=0.1)
    assert seen[0].test == Split([], []) and seen[0].fit == _toy_data().fit
    assert row["threshold"] == pytest.approx(0.8)  # calibrate retain 0.0..0.9, one of ten above
    assert (row["test_tpr"], row["test_fpr"], row["auroc"]) == (0.5, 0.5, 0.75)
    assert row["flag_rates"] == {"extra": 0.5}


def test_fixed_threshold_bypasses_calibration():
    row = cb.evaluate_scorer("rule", lambda prompts: torch.ones(len(prompts)), _toy_data(), fixed_threshold=0.5)
    assert row["threshold"] == 0.5 and row["calibrate_fpr"] == 1.0 and row["test_tpr"] == 1.0


def test_greedy_tpr_adds_latents_while_they_raise_tpr_at_the_retain_threshold():
    """Latent 1 alone flags target 1 at no retain cost; latent 0 then adds target 0 (its weak firing on every retain
    input sets a threshold target 0 still clears); latent 2 fires on half the retain inputs, so it adds nothing."""
    from sae_guard.concepts.selection import greedy_tpr

    target = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5]])
    retain = torch.zeros(100, 3)
    retain[:, 0] = 1.0
    retain[:50, 2] = 1.0
    assert greedy_tpr(target, retain, n_features=3).tolist() == [1, 0]
    assert greedy_tpr(target, retain, n_features=1).tolist() == [1]
    with pytest.raises(ValueError, match="needs retain inputs"):
        greedy_tpr(target, retain[:0])
