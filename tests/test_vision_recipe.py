"""Image recipes (kind = "vision"): the shipped ShapesWorld CLIP tower recipe classifies and gates held-out images,
builds from its TOML, and refuses a malformed [images] table."""

import json

import pytest
import torch
from PIL import Image

from sae_guard import cli, recipes
from sae_guard.recipes import RecipeError, parse_recipe
from sae_guard.shapes.vision import HELDOUT_SEED
from sae_guard.shapes.world import COLOURS, SHAPES, ShapesWorld, to_tensor


def heldout(n: int):
    pixels, labels, _ = ShapesWorld(two_shape_prob=0.0).sample(n, seed=HELDOUT_SEED, start=500)
    return pixels, [s["shapes"][0] for s in labels]


@pytest.fixture(scope="module")
def shipped():
    g = recipes.load_guard("shapes-clip-vision", concepts=list(COLOURS + SHAPES))
    g.detach()
    return g


def test_shipped_concepts_name_held_out_colours_and_shapes(shipped):
    pixels, shapes = heldout(120)
    verdicts = shipped.classify([Image.fromarray(p) for p in pixels], batch_size=64)
    colour_right = sum(max(COLOURS, key=lambda c: v.scores[c] - v.thresholds[c]) == s["colour"]
                       for v, s in zip(verdicts, shapes))
    red = [int("red" in v.concepts) for v in verdicts]
    is_red = [s["colour"] == "red" for s in shapes]
    assert colour_right / len(shapes) >= 0.9
    assert sum(r for r, t in zip(red, is_red) if t) >= 0.9 * sum(is_red)
    assert sum(r for r, t in zip(red, is_red) if not t) <= 0.05 * (len(is_red) - sum(is_red))


def test_the_guard_gates_red_images_and_leaves_others_bit_identical():
    g = recipes.load_guard("shapes-clip-vision")  # [guard]: red, deactivated at -4
    pixels, shapes = heldout(60)
    x = to_tensor(pixels)
    try:
        flagged = torch.tensor([v.flagged for v in g.classify(list(x))])
        guarded = g.target.encode_image(x)
    finally:
        g.detach()
    plain = g.target.encode_image(x)
    is_red = torch.tensor([s["colour"] == "red" for s in shapes])
    assert flagged[is_red].all() and is_red.any()
    assert torch.equal(guarded[~flagged], plain[~flagged])
    assert not torch.allclose(guarded[flagged], plain[flagged])


def test_classify_images_from_the_command_line(tmp_path, capsys):
    pixels, shapes = heldout(2)
    paths = []
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    assert cli.main(["classify", "shapes-clip-vision", "--images", *paths, "--json"]) == cli.EXIT_OK
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == paths
    assert all(s["colour"] in r["concepts"] for r, s in zip(rows, shapes))
    (tmp_path / "bad.png").write_text("not an image")
    assert cli.main(["classify", "shapes-clip-vision", "--images", str(tmp_path / "bad.png")]) == cli.EXIT_USAGE
    assert cli.main(["classify", "shapes-clip-vision", "--prompts", paths[0]]) == cli.EXIT_USAGE


def test_a_tiny_image_recipe_builds_and_loads(tmp_path):
    recipe = parse_recipe({
        "kind": "vision", "name": "tiny-vision", "hookpoint": "visual.transformer.resblocks.3",
        "model": {"kind": "shapes-clip"},
        "images": {"sae": "sae_guard.shapes.image_sets:training_images", "n_sae": 200, "n_concept": 200},
        "sae": {"architecture": "topk", "d_sae": 256, "k": 8, "tokens": 20_000, "batch_size": 512},
        "concepts": [{"name": "red", "dataset": "sae_guard.shapes.image_sets:showing", "strategy": "probe",
                      "n_features": 8, "fpr": 0.05}],
    })
    report = recipes.build(recipe, out=tmp_path / "assets", progress=False)
    assert report["concepts"]["red"]["tpr"] > 0.5
    g = recipes.load_guard(recipe, assets=tmp_path / "assets")
    try:
        assert g.concepts[0].name == "red" and g.gates[0].sae.d_sae == 256
    finally:
        g.detach()


@pytest.mark.parametrize("images, message", [
    ({"n_sae": 10}, "sae must name a function"),
    ({"sae": "sae_guard.shapes.image_sets:training_images", "n_sae": 0}, "n_sae must be a positive integer"),
    ({"sae": "sae_guard.shapes.image_sets:training_images", "scope": "middle"}, "scope must be one of"),
    ({"sae": "sae_guard.shapes.image_sets:training_images", "size": 3}, "unknown keys"),
])
def test_a_malformed_images_table_is_refused(images, message):
    from sae_guard.recipes.vision import image_settings

    recipe = parse_recipe({"kind": "vision", "name": "bad", "hookpoint": "visual.transformer.resblocks.3",
                           "model": {"kind": "shapes-clip"}, "images": images, "sae": {}})
    with pytest.raises(RecipeError, match=message):
        image_settings(recipe)


def test_the_efficientnet_recipe_flags_held_out_red_shapes_through_imagenet_preprocessing():
    """The real pretrained backbone's recipe: 32-pixel ShapesWorld images resized by timm's own transform."""
    g = recipes.load_guard("efficientnet-lite0-shapes", concepts=["red", "star"])
    pixels, shapes = heldout(40)
    try:
        verdicts = g.classify([Image.fromarray(p) for p in pixels], batch_size=20)
    finally:
        g.detach()
    for name, key in (("red", "colour"), ("star", "shape")):
        truth = [s[key] == name for s in shapes]
        hits = [name in v.concepts for v in verdicts]
        assert sum(h for h, t in zip(hits, truth) if t) >= 0.8 * sum(truth) and any(truth)
        assert sum(h for h, t in zip(hits, truth) if not t) <= 0.1 * (len(truth) - sum(truth))
