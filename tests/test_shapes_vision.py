"""ShapesWorld ViT and CLIP: the training commands save files the stock timm/open_clip loaders read back exactly."""

from __future__ import annotations

import json

import pytest
import torch

from sae_guard.shapes.vision import (
    CLIP_DIR, LABELS, VIT_DIR, build_vit, class_text_features, heldout_images, load_clip, load_vit, presence,
    train_clip, train_vit, vit_accuracy, zero_shot_accuracy, zero_shot_predict,
)
from sae_guard.shapes.world import COLOURS, SHAPES, ShapesWorld, to_tensor


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit")
    metrics = train_vit(out, n_train=256, epochs=1, batch_size=128, log=lambda _: None)
    return out, metrics


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    metrics = train_clip(out, n_train=256, epochs=1, batch_size=128, log=lambda _: None)
    return out, metrics


def test_presence_marks_every_colour_and_shape_of_a_scene():
    scene = {"background": "black", "shapes": [{"colour": "red", "shape": "star"},
                                               {"colour": "blue", "shape": "star"}]}
    row = presence([scene])[0]
    assert {LABELS[i] for i in row.nonzero().flatten().tolist()} == {"red", "blue", "star"}


def test_heldout_images_are_single_shape_and_disjoint_from_training_images():
    _, labels, _ = heldout_images(20)
    assert all(len(scene["shapes"]) == 1 for scene in labels)
    train_images, _, _ = ShapesWorld().sample(20, seed=1000)
    held, _, _ = heldout_images(20)
    assert not any((held[i] == train_images[i]).all() for i in range(20))


def test_vit_saved_weights_load_through_timm_pretrained_loader(tiny_vit):
    out, metrics = tiny_vit
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == list(LABELS) and config["heldout"] == metrics
    trained = load_vit(out)
    fresh = build_vit()
    x = to_tensor(heldout_images(4)[0])
    with torch.no_grad():
        assert not torch.equal(trained(x), fresh.eval()(x))  # the weights were really read
        assert torch.equal(trained(x), load_vit(out)(x))  # every weight read, the head included
    assert set(vit_accuracy(trained, n=10)) == {"n", "colour", "shape"}


def test_clip_saved_weights_load_through_open_clip_factory(tiny_clip):
    out, metrics = tiny_clip
    assert json.loads((out / "training.json").read_text())["heldout"] == metrics
    model, preprocess, tokenizer = load_clip(out)
    images = heldout_images(3)[0]
    from PIL import Image
    pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images])
    # the stock transform gives the same pixels the model was trained on
    torch.testing.assert_close(pixels, to_tensor(images), atol=1e-5, rtol=0)
    probs = zero_shot_predict(model, tokenizer, pixels, "colour")
    assert probs.shape == (3, len(COLOURS))
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert class_text_features(model, tokenizer, "shape").shape[0] == len(SHAPES)
    assert set(zero_shot_accuracy(model, tokenizer, n=10)) == {"n", "colour", "shape"}


def test_bad_inputs_are_refused_with_the_fix(tmp_path, tiny_clip):
    with pytest.raises(FileNotFoundError, match="sae_guard.shapes.vision vit"):
        load_vit(tmp_path)
    with pytest.raises(FileNotFoundError, match="sae_guard.shapes.vision clip"):
        load_clip(tmp_path)
    model, _, tokenizer = load_clip(tiny_clip[0])
    with pytest.raises(ValueError, match="attribute"):
        class_text_features(model, tokenizer, "size")


@pytest.mark.slow
def test_shipped_models_meet_their_heldout_colour_targets():
    """The shipped assets: CLIP zero-shot colour >= 0.90 on held-out images; the ViT head reads colour and shape."""
    model, _, tokenizer = load_clip(CLIP_DIR)
    assert zero_shot_accuracy(model, tokenizer, n=500)["colour"] >= 0.90
    vit = vit_accuracy(load_vit(VIT_DIR), n=500)
    assert vit["colour"] >= 0.90 and vit["shape"] >= 0.90, vit


@pytest.mark.slow
def test_shipped_clip_meets_its_heldout_targets():
    model, _, tokenizer = load_clip(CLIP_DIR)
    accuracy = zero_shot_accuracy(model, tokenizer, n=500)
    assert accuracy["colour"] >= 0.90 and accuracy["shape"] >= 0.80
