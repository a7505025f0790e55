"""How well a ShapesWorld text-to-image pipeline draws what a caption names, read back by the pixel scorers.

For a one-shape caption naming colour C and shape S, an image counts as
- colour right when `colours_present(image) == {C}`: C covers at least 0.5% of the image (5 pixels at 32x32,
  neighbour-confirmed) and no other palette colour does;
- shape right when `shapes_present(image) == {S}`: the shipped shape classifier sees S and no other shape.
Captions come from a `ShapesWorld` caption set ("heldout" templates are never trained on); image i is drawn with
its own generator seeded `seed + i`, so a figure does not depend on the batch size.
"""

from __future__ import annotations

import numpy as np
import torch

from .scorers import EVAL_SEED, colours_present, shapes_present
from .world import COLOURS, ShapesWorld, to_tensor


def one_shape_captions(n: int, caption_set: str = "heldout", seed: int = EVAL_SEED) -> tuple[list[str], list[dict]]:
    """`n` one-shape captions of `caption_set` and the shape each names (a label dict of `ShapesWorld.scene`)."""
    world = ShapesWorld(two_shape_prob=0.0)
    _, labels, captions = world.sample(n, seed, caption_set)
    return captions, [label["shapes"][0] for label in labels]


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
             batch_size: int = 64, **call_kwargs) -> np.ndarray:
    """uint8 (n, H, W, 3) images, image i from a generator seeded `seed + i`."""
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        images = pipe(batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                      output_type="np", **call_kwargs).images
        chunks.append(to_uint8(images))
    return np.concatenate(chunks)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """The pipeline's float images in [0, 1] as the uint8 pixels the scorers read."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _colour_right(colours: list[set[str]], named: list[dict]) -> np.ndarray:
    return np.array([found == {item["colour"]} for found, item in zip(colours, named)])


def score(images: np.ndarray, named: list[dict]) -> dict[str, np.ndarray]:
    """Per image: colour right, shape right (the module's definitions) and whether the named colour is present."""
    colours = [colours_present(image) for image in images]
    shapes = [shapes_present(image) for image in images]
    return {
        "colour_right": _colour_right(colours, named),
        "shape_right": np.array([found == {item["shape"]} for found, item in zip(shapes, named)]),
        "colour_present": np.array([item["colour"] in found for found, item in zip(colours, named)]),
    }


def t2i_quality(pipe, n: int = 300, caption_set: str = "heldout", steps: int = 20, guidance_scale: float = 3.0,
                seed: int = 0) -> dict[str, float]:
    """Shares of `n` captions drawn colour right, shape right and both; the named colour's presence per colour."""
    captions, named = one_shape_captions(n, caption_set)
    marks = score(generate(pipe, captions, steps, guidance_scale, seed), named)
    figures = {"colour_right": marks["colour_right"].mean(), "shape_right": marks["shape_right"].mean(),
               "both_right": (marks["colour_right"] & marks["shape_right"]).mean()}
    for colour in COLOURS:
        chosen = np.array([item["colour"] == colour for item in named])
        if chosen.any():
            figures[f"{colour}_present"] = marks["colour_present"][chosen].mean()
    return {name: round(float(value), 4) for name, value in figures.items()}


@torch.no_grad()
def vae_roundtrip(pipe, n: int = 300, caption_set: str = "heldout", seed: int = EVAL_SEED) -> dict[str, float]:
    """Colour right of `n` rendered one-shape images after the VAE alone (encode to the latent mean, decode).

    The ceiling the VAE puts on the pipeline's colour right: a hue the decoder blends into its neighbour is lost
    whatever the UNet draws.
    """
    pixels, labels, _ = ShapesWorld(two_shape_prob=0.0).sample(n, seed, caption_set)
    vae = pipe.vae
    images = to_tensor(pixels).to(vae.device, vae.dtype)
    decoded = torch.cat([vae.decode(vae.encode(images[i:i + 100]).latent_dist.mean).sample
                         for i in range(0, n, 100)])
    back = to_uint8(pipe.image_processor.postprocess(decoded.float(), output_type="np"))
    right = _colour_right([colours_present(image) for image in back], [label["shapes"][0] for label in labels])
    return {"vae_colour_right": round(float(right.mean()), 4)}
