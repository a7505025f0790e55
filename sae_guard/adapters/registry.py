"""Which adapter handles a model: the families in the order they are asked, imported only when asked.

A new family adds one "module:Class" line to `FAMILIES` (before the text fallback); its `matches(model)` must be cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Adapter

FAMILIES: list[str] = [
    "sae_guard.adapters.lm:LMAdapter",  # causal LMs (GPT-2, Llama, Gemma layouts): chats, generate-time scopes
    "sae_guard.adapters.vision:VisionAdapter",  # timm image models, open_clip CLIP models
    "sae_guard.adapters.text:TextAdapter",  # transformers text models: the fallback for anything with a tokenizer
]


def adapter_class(path: str) -> type[Adapter]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def adapter_for(model: Any, tokenizer: Any = None, **options: Any) -> Adapter:
    """The first family whose `matches(model)` accepts it; a plain module without a family gets the base adapter
    (tensor inputs only)."""
    for path in FAMILIES:
        cls = adapter_class(path)
        if cls.matches(model):
            return cls(model, tokenizer=tokenizer, **options)
    return Adapter(model, tokenizer=tokenizer, **options)
