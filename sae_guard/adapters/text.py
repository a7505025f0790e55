"""transformers text models: tokenizing inputs, which tokens are real, default hookpoints.

Works for encoders (BERT/MiniLM, CLIP text towers, T5 encoders) and decoder LMs (GPT-2 and kin).
Real tokens come from the attention mask when the call has one; CLIP text towers are called
without one in diffusers, so there the real tokens run up to and including the first EOS (CLIP's
legacy configs with eos_token_id=2 mark the end with the largest token id, as transformers does).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..hooks.hookpoints import Hookpoint, numbered_containers


def is_clip_text(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") in ("clip_text_model", "clip")


def eos_mask(model: nn.Module, input_ids: Tensor) -> Tensor:
    """(B, T) bool: positions up to and including each row's first end-of-text token."""
    config = getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    if is_clip_text(model) and eos == 2:  # legacy CLIP configs: the EOT token has the largest id
        end = input_ids.argmax(-1)
    elif eos is not None:
        is_eos = input_ids == eos
        end = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1))
    else:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None] <= end[:, None]


def mask_fn_for(model: nn.Module):
    """The gate's real-token reader for calls of `model` (attention mask, else the EOS rule)."""

    def mask(args: tuple, kwargs: dict) -> Tensor | None:
        attention = kwargs.get("attention_mask")
        if attention is None and len(args) > 1 and isinstance(args[1], Tensor):
            attention = args[1]
        if attention is not None:
            return attention.bool()
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        if ids is None:
            return None
        return eos_mask(model, ids)

    return mask


def tokenize(tokenizer: Any, model: nn.Module, texts: Sequence[str], device: torch.device) -> dict[str, Tensor]:
    """Model inputs for `texts`, as the model is usually called (CLIP: padded to 77, no attention mask).

    Texts longer than the model's context are truncated to it, as the model itself would see them.
    """
    if isinstance(texts, str):
        texts = [texts]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"inputs must be strings; input {bad[0]} is a {type(texts[bad[0]]).__name__}")
    if is_clip_text(model):
        enc = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device)}
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or tokenizer.model_max_length
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=min(limit, tokenizer.model_max_length),
                    return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def default_hookpoint(model: nn.Module) -> str:
    """Two-thirds of the way through the layer stack: where text encoders hold concepts (ItD: 8 of 12)."""
    containers = numbered_containers(model)
    if not containers:
        raise ValueError(f"cannot guess a hookpoint in {type(model).__name__}; pass hookpoint=...")
    name, _, span = containers[0].rpartition(".")
    n_layers = int(span.strip("[]").split("-")[1]) + 1
    return f"{name}.{max(0, (2 * n_layers) // 3)}"


def real_tokens(hookpoint: Hookpoint, inputs: dict[str, Tensor]) -> Tensor:
    return mask_fn_for(hookpoint.model)((), inputs)
