"""Out-of-distribution image sets whose truth is known: what an OOD detector is scored on.

Every function is deterministic in its `seed` and returns uint8 (n, H, W, 3) images.

- `held_out_images`: ShapesWorld scenes drawn with only colours (or shapes) a model never saw in training (the
  `shapes-vit-ood` ViT was trained without purple and star);
- `textured_background_images`: in-distribution scenes whose achromatic background is replaced by a coloured
  texture (the scene is rendered on black and on white; the difference is the background's coverage per pixel, so
  anti-aliased edges blend into the texture as they did into the plain background);
- `texture_images`: smooth random colour fields (4x4 random colours, bicubic upsampling) plus stripes;
- `photo_crops`: square crops of the photographs bundled with scikit-image (`skimage.data`), resized;
- `noise_images`: uniform random pixels.

Natural photos: `PHOTOS` are the colour and grey photographs skimage ships (no download). For an ImageNet model they
are the in-distribution side, split by photograph (`FIT_PHOTOS`, `VALIDATION_PHOTOS`, `TEST_PHOTOS`) so a test
crop never comes from a photograph the detector was fitted on. That is 15 photographs in all: a small ID set.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from .world import ShapesWorld, render

FIT_PHOTOS = ("astronaut", "camera", "coffee", "coins", "rocket", "brick", "grass", "moon")
VALIDATION_PHOTOS = ("clock", "gravel", "cell")
TEST_PHOTOS = ("chelsea", "retina", "immunohistochemistry", "hubble_deep_field")
PHOTOS = FIT_PHOTOS + VALIDATION_PHOTOS + TEST_PHOTOS


def held_out_images(world: ShapesWorld, n: int, *, seed: int, colours: tuple[str, ...] = (),
                    shapes: tuple[str, ...] = (), start: int = 0) -> np.ndarray:
    """Scenes of `world` with its colours (or shapes) replaced by `colours` (`shapes`): e.g. only purple shapes."""
    if not colours and not shapes:
        raise ValueError("name the held-out colours or shapes to draw")
    changes = {"colours": tuple(colours)} if colours else {}
    changes |= {"shapes": tuple(shapes)} if shapes else {}
    return dataclasses.replace(world, **changes).sample(n, seed=seed, start=start)[0]


def textured_background_images(world: ShapesWorld, n: int, *, seed: int, start: int = 0) -> np.ndarray:
    """Scenes of `world` on a coloured texture instead of their black, white or grey background."""
    textures = texture_images(n, world.image_size, seed=seed + 1)
    out = []
    for i, texture in zip(range(start, start + n), textures):
        scene = world.scene(seed, i)
        on_black = render({**scene, "background": "black"}, world.image_size).astype(np.float32)
        on_white = render({**scene, "background": "white"}, world.image_size).astype(np.float32)
        background_share = (on_white - on_black) / 255.0
        out.append(np.clip(on_black + background_share * texture, 0, 255).round().astype(np.uint8))
    return np.stack(out)


def texture_images(n: int, size: int, *, seed: int) -> np.ndarray:
    """Smooth random colour fields with stripes of a random period and angle."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for _ in range(n):
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC)
        yy, xx = np.mgrid[0:size, 0:size] / size
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.1, 0.4)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        image = np.asarray(field, np.float32) * (0.6 + 0.4 * stripes[..., None])
        out.append(image.clip(0, 255).astype(np.uint8))
    return np.stack(out)


def noise_images(n: int, size: int, *, seed: int) -> np.ndarray:
    """Uniform random pixels."""
    return np.random.default_rng([seed, 11]).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def photo_crops(names: tuple[str, ...], per_photo: int, size: int, *, seed: int) -> np.ndarray:
    """`per_photo` random square crops (a third to all of the shorter side) of each named skimage photograph,
    resized to `size` (grey photographs replicated over RGB, alpha dropped)."""
    from skimage import data  # noqa: PLC0415

    unknown = [name for name in names if name not in PHOTOS]
    if unknown:
        raise ValueError(f"unknown photographs {unknown}; choose from {PHOTOS}")
    rng = np.random.default_rng([seed, 13])
    out = []
    for name in names:
        photo = np.asarray(getattr(data, name)())
        if photo.dtype == bool:
            photo = photo.astype(np.uint8) * 255
        photo = np.repeat(photo[..., None], 3, -1) if photo.ndim == 2 else photo[..., :3]
        height, width = photo.shape[:2]
        for _ in range(per_photo):
            side = int(rng.uniform(1 / 3, 1.0) * min(height, width))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            crop = Image.fromarray(photo[top:top + side, left:left + side].astype(np.uint8))
            out.append(np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)))
    return np.stack(out)
