"""OOD detection: the detector on a case whose truth is obvious, its errors, the splits and the held-out ViT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_guard import SAE
from sae_guard.analysis.scores import auroc, fpr_at_tpr
from sae_guard.adapters.vision import harvest_tokens
from sae_guard.ood.detector import (METHODS, NotFittedError, OODDetector, grouped_gaussians, leading_pair,
                                    nearest_mahalanobis, train_ood_sae)
from sae_guard.shapes.ood_splits import (held_out_images, noise_images, photo_crops, texture_images,
                                         textured_background_images)
from sae_guard.shapes.vision import heldout_images, load_vit, sub_world, train_vit
from sae_guard.shapes.world import ShapesWorld, to_tensor


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return load_vit()


@pytest.fixture(scope="module")
def fitted(vit):
    """A small SAE on the shipped ViT's blocks.2 tokens of 120 ShapesWorld images, and a detector fitted on them
    (shrinkage 0.1: 120 images cannot estimate a 96-d covariance)."""
    fit = to_tensor(ShapesWorld().sample(120, seed=5)[0])
    sae, figures = train_ood_sae(vit, "blocks.2", fit, d_sae=128, k=8, tokens=150_000)
    return OODDetector(vit, sae, "blocks.2", shrinkage=0.1).fit(fit), figures


def test_noise_is_far_out_of_distribution_for_the_sae_reconstruction_and_code_scores(fitted):
    detector, figures = fitted
    assert figures["fvu"] < 0.3
    inside = detector.score(to_tensor(ShapesWorld().sample(60, seed=6)[0]))
    noise = detector.score(to_tensor(noise_images(60, 32, seed=0)))
    labels = torch.cat([torch.zeros(60), torch.ones(60)])
    for method in ("sae_error", "sae_error_max", "sae_knn"):
        values = torch.cat([inside[method], noise[method]])
        assert auroc(values, labels) > 0.9, method
    assert fpr_at_tpr(torch.cat([inside["sae_error"], noise["sae_error"]]), labels) < 0.2


def test_grouped_gaussians_separate_modes_that_one_gaussian_blurs_together():
    """Two tight clusters: a point halfway between them is typical for one Gaussian over both, but far from each
    cluster's own mean under the shared within-group covariance."""
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(200, 2, generator=g) * 0.1 - 3, torch.randn(200, 2, generator=g) * 0.1 + 3
    features, groups = torch.cat([left, right]), torch.cat([torch.zeros(200), torch.ones(200)]).long()
    means, precision = grouped_gaussians(features, groups * 7 + 5)  # any labels: only the grouping counts
    torch.testing.assert_close(means, torch.stack([left.mean(0), right.mean(0)]))
    middle, member = torch.zeros(1, 2), left[:1]
    assert nearest_mahalanobis(middle, means, precision) > 100 * nearest_mahalanobis(member, means, precision)


def test_leading_pair_names_the_unordered_pair_of_the_two_most_active_latents():
    codes = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 2.0, 1.0, 3.0], [5.0, 0.0, 4.0, 0.0]])
    pairs = leading_pair(codes)
    assert pairs[0] == pairs[1] != pairs[2] and pairs[2] == 0 * 4 + 2


def test_fused_score_adds_the_excess_error_in_in_distribution_standard_deviations(fitted):
    """sae_fused = sae_conditional + FUSED_WEIGHT * (excess error in ID standard deviations)^2: new in-distribution
    images sit within a couple of deviations (a little above 0: this small SAE was trained on the calibration images
    too), noise dozens above."""
    from sae_guard.ood.detector import FUSED_WEIGHT

    detector, _ = fitted
    inside = detector.score(to_tensor(ShapesWorld().sample(60, seed=9)[0]))
    noise = detector.score(to_tensor(noise_images(20, 32, seed=1)))
    excess = {name: ((s["sae_fused"] - s["sae_conditional"]) / FUSED_WEIGHT).sqrt()
              for name, s in (("inside", inside), ("noise", noise))}
    assert excess["inside"].median() < 2 and excess["noise"].min() > 10
    assert noise["sae_fused"].min() > inside["sae_fused"].max()


def test_a_fit_set_too_small_for_the_default_shrinkage_warns(fitted):
    detector, _ = fitted
    fit = to_tensor(ShapesWorld().sample(40, seed=5)[0])
    with pytest.warns(UserWarning, match="40 in-distribution images for 96-d features"):
        OODDetector(detector.model, detector.sae, "blocks.2").fit(fit)


def test_scores_cover_every_method_one_value_per_image_and_do_not_depend_on_the_batch(fitted):
    detector, _ = fitted
    images = to_tensor(ShapesWorld().sample(5, seed=7)[0])
    together = detector.score(images)
    alone = detector.score(images[2:3])
    assert set(together) == set(METHODS)
    for method, values in together.items():
        assert values.shape == (5,) and torch.isfinite(values).all(), method
        torch.testing.assert_close(values[2:3], alone[method], rtol=1e-4, atol=1e-5)


def test_pil_images_go_through_the_models_preprocessing(fitted):
    from PIL import Image

    detector, _ = fitted
    images = [Image.fromarray(p) for p in ShapesWorld().sample(3, seed=8)[0]]
    from_pil = detector.score(images)["sae_error"]
    preprocessed = torch.stack([detector.adapter.preprocess(image) for image in images])
    torch.testing.assert_close(from_pil, detector.score(preprocessed)["sae_error"])


def test_bad_input_is_refused_with_a_clear_error(vit, fitted):
    detector, _ = fitted
    sae = detector.sae
    with pytest.raises(NotFittedError, match="call .fit"):
        OODDetector(vit, sae, "blocks.2").score(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="reads 64-d activations but 'blocks.2' gives 96-d"):
        OODDetector(vit, SAE.create("topk", d_in=64, d_sae=32, k=4), "blocks.2")
    with pytest.raises(ValueError, match="no images given"):
        detector.score([])
    with pytest.raises(ValueError, match="no images given"):
        harvest_tokens(vit, "blocks.2", [])
    with pytest.raises(ValueError, match="not a timm classifier"):
        OODDetector(torch.nn.Linear(3, 3), sae, "blocks.2")
    with pytest.raises(ValueError, match="images of size"):
        detector.score(torch.zeros(2, 3, 16, 16))


def test_splits_are_deterministic_and_show_what_they_promise():
    world = sub_world(("purple", "star"))
    assert "purple" not in world.colours and "star" not in world.shapes
    purple = held_out_images(world, 4, seed=1, colours=("purple",))
    np.testing.assert_array_equal(purple, held_out_images(world, 4, seed=1, colours=("purple",)))
    scenes = [dict(ShapesWorld(colours=("purple",), shapes=world.shapes).scene(1, i)) for i in range(4)]
    assert all(s["colour"] == "purple" and s["shape"] != "star" for scene in scenes for s in scene["shapes"])
    textured = textured_background_images(world, 6, seed=2)
    plain = world.sample(6, seed=2)[0]
    assert textured.shape == plain.shape == (6, 32, 32, 3)
    corner = textured[:, 0, 0].astype(int)  # the corner is background: now a texture, no longer black/white/grey
    assert (corner.max(1) - corner.min(1) > 0).any()
    assert not np.array_equal(textured, plain)
    np.testing.assert_array_equal(texture_images(3, 32, seed=0), texture_images(3, 32, seed=0))
    assert noise_images(2, 32, seed=0).dtype == np.uint8
    photos = photo_crops(("astronaut", "camera"), 2, 48, seed=0)
    assert photos.shape == (4, 48, 48, 3)
    with pytest.raises(ValueError, match="unknown photographs"):
        photo_crops(("nope",), 1, 32, seed=0)
    with pytest.raises(ValueError, match="name the held-out"):
        held_out_images(world, 1, seed=0)


def test_sub_world_rejects_unknown_or_everything():
    with pytest.raises(ValueError, match="cannot hold out"):
        sub_world(("magenta",))
    with pytest.raises(ValueError, match="leaves no colour"):
        sub_world(("red", "orange", "yellow", "green", "blue", "purple"))


def test_default_heldout_images_are_unchanged_by_the_world_argument():
    images, labels, _ = heldout_images(4)
    expected, expected_labels, _ = ShapesWorld(two_shape_prob=0.0).sample(4, seed=2000)
    np.testing.assert_array_equal(images, expected)
    assert labels == expected_labels


def test_train_vit_holding_out_records_it_and_never_shows_it(tmp_path):
    metrics = train_vit(tmp_path, n_train=128, epochs=1, batch_size=64, hold_out=("purple", "star"), log=lambda _: None)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["held_out"] == {"colours": ["purple"], "shapes": ["star"]}
    assert set(metrics) == {"n", "colour", "shape"}
    assert load_vit(tmp_path)(torch.zeros(1, 3, 32, 32)).shape == (1, 11)


def test_shipped_ood_vit_was_trained_without_its_held_out_colour_and_shape():
    from sae_guard.shapes.vision import ASSETS

    config = json.loads((ASSETS / "shapes-vit-ood" / "config.json").read_text())
    assert config["held_out"] == {"colours": ["purple"], "shapes": ["star"]}
    assert config["heldout"]["colour"] > 0.95 and config["heldout"]["shape"] > 0.95


def test_cli_model_list_matches_the_benchmark():
    from sae_guard.ood.benchmark import MODELS
    from sae_guard.ood.commands import MODELS as CLI_MODELS

    assert CLI_MODELS == MODELS


def test_fpr_at_tpr_counts_negatives_above_the_positive_threshold():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 11.0])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    assert fpr_at_tpr(scores, labels) == 0.0
    assert fpr_at_tpr(-scores, labels) == 1.0


def test_cli_writes_the_report_and_refuses_too_few_images(tmp_path, capsys):
    from sae_guard.cli import EXIT_USAGE, main

    assert main(["ood", "--model", "shapes-vit", "--out", str(tmp_path), "--n", "3", "--quiet"]) == EXIT_USAGE
    assert "at least 10" in capsys.readouterr().err
    assert main(["ood", "--model", "shapes-vit", "--out", str(tmp_path), "--n", "12", "--quiet"]) == 0
    report = json.loads((tmp_path / "ood-shapes-vit.json").read_text())
    assert set(report["test"]) == {"held-out colour", "held-out shape", "textured background", "natural photos",
                                   "noise"}
    assert all(set(row) == set(METHODS) for row in report["test"].values())
    assert report["goals"]["chosen_sae_score"].startswith("sae_")
    table = (tmp_path / "ood-shapes-vit.md").read_text()
    assert "| sae_error |" in table and "| mahalanobis |" in table and ("PASS" in table or "FAIL" in table)
    page = (tmp_path / "ood-shapes-vit.html").read_text()
    assert page.count("<tr>") == len(METHODS) + 1 and "<b>" in page
