"""ShapesWorld concept datasets: one per colour and one per shape, with fit / calibrate / test splits.

    data = concept_data("red")          # a sae_guard.prompts.ConceptData
    data.fit.target[:2]                  # ['a diamond in red', 'a triangle in red']

A caption is a target of a concept when its scene holds that colour (or shape), a retain input otherwise. Each
split draws its captions from its own world seed, so no split shares an image with another:

    split      captions                                    general prompts (retain side)
    fit        `train` templates, world seed 0              COCO captions
    calibrate  `train` templates, world seed 1              other COCO captions
    test       `heldout` templates (seed 2) and the         other COCO captions
               `paraphrase` set (seed 3: colours said in
               other words, no colour word anywhere)

COCO captions that name the concept (the colour word or one of its paraphrases, the shape word) are left out of
the retain side: "a red bus" asks for red, so a guard that flags it is right. The same caption string can occur
in two splits ("a red circle" is drawn by every seed); `ConceptData.held_out()` lists the calibrate and test
strings, which SAE training leaves out (`sae_guard.recipes.training_prompts`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from functools import lru_cache

from .. import prompts as prompt_sets
from ..prompts import ConceptData, Split
from .world import COLOURS, SHAPES, ShapesWorld, colour_paraphrases

CONCEPT_NAMES: tuple[str, ...] = COLOURS + SHAPES
SPLIT_SEEDS = {"fit": 0, "calibrate": 1, "heldout": 2, "paraphrase": 3}
SPLIT_IMAGES = {"fit": 1200, "calibrate": 800, "heldout": 500, "paraphrase": 500}
GENERAL_PROMPTS = {"fit": 600, "calibrate": 600, "test": 600}


def concept_kind(name: str) -> str:
    """"colour" or "shape"; a clear error for any other name."""
    if name in COLOURS:
        return "colour"
    if name in SHAPES:
        return "shape"
    raise ValueError(f"unknown ShapesWorld concept {name!r}; choose a colour ({', '.join(COLOURS)}) or a shape "
                     f"({', '.join(SHAPES)})")


def shows(scene: dict, name: str) -> bool:
    """Whether a scene (a label dict of `ShapesWorld.scene`) holds the colour or shape `name`."""
    key = concept_kind(name)
    return any(item[key] == name for item in scene["shapes"])


@lru_cache(maxsize=16)
def world_captions(caption_set: str, seed: int, n: int) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    """Captions of images 0..n-1 of the default world at `seed`, and their scenes."""
    _, labels, captions = ShapesWorld().sample(n, seed, caption_set)
    return tuple(captions), tuple(labels)


def captions_by_concept(name: str, caption_set: str, seed: int, n: int) -> Split:
    """The captions of one caption set, split by whether their scene shows `name` (each string once)."""
    captions, labels = world_captions(caption_set, seed, n)
    target = [c for c, scene in zip(captions, labels) if shows(scene, name)]
    retain = [c for c, scene in zip(captions, labels) if not shows(scene, name)]
    return Split(prompt_sets.clean(target), prompt_sets.clean(retain))


def mentions(prompt: str, name: str) -> bool:
    """Whether `prompt` names the concept: its word (plural too) or, for a colour, one of its paraphrases."""
    words = [name] + ([p.removeprefix("the colour of ") for p in colour_paraphrases(name)]
                      if concept_kind(name) == "colour" else [])
    pattern = r"\b(" + "|".join(re.escape(w) for w in words) + r")s?\b"
    return re.search(pattern, prompt, flags=re.IGNORECASE) is not None


def general_prompts(name: str, folder: str | os.PathLike | None = None, seed: int = 0) -> dict[str, list[str]]:
    """COCO captions not naming `name`, cut into fit / calibrate / test (GENERAL_PROMPTS sizes), evaluation
    prompts (`prompts.evaluation_prompts`) excluded. The order is a seeded hash, the same for every concept."""
    excluded = set(prompt_sets.evaluation_prompts(folder, seed))
    pool = sorted((p for p in prompt_sets.coco(folder) if p not in excluded),
                  key=lambda p: hashlib.sha256(f"{seed}\x1fshapes/general\x1f{p}".encode()).hexdigest())
    parts, start = {}, 0
    for split, size in GENERAL_PROMPTS.items():
        parts[split] = [p for p in pool[start : start + size] if not mentions(p, name)]
        start += size
    return parts


def concept_data(name: str, folder: str | os.PathLike | None = None, seed: int = 0,
                 general: bool = True) -> ConceptData:
    """The fit / calibrate / test splits of concept `name` (see the module docstring).

    seed shifts every world seed (SPLIT_SEEDS + 10 * seed) and the COCO order; `general=False` leaves COCO out
    (no prompt data folder needed).
    """
    concept_kind(name)
    offset = 10 * seed
    fit = captions_by_concept(name, "train", SPLIT_SEEDS["fit"] + offset, SPLIT_IMAGES["fit"])
    calibrate = captions_by_concept(name, "train", SPLIT_SEEDS["calibrate"] + offset, SPLIT_IMAGES["calibrate"])
    heldout = captions_by_concept(name, "heldout", SPLIT_SEEDS["heldout"] + offset, SPLIT_IMAGES["heldout"])
    paraphrase = captions_by_concept(name, "paraphrase", SPLIT_SEEDS["paraphrase"] + offset,
                                     SPLIT_IMAGES["paraphrase"])
    test = Split(heldout.target + paraphrase.target, heldout.retain + paraphrase.retain)
    general_parts = general_prompts(name, folder, seed) if general else {"fit": [], "calibrate": [], "test": []}
    return ConceptData(
        name,
        fit=Split(fit.target, fit.retain + general_parts["fit"]),
        calibrate=Split(calibrate.target, calibrate.retain + general_parts["calibrate"]),
        test=Split(test.target, test.retain + general_parts["test"]),
    )


def evaluation_sets(name: str, folder: str | os.PathLike | None = None, seed: int = 0) -> dict[str, Split]:
    """The prompts a concept's verdicts are reported on, one Split per source: train (the calibrate captions),
    heldout, paraphrase and general (COCO test captions; retain side only)."""
    offset = 10 * seed
    return {
        "train": captions_by_concept(name, "train", SPLIT_SEEDS["calibrate"] + offset, SPLIT_IMAGES["calibrate"]),
        "heldout": captions_by_concept(name, "heldout", SPLIT_SEEDS["heldout"] + offset, SPLIT_IMAGES["heldout"]),
        "paraphrase": captions_by_concept(name, "paraphrase", SPLIT_SEEDS["paraphrase"] + offset,
                                          SPLIT_IMAGES["paraphrase"]),
        "general": Split([], general_prompts(name, folder, seed)["test"]),
    }


def all_concept_data(names: Sequence[str] = CONCEPT_NAMES, folder: str | os.PathLike | None = None,
                     seed: int = 0) -> dict[str, ConceptData]:
    return {name: concept_data(name, folder, seed) for name in names}


TRAINING_CAPTION_IMAGES = 6000


def world_training_captions(folder: str | os.PathLike | None = None) -> list[str]:
    """The world's `train` captions of images 0..5999 at the fit seed, each string once: the ShapesWorld share of
    the text-encoder SAE's training prompts (a recipe `[data] sets` entry; `folder` is unused)."""
    return prompt_sets.clean(world_captions("train", SPLIT_SEEDS["fit"], TRAINING_CAPTION_IMAGES)[0])


def _dataset_function(name: str):
    def dataset(folder: str | os.PathLike | None = None, seed: int = 0) -> ConceptData:
        return concept_data(name, folder, seed)

    dataset.__name__ = dataset.__qualname__ = f"{concept_kind(name)}_{name}"
    dataset.__doc__ = f"The ShapesWorld concept dataset of {name!r} (`concept_data`), for recipes."
    return dataset


# One concept-dataset function per colour and shape, for recipes: "sae_guard.shapes.concepts:colour_red".
for _name in CONCEPT_NAMES:
    globals()[f"{concept_kind(_name)}_{_name}"] = _dataset_function(_name)
del _name


def single_shape_worlds(name: str) -> tuple[ShapesWorld, ShapesWorld]:
    """One-shape worlds whose shape shows the colour (or shape) `name`, and whose shape shows one of the others."""
    kind = concept_kind(name)
    key = "colours" if kind == "colour" else "shapes"
    others = tuple(v for v in (COLOURS if kind == "colour" else SHAPES) if v != name)
    return ShapesWorld(two_shape_prob=0.0, **{key: (name,)}), ShapesWorld(two_shape_prob=0.0, **{key: others})


UNET_STAGE_SEEDS = {"sae": 7000, "fit": 7100, "calibrate": 7200}  # world seeds no concept split or bench uses


def unet_stage_prompts(name: str, n: int) -> tuple[list[str], Split, Split]:
    """The captions a recipe's `[guard.unet]` stage is built from (`prompts = "...:unet_stage_prompts"`):
    n `train` captions of the whole world for its SAE; and single-shape captions for its concept, n // 2 showing
    `name` against n showing only the other colours (or shapes), once to fit (world seeds 7100-7101) and once
    to calibrate (7200-7201). Images are judged against the world's other values of the same attribute, so the
    threshold is set where the stage has to tell red from orange, not red from an empty picture."""
    showing, without = single_shape_worlds(name)
    splits = []
    for split in ("fit", "calibrate"):
        seed = UNET_STAGE_SEEDS[split]
        shows = showing.sample(n // 2, seed, "train")[2]
        lacks = without.sample(n, seed + 1, "train")[2]
        splits.append(Split(list(shows), list(lacks)))
    return list(ShapesWorld().sample(n, UNET_STAGE_SEEDS["sae"], "train")[2]), splits[0], splits[1]
