"""ShapesWorld vision backbones: a small timm ViT and a small open_clip dual encoder, trained here in minutes on CPU.

Why: vision guards (SAEs on ViT tokens, concepts per colour and shape, gates in a CLIP vision tower) need backbones
whose content is known exactly. ShapesWorld gives that; these two models are small enough to train by one command
on two CPU cores, and are saved in stock formats so the stock loaders read them back:

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"), **kwargs)
    open_clip.add_model_config(".../shapes-clip.json")
    open_clip.create_model_and_transforms("shapes-clip", pretrained=".../open_clip_model.safetensors")

`load_vit()` and `load_clip()` do exactly that from the shipped assets.

The ViT is a multi-label classifier (which of the 6 colours and 5 shapes are present), so its tokens carry colour
and shape. The CLIP model is trained contrastively on the `train` captions; zero-shot it classifies colour and
shape from prompts alone (`zero_shot_accuracy`).

Train (one thread each, a few minutes):
    python -m sae_guard.shapes.vision vit  --out sae_guard/assets/shapes-vit
    python -m sae_guard.shapes.vision clip --out sae_guard/assets/shapes-clip
    python -m sae_guard.shapes.vision vit  --out sae_guard/assets/shapes-vit-ood --hold-out purple star ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .world import COLOURS, SHAPES, ShapesWorld, to_tensor

ASSETS = Path(__file__).resolve().parent.parent / "assets"
VIT_DIR, CLIP_DIR = ASSETS / "shapes-vit", ASSETS / "shapes-clip"
LABELS: tuple[str, ...] = COLOURS + SHAPES  # the ViT's outputs, in order

# The timm architecture: a stock VisionTransformer with these keyword arguments (recorded in config.json too).
VIT_NAME = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0,
                  num_classes=len(LABELS))
CLIP_NAME = "shapes-clip"
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3, "mlp_ratio": 2.0},
}
# Pixels in [-1, 1] (sae_guard.shapes.to_tensor); open_clip's transforms are told so at load.
CLIP_MEAN = CLIP_STD = (0.5, 0.5, 0.5)
# Seeds: training images and held-out images never overlap (ShapesWorld images depend only on (seed, index)).
TRAIN_SEED, HELDOUT_SEED = 1000, 2000


def presence(labels: list[dict]) -> Tensor:
    """(n, 11) float: which colours and shapes each image contains (the ViT's multi-label target)."""
    target = torch.zeros(len(labels), len(LABELS))
    for row, scene in enumerate(labels):
        for item in scene["shapes"]:
            target[row, LABELS.index(item["colour"])] = 1.0
            target[row, LABELS.index(item["shape"])] = 1.0
    return target


def heldout_images(n: int, *, single: bool = True, start: int = 0, world: ShapesWorld | None = None):
    """Held-out images (seed HELDOUT_SEED) of `world` (default: all of ShapesWorld); `single`: one shape each, so
    colour and shape have one true answer."""
    world = world or ShapesWorld()
    if single:
        world = dataclasses.replace(world, two_shape_prob=0.0)
    return world.sample(n, seed=HELDOUT_SEED, start=start)


def sub_world(hold_out: Sequence[str] = ()) -> ShapesWorld:
    """ShapesWorld without the colours and shapes named in `hold_out` (e.g. ("purple", "star")): a model trained on
    it has never seen them, so images showing them are truly out of its distribution."""
    unknown = set(hold_out) - set(LABELS)
    if unknown:
        raise ValueError(f"cannot hold out {sorted(unknown)}: name colours {COLOURS} or shapes {SHAPES}")
    colours = tuple(c for c in COLOURS if c not in hold_out)
    shapes = tuple(s for s in SHAPES if s not in hold_out)
    if not colours or not shapes:
        raise ValueError(f"holding out {tuple(hold_out)} leaves no colour or no shape to train on")
    return ShapesWorld(colours=colours, shapes=shapes)


# ---------------------------------------------------------------- ViT
def build_vit(pretrained_file: str | Path | None = None):
    """The stock timm VisionTransformer; with `pretrained_file`, weights read by timm's own pretrained loader."""
    import timm
    if pretrained_file is None:
        return timm.create_model(VIT_NAME, pretrained=False, **VIT_KWARGS)
    # num_classes in the overlay too: else timm sees 1000 pretrained classes and drops the trained head.
    overlay = dict(file=str(pretrained_file), num_classes=VIT_KWARGS["num_classes"], input_size=(3, 32, 32),
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return timm.create_model(VIT_NAME, pretrained=True, pretrained_cfg_overlay=overlay, **VIT_KWARGS)


def load_vit(directory: str | Path = VIT_DIR):
    """The shipped ShapesWorld ViT in eval mode (inputs: float (n, 3, 32, 32) in [-1, 1], see `to_tensor`)."""
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"no ShapesWorld ViT weights in {directory}; train them with "
                                f"`python -m sae_guard.shapes.vision vit --out {directory}`")
    return build_vit(directory / "model.safetensors").eval()


def _fit(model: nn.Module, n: int, batch_loss, *, epochs: int, batch_size: int, lr: float, log, name: str) -> None:
    """AdamW with warm-up and cosine decay over shuffled mini-batches of `n` examples; `batch_loss(indices)` gives
    a batch's loss. Both ShapesWorld vision models train this way; the model is left in eval mode."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = n // batch_size
    schedule = _warmup_cosine(optimiser, epochs * steps_per_epoch)
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n)
        total = 0.0
        for i in range(steps_per_epoch):
            loss = batch_loss(order[i * batch_size:(i + 1) * batch_size])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        log(f"{name} epoch {epoch + 1}/{epochs} loss {total / steps_per_epoch:.4f} "
            f"({time.perf_counter() - started:.0f}s)")
    model.eval()


def train_vit(out: str | Path, *, n_train: int = 12000, epochs: int = 12, batch_size: int = 128, lr: float = 2e-3,
              seed: int = 0, hold_out: Sequence[str] = (), log=print) -> dict:
    """Train the ViT on presence labels and save it (safetensors + config.json); returns held-out metrics.
    `hold_out`: colours and shapes never shown in training (`sub_world`); the head keeps all 11 outputs, and the
    held-out metrics are measured on the same sub-world."""
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    world = sub_world(hold_out) if hold_out else ShapesWorld()
    images, labels, _ = world.sample(n_train, seed=TRAIN_SEED)
    x, y = to_tensor(images), presence(labels)
    model = build_vit()
    started = time.perf_counter()
    _fit(model, len(x), lambda batch: F.binary_cross_entropy_with_logits(model(_augment(x[batch])), y[batch]),
         epochs=epochs, batch_size=batch_size, lr=lr, log=log, name="vit")
    metrics = vit_accuracy(model, world=world)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architecture": VIT_NAME, "model_args": VIT_KWARGS, "labels": list(LABELS),
        "input": "float (n, 3, 32, 32) in [-1, 1] (sae_guard.shapes.to_tensor)",
        "training": {"n_train": n_train, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                     "train_seed": TRAIN_SEED, "seconds": round(time.perf_counter() - started)},
        **({"held_out": {"colours": [c for c in COLOURS if c not in world.colours],
                         "shapes": [s for s in SHAPES if s not in world.shapes]}} if hold_out else {}),
        "heldout": metrics}, indent=2) + "\n")
    return metrics


def vit_accuracy(model, n: int = 1000, world: ShapesWorld | None = None) -> dict:
    """Held-out single-shape images of `world` (default: all of ShapesWorld): accuracy of the arg-max colour and
    arg-max shape."""
    images, labels, _ = heldout_images(n, world=world)
    with torch.no_grad():
        logits = model(to_tensor(images))
    colour = logits[:, :len(COLOURS)].argmax(1)
    shape = logits[:, len(COLOURS):].argmax(1)
    true_colour = torch.tensor([COLOURS.index(s["shapes"][0]["colour"]) for s in labels])
    true_shape = torch.tensor([SHAPES.index(s["shapes"][0]["shape"]) for s in labels])
    return {"n": n, "colour": (colour == true_colour).float().mean().item(),
            "shape": (shape == true_shape).float().mean().item()}


def _warmup_cosine(optimiser, steps: int):
    """Linear warm-up over the first 10% of steps, then cosine decay to zero."""
    warm = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / warm) * 0.5 * (
        1 + np.cos(np.pi * min(1.0, max(0, step - warm) / max(1, steps - warm)))))


def _augment(x: Tensor) -> Tensor:
    """Horizontal flips: every shape and colour is flip-invariant except a shape's tilt, which is labelled by none."""
    flip = torch.rand(len(x)) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ---------------------------------------------------------------- CLIP
def register_clip_config(directory: str | Path = CLIP_DIR) -> None:
    """Make `shapes-clip` a name open_clip knows (its config json lives beside the weights)."""
    import open_clip
    path = Path(directory) / f"{CLIP_NAME}.json"
    if CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(path)


def load_clip(directory: str | Path = CLIP_DIR):
    """(model, preprocess, tokenizer) of the shipped ShapesWorld CLIP, read by open_clip's own loaders."""
    import open_clip
    directory = Path(directory)
    weights = directory / "open_clip_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no ShapesWorld CLIP weights in {directory}; train them with "
                                f"`python -m sae_guard.shapes.vision clip --out {directory}`")
    register_clip_config(directory)
    model, _, preprocess = open_clip.create_model_and_transforms(
        CLIP_NAME, pretrained=str(weights), image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return model.eval(), preprocess, open_clip.get_tokenizer(CLIP_NAME)


def train_clip(out: str | Path, *, n_train: int = 12000, epochs: int = 20, batch_size: int = 128,
               lr: float = 2e-3, seed: int = 0, log=print) -> dict:
    """Train the dual encoder contrastively on `train` captions; save config json + safetensors; held-out metrics."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{CLIP_NAME}.json").write_text(json.dumps(CLIP_CONFIG, indent=2) + "\n")
    register_clip_config(out)
    model = open_clip.create_model(CLIP_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(CLIP_NAME)
    images, _, captions = ShapesWorld().sample(n_train, seed=TRAIN_SEED)
    x, tokens = to_tensor(images), tokenizer(captions)
    def contrastive(batch: Tensor) -> Tensor:
        image_features, text_features, scale = model(_augment(x[batch]), tokens[batch])
        logits = scale * image_features @ text_features.T
        # Captions repeat within a batch (36 colour-shape pairs); rows with the same caption are all positives.
        same = (tokens[batch][:, None, :] == tokens[batch][None, :, :]).all(-1).float()
        targets = same / same.sum(1, keepdim=True)
        return 0.5 * (torch.sum(-targets * logits.log_softmax(1), 1).mean()
                      + torch.sum(-targets * logits.T.log_softmax(1), 1).mean())

    started = time.perf_counter()
    _fit(model, len(x), contrastive, epochs=epochs, batch_size=batch_size, lr=lr, log=log, name="clip")
    metrics = zero_shot_accuracy(model, tokenizer)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / "training.json").write_text(json.dumps({
        "n_train": n_train, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "train_seed": TRAIN_SEED, "seconds": round(time.perf_counter() - started), "heldout": metrics},
        indent=2) + "\n")
    return metrics


def class_text_features(model, tokenizer, attribute: str) -> Tensor:
    """(classes, d) unit text embeddings of each colour (or shape), averaged over prompts naming every shape
    (colour) with it: prompt ensembling, so a class is not judged by one phrasing."""
    if attribute not in ("colour", "shape"):
        raise ValueError(f"attribute must be 'colour' or 'shape', got {attribute!r}")
    classes, others = (COLOURS, SHAPES) if attribute == "colour" else (SHAPES, COLOURS)
    features = []
    with torch.no_grad():
        for name in classes:
            prompts = [f"a {name} {o}" if attribute == "colour" else f"a {o} {name}" for o in others]
            prompts = [p.replace("a orange", "an orange") for p in prompts]
            f = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).mean(0)
            features.append(F.normalize(f, dim=-1))
    return torch.stack(features)


def zero_shot_predict(model, tokenizer, pixels: Tensor, attribute: str) -> Tensor:
    """(n, classes) CLIP zero-shot probabilities of each colour (or shape) for images `pixels` in [-1, 1]."""
    text = class_text_features(model, tokenizer, attribute)
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels), dim=-1)
    return (model.logit_scale.exp() * image @ text.T).softmax(-1)


def zero_shot_accuracy(model, tokenizer, n: int = 1000) -> dict:
    """Held-out single-shape images: CLIP zero-shot accuracy of colour and of shape (targets 0.90 and 0.80)."""
    images, labels, _ = heldout_images(n)
    pixels = to_tensor(images)
    result = {"n": n}
    for attribute, classes in (("colour", COLOURS), ("shape", SHAPES)):
        truth = torch.tensor([classes.index(s["shapes"][0][attribute]) for s in labels])
        predicted = zero_shot_predict(model, tokenizer, pixels, attribute).argmax(1)
        result[attribute] = (predicted == truth).float().mean().item()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=["vit", "clip"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hold-out", nargs="+", default=(), metavar="NAME",
                        help="vit only: colours and shapes never shown in training (e.g. purple star)")
    args = parser.parse_args(argv)
    if args.hold_out and args.model != "vit":
        parser.error("--hold-out applies to the vit only")
    torch.set_num_threads(1)
    train = train_vit if args.model == "vit" else train_clip
    kwargs = {"seed": args.seed}
    if args.n_train is not None:
        kwargs["n_train"] = args.n_train
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    if args.hold_out:
        kwargs["hold_out"] = tuple(args.hold_out)
    print(json.dumps(train(args.out, **kwargs)))


if __name__ == "__main__":
    main()
