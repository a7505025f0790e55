"""Pixel scorers for ShapesWorld: which colours and which shapes an image shows, read from the pixels alone.

`colours_present` is analytic. Every pixel is read as its difference from the background (the image's median
colour). A blend of a palette colour with an achromatic background, as on an anti-aliased edge, differs from the
background by a multiple of (colour - grey), whose hue is the colour's own; a global tint cancels too. A pixel
votes for the palette colour of nearest hue when that difference is chromatic enough and the hue is near; votes
count only where neighbours agree, so scattered noise never adds up; a colour is present when it has enough
votes. Measured: 1.000 on clean images, >= 0.99 under blur + noise + tint, hue drifts of 10 degrees, JPEG 50.

`shapes_present` is a small CNN on the image's silhouette (distance of every pixel from the background), so it
reads geometry, never colour. It is trained on rendered images, a third of them JPEG-degraded, under augmentations
of what a generator's output looks like (coarse resampling, blur, tint, low contrast, noise). It ships as
`sae_guard/assets/shapes_scorer/{model.safetensors,cfg.json}` (accuracies in cfg.json and
model_cards/shapes-scorer.md); `python -m sae_guard.shapes.scorers --train` retrains it and prints its accuracy
on fresh images.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .world import COLOURS, PALETTE, SHAPES, ShapesWorld

SHAPE_SCORER_DIR = Path(__file__).resolve().parents[1] / "assets" / "shapes_scorer"
EVAL_SEED = 10_000  # world seed of the evaluation images; training uses seed 0 unless told otherwise


def palette_hues() -> dict[str, float]:
    """HSV hue (degrees) of every palette colour."""
    rgb = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)[:, None, :] / 255.0
    return dict(zip(COLOURS, _hue_chroma(rgb)[0][:, 0].tolist()))


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel HSV hue in degrees and chroma (max - min channel) of (..., 3) colours or colour differences."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(high == r, ((g - b) / safe) % 6.0, np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return hue * 60.0, chroma


def _as_hwc_float(image) -> np.ndarray:
    """A PIL image, or an (H, W, 3) / (3, H, W) array or tensor (uint8, or float in [0, 1]) as (H, W, 3) floats."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ValueError(f"expected one RGB image (H, W, 3) or (3, H, W), got shape {array.shape}")
    if array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def colour_areas(image, min_chroma: float = 0.25, max_hue_distance: float = 25.0,
                 min_neighbours: int = 3) -> dict[str, int]:
    """How many pixels of `image` read as each palette colour (all colours, zeros included).

    Pixels are read as their difference from the background (the per-channel median: shapes cover well under
    half of any ShapesWorld image). A blend `a * colour + (1 - a) * background` then has the colour's own hue
    whatever the background's grey level or tint, so edges and tinted images are read right. A pixel votes for
    the palette colour of nearest hue when that difference has chroma at least `min_chroma` and the hue is within
    `max_hue_distance` degrees; a vote counts only when at least `min_neighbours` of its 8 neighbours vote the
    same way, so scattered noise pixels never add up to a shape.
    """
    pixels = _as_hwc_float(image)
    hue, chroma = _hue_chroma(pixels - np.median(pixels.reshape(-1, 3), axis=0))
    distance = np.abs(hue[..., None] - np.array(list(palette_hues().values())))
    distance = np.minimum(distance, 360.0 - distance)
    votes = (chroma >= min_chroma) & (distance.min(axis=-1) <= max_hue_distance)
    one_hot = (distance.argmin(axis=-1)[..., None] == np.arange(len(COLOURS))) & votes[..., None]
    counted = one_hot & (_neighbour_count(one_hot) >= min_neighbours)
    return dict(zip(COLOURS, counted.sum(axis=(0, 1)).tolist()))


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """For an (H, W, C) boolean mask, how many of each pixel's 8 neighbours are set, per channel."""
    padded = np.pad(mask.astype(np.int32), ((1, 1), (1, 1), (0, 0)))
    height, width = mask.shape[:2]
    total = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))
    return total - mask


def colours_present(image, min_area_fraction: float = 0.005, min_chroma: float = 0.25,
                    max_hue_distance: float = 25.0, min_neighbours: int = 3) -> set[str]:
    """Palette colours covering at least `min_area_fraction` of the image (5 pixels at 32x32)."""
    areas = colour_areas(image, min_chroma, max_hue_distance, min_neighbours)
    height, width = _as_hwc_float(image).shape[:2]
    min_pixels = max(2, round(min_area_fraction * height * width))
    return {colour for colour, count in areas.items() if count >= min_pixels}


def silhouette(batch: Tensor) -> Tensor:
    """(n, 3, H, W) in [0, 1] -> (n, 1, H, W): each pixel's distance from the background (per-image median).

    Colour and background drop out, so the classifier sees geometry only, and a shape drawn in an unexpected
    colour (or in grey, after a colour was erased) is still found.
    """
    background = batch.flatten(2).median(dim=2).values[:, :, None, None]
    return (batch - background).norm(dim=1, keepdim=True) / 3**0.5


class ShapeClassifier(nn.Module):
    """On the silhouette: four 3x3 conv blocks (batch-normed, max-pooled between), a global max pool, one logit
    per shape ("is there one?")."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 64), shapes: tuple[str, ...] = SHAPES,
                 image_size: int = 32):
        super().__init__()
        self.shapes, self.image_size, self.channels = tuple(shapes), image_size, tuple(channels)
        widths = (1, *channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(channels[-1], len(shapes))

    def forward(self, images: Tensor) -> Tensor:
        """(n, 3, S, S) floats in [0, 1] -> (n, n_shapes) logits."""
        x = silhouette(images)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1:
                x = F.max_pool2d(x, 2)
        return self.head(x.amax(dim=(2, 3)))

    def cfg(self) -> dict:
        return {"architecture": "ShapeClassifier", "channels": list(self.channels), "shapes": list(self.shapes),
                "image_size": self.image_size}


def images_to_batch(images, image_size: int = 32) -> Tensor:
    """uint8 (n, H, W, 3) arrays/tensors, or floats in [0, 1], -> float (n, 3, S, S), area-resized to S."""
    batch = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.shape[-1] == 3:
        batch = batch.permute(0, 3, 1, 2)
    batch = batch.float().div(255.0) if batch.dtype == torch.uint8 else batch.float().clamp(0.0, 1.0)
    if batch.shape[-1] != image_size:
        batch = F.interpolate(batch, size=(image_size, image_size), mode="area")
    return batch.contiguous()


def augment(batch: Tensor, generator: torch.Generator) -> Tensor:
    """What separates a generator's image from a clean render: mirrored, coarse, blurred, tinted, low contrast,
    noisy."""
    n = batch.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    coarse = torch.rand(n, generator=generator) < 0.25
    resampled = F.interpolate(F.avg_pool2d(batch, 2), scale_factor=2, mode="bilinear", align_corners=False)
    batch = torch.where(coarse[:, None, None, None], resampled, batch)
    blur = torch.rand(n, 1, 1, 1, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5)
    blurred = F.avg_pool2d(F.pad(batch, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    batch = (1 - blur) * batch + blur * blurred
    contrast = 0.6 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    tint = 0.08 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    batch = (batch - mean) * contrast + mean + tint
    noise = 0.08 * torch.rand(n, 1, 1, 1, generator=generator)
    return (batch + noise * torch.randn(batch.shape, generator=generator)).clamp(0.0, 1.0)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """A uint8 (H, W, 3) image after JPEG at `quality`: blocky, ringing, colour bled, as a generator's often are."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def shape_targets(labels: list[dict], shapes: tuple[str, ...] = SHAPES) -> Tensor:
    """(n, n_shapes) 0/1 presence of every shape in every label dict."""
    return torch.tensor([[float(any(item["shape"] == s for item in label["shapes"])) for s in shapes]
                         for label in labels])


def train_shape_classifier(steps: int = 1000, batch_size: int = 128, pool: int = 10_000, lr: float = 3e-3,
                           seed: int = 0, image_size: int = 32, log_every: int = 250) -> ShapeClassifier:
    """Train on a pool of rendered images (world seed `seed`; a third JPEG-degraded at quality 20-80), augmented
    afresh at every step."""
    torch.manual_seed(seed)
    world = ShapesWorld(image_size=image_size)
    images, labels, _ = world.sample(pool, seed)
    rng = np.random.default_rng(seed)
    for i in np.flatnonzero(rng.random(pool) < 1 / 3):
        images[i] = jpeg_roundtrip(images[i], int(rng.integers(20, 81)))
    inputs, targets = images_to_batch(images, image_size), shape_targets(labels)
    model = ShapeClassifier(image_size=image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(pool, (batch_size,), generator=generator)
        loss = F.binary_cross_entropy_with_logits(model(augment(inputs[index], generator)), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    return model.eval()


DEGRADATIONS = ("none", "augment", "jpeg50", "jpeg25")


def degraded_images(n: int, seed: int = EVAL_SEED, image_size: int = 32,
                    degradation: str = "none") -> tuple[Tensor, list[dict]]:
    """`n` fresh images as float (n, 3, S, S), clean or degraded (the training augmentations, or JPEG at quality
    50 / 25), with their labels: the test conditions both scorers are measured under."""
    if degradation not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {DEGRADATIONS}, got {degradation!r}")
    images, labels, _ = ShapesWorld(image_size=image_size).sample(n, seed)
    if degradation.startswith("jpeg"):
        images = np.stack([jpeg_roundtrip(image, int(degradation[4:])) for image in images])
    batch = images_to_batch(images, image_size)
    if degradation == "augment":
        batch = augment(batch, torch.Generator().manual_seed(seed))
    return batch, labels


@torch.no_grad()
def evaluate_shape_classifier(model: ShapeClassifier, batch: Tensor, labels: list[dict],
                              threshold: float = 0.5) -> dict[str, float]:
    """Exact-set accuracy (every shape right), per-label accuracy and per-shape accuracy on labelled images."""
    inputs = images_to_batch(batch, model.image_size)
    predicted = torch.cat([torch.sigmoid(model(chunk)) for chunk in inputs.split(512)]) >= threshold
    correct = predicted == shape_targets(labels, model.shapes).bool()
    figures = {"exact_set": correct.all(dim=1).float().mean().item(), "per_label": correct.float().mean().item()}
    figures |= {f"shape_{s}": correct[:, i].float().mean().item() for i, s in enumerate(model.shapes)}
    return figures


def evaluate_colour_scorer(batch: Tensor, labels: list[dict]) -> float:
    """Share of labelled images whose `colours_present` is exactly the labelled set of colours."""
    return float(np.mean([colours_present(image) == {item["colour"] for item in label["shapes"]}
                          for image, label in zip(batch, labels)]))


def save_shape_classifier(model: ShapeClassifier, folder: str | Path = SHAPE_SCORER_DIR, **extra) -> None:
    """Write `model.safetensors` and `cfg.json` (architecture, threshold, and whatever `extra` records)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(model.cfg() | {"threshold": 0.5} | extra, indent=2) + "\n")


def load_shape_classifier(folder: str | Path = SHAPE_SCORER_DIR) -> tuple[ShapeClassifier, float]:
    """The classifier saved in `folder` and its decision threshold."""
    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    model = ShapeClassifier(tuple(cfg["channels"]), tuple(cfg["shapes"]), cfg["image_size"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), float(cfg["threshold"])


@lru_cache(maxsize=4)
def _shipped(folder: str) -> tuple[ShapeClassifier, float]:
    return load_shape_classifier(folder)


@torch.no_grad()
def shape_probabilities(images, folder: str | Path = SHAPE_SCORER_DIR) -> dict[str, Tensor]:
    """Per shape, the (n,) probability that each image shows one (images as in `images_to_batch`)."""
    model, _ = _shipped(str(folder))
    probabilities = torch.sigmoid(model(images_to_batch(images, model.image_size)))
    return {shape: probabilities[:, i] for i, shape in enumerate(model.shapes)}


def shapes_present(image, folder: str | Path = SHAPE_SCORER_DIR) -> set[str]:
    """The shapes the shipped classifier sees in one image (PIL, (H, W, 3) or (3, H, W); uint8 or [0, 1])."""
    _, threshold = _shipped(str(folder))
    batch = torch.from_numpy(_as_hwc_float(image)).float()[None]
    return {shape for shape, p in shape_probabilities(batch, folder).items() if p.item() >= threshold}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the ShapesWorld shape classifier and print its accuracy.")
    parser.add_argument("--train", action="store_true", help="train and save (otherwise evaluate the saved one)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pool", type=int, default=10_000, help="rendered training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(SHAPE_SCORER_DIR))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train:
        start = time.perf_counter()
        model = train_shape_classifier(args.steps, args.batch_size, args.pool, seed=args.seed)
        seconds = time.perf_counter() - start
    else:
        model, _ = load_shape_classifier(args.out)
    shape_accuracy, colour_accuracy = {}, {}
    for size in (32, 64):
        for degradation in DEGRADATIONS:
            batch, labels = degraded_images(args.eval_n, EVAL_SEED, size, degradation)
            shape_accuracy[f"{size}px_{degradation}"] = evaluate_shape_classifier(model, batch, labels)
            colour_accuracy[f"{size}px_{degradation}"] = round(evaluate_colour_scorer(batch, labels), 4)
    exact = {name: round(figures["exact_set"], 4) for name, figures in shape_accuracy.items()}
    print("shape scorer, exact-set accuracy:", json.dumps(exact, indent=2))
    print("colour scorer, exact-set accuracy:", json.dumps(colour_accuracy, indent=2))
    if args.train:
        training = {"steps": args.steps, "batch_size": args.batch_size, "pool": args.pool, "seed": args.seed,
                    "seconds": round(seconds, 1)}
        accuracy = {"eval_n": args.eval_n, "eval_seed": EVAL_SEED} | shape_accuracy
        save_shape_classifier(model, args.out, training=training, accuracy=accuracy)
        print(f"trained in {seconds:.0f} s; saved to {args.out}")


if __name__ == "__main__":
    main()
