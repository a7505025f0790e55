"""ShapesWorld concept datasets: targets show the concept, retains do not, splits come from different images."""

from __future__ import annotations

import re

import pytest

from sae_guard import recipes
from sae_guard.prompts import ConceptData
from sae_guard.shapes import COLOURS, SHAPES, ShapesWorld
from sae_guard.shapes import concepts as C


def test_every_colour_and_shape_is_a_concept_with_a_recipe_function():
    assert C.CONCEPT_NAMES == COLOURS + SHAPES
    for name in C.CONCEPT_NAMES:
        function = recipes.prompt_function(f"sae_guard.shapes.concepts:{C.concept_kind(name)}_{name}", "test")
        assert function.__name__ == f"{C.concept_kind(name)}_{name}"
    with pytest.raises(ValueError, match="unknown ShapesWorld concept 'pink'"):
        C.concept_kind("pink")


@pytest.mark.parametrize("name", ["red", "star"])
def test_targets_show_the_concept_and_retains_do_not(name):
    data = C.concept_data(name, general=False)
    assert isinstance(data, ConceptData)
    kind = C.concept_kind(name)
    _, labels, captions = ShapesWorld().sample(C.SPLIT_IMAGES["fit"], C.SPLIT_SEEDS["fit"], "train")
    truth = {}
    for caption, scene in zip(captions, labels):
        truth.setdefault(caption, set()).add(any(item[kind] == name for item in scene["shapes"]))
    for caption in data.fit.target:
        assert True in truth[caption]
    for caption in data.fit.retain:
        assert truth[caption] == {False}
    assert len(data.fit.target) > 100 and len(data.fit.retain) > 500
    assert len(set(data.fit.target)) == len(data.fit.target)


def test_paraphrase_targets_never_say_the_colour_and_test_differs_from_fit():
    data = C.concept_data("red", general=False)
    sets = {name: C.captions_by_concept("red", name, C.SPLIT_SEEDS[name], C.SPLIT_IMAGES[name])
            for name in ("heldout", "paraphrase")}
    assert sets["paraphrase"].target and not any(re.search(r"\bred\b", c) for c in sets["paraphrase"].target)
    assert set(data.test.target) == set(sets["heldout"].target) | set(sets["paraphrase"].target)
    train_captions = set(C.world_training_captions())
    assert not set(sets["paraphrase"].target) & train_captions  # absent from the SAE's training captions


def test_mentions_reads_words_and_paraphrases():
    assert C.mentions("A red bus on the street", "red")
    assert C.mentions("two crimson chairs", "red")
    assert C.mentions("a cake the colour of ripe strawberries", "red")
    assert not C.mentions("a redwood forest", "red")
    assert C.mentions("three circles", "circle")
    assert not C.mentions("a circus tent", "circle")


def test_general_prompts_leave_out_captions_naming_the_concept():
    try:
        parts = C.general_prompts("red")
    except FileNotFoundError as error:
        pytest.skip(f"prompt data not available ({error}); CI has it at ../shared/data/prompts")
    assert set(parts) == {"fit", "calibrate", "test"}
    everything = [p for part in parts.values() for p in part]
    assert len(everything) == len(set(everything)) > 1500
    assert not any(C.mentions(p, "red") for p in everything)
    data = C.concept_data("red")
    assert set(parts["calibrate"]) <= set(data.calibrate.retain)
