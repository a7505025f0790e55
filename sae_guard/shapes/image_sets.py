"""ShapesWorld images for image recipes: what an SAE on a vision model trains on, and each concept's image sets.

    [images]
    sae = "sae_guard.shapes.image_sets:training_images"        # f(n, seed) -> images
    [[concepts]]
    dataset = "sae_guard.shapes.image_sets:showing"            # f(name, n, seed) -> (target, retain) images

Images are PIL images, so every model reads them through its own preprocessing (resized to 224 for an ImageNet
CNN, as they are for the 32-pixel ShapesWorld models). SAE images are drawn from indices 50,000 on and concept
images from 80,000 on of the given seed, so the two never share an image; the held-out seed of
`sae_guard.shapes.vision` (2000) is never used here.
"""

from __future__ import annotations

from PIL import Image

from .world import COLOURS, SHAPES, ShapesWorld

SAE_START, CONCEPT_START = 50_000, 80_000


def training_images(n: int, seed: int) -> list[Image.Image]:
    """`n` images of one or two shapes: the SAE's training images."""
    pixels, _, _ = ShapesWorld().sample(n, seed=seed, start=SAE_START)
    return [Image.fromarray(p) for p in pixels]


def showing(name: str, n: int, seed: int) -> tuple[list[Image.Image], list[Image.Image]]:
    """`n` single-shape images split by whether they show `name` (a colour or a shape): (target, retain)."""
    if name not in COLOURS + SHAPES:
        raise ValueError(f"{name!r} is not a ShapesWorld colour or shape ({', '.join(COLOURS + SHAPES)})")
    key = "colour" if name in COLOURS else "shape"
    pixels, labels, _ = ShapesWorld(two_shape_prob=0.0).sample(n, seed=seed, start=CONCEPT_START)
    target, retain = [], []
    for image, scene in zip(pixels, labels):
        (target if scene["shapes"][0][key] == name else retain).append(Image.fromarray(image))
    return target, retain
