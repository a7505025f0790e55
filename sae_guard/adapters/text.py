"""transformers text models: tokenizing inputs, which tokens are real, default hookpoints.

Works for encoders (BERT/MiniLM, CLIP text towers, T5 encoders) and decoder LMs (GPT-2 and kin).
Real tokens come from the attention mask when the call has one; CLIP text towers are called
without one in diffusers, so there the real tokens run up to and including the first EOS (CLIP's
legacy configs with eos_token_id=2 mark the end with the largest token id, as transformers does).
Of the real tokens, only content tokens score: special tokens ([CLS], [SEP], BOS, EOS) say nothing about the prompt,
and a concept latent firing on them would flag every prompt, even "cat" or "".
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..hooks.hookpoints import Hookpoint
from .base import Adapter, MaskFn, ModelCall, device_of


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


def mask_fn_for(model: nn.Module, special_ids: Sequence[int] = ()):
    """The gate's reader of scoring positions for calls of `model`: real tokens (attention mask, else the EOS rule)
    that are not special tokens (`special_ids`: [CLS], [SEP], BOS, EOS, padding carry no prompt of their own)."""
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)

    def mask(args: tuple, kwargs: dict) -> Tensor | None:
        attention = kwargs.get("attention_mask")
        if attention is None and len(args) > 1 and isinstance(args[1], Tensor):
            attention = args[1]
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        if attention is not None:
            real = attention.bool()
        elif ids is not None:
            real = eos_mask(model, ids)
        else:
            return None
        if ids is None or not special.numel():
            return real
        real = real[:, -ids.shape[1]:] if real.shape[-1] > ids.shape[1] else real  # a decode step reads the last
        return real & ~torch.isin(ids, special.to(ids.device))

    return mask


def special_ids(tokenizer: Any) -> list[int]:
    """The ids a tokenizer reserves for special tokens (none for a tokenizer that does not say)."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # pipelines' PaddedTokenizer wraps the real one
    return [int(i) for i in getattr(inner, "all_special_ids", None) or [] if i is not None]


def context_length(tokenizer: Any, model: nn.Module) -> int:
    """How many tokens one call of `model` reads: its position table or the tokenizer's limit, the smaller."""
    if is_clip_text(model):
        return tokenizer.model_max_length
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or tokenizer.model_max_length
    return min(limit, tokenizer.model_max_length)


def tokenize(tokenizer: Any, model: nn.Module, texts: Sequence[str], device: torch.device) -> dict[str, Tensor]:
    """Model inputs for `texts`, as the model is usually called (CLIP: padded to 77, no attention mask).

    Texts longer than the model's context are truncated to it, as the model itself would see them (see `windows`
    for reading all of a long text).
    """
    if isinstance(texts, str):
        texts = [texts]
    check_strings(texts)
    if is_clip_text(model):
        enc = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device)}
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=context_length(tokenizer, model),
                    return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def check_strings(texts: Any) -> None:
    if texts is None or isinstance(texts, (bytes, Tensor)) or not hasattr(texts, "__len__"):
        raise TypeError(f"inputs must be a string or a list of strings, got {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"inputs must be strings; input {bad[0]} is a {type(texts[bad[0]]).__name__}")


def windows(tokenizer: Any, model: nn.Module, text: str) -> list[str]:
    """`text` as one piece, or, when it holds more tokens than one call of `model` reads, as overlapping windows
    that each fit (half a window apart, so a phrase cut by one window's edge lies whole inside the next)."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    ids = inner(text, add_special_tokens=False, verbose=False)["input_ids"]
    fits = context_length(tokenizer, model) - inner.num_special_tokens_to_add(pair=False)
    if len(ids) <= fits:
        return [text]
    step = max(1, fits // 2)
    starts = list(range(0, len(ids) - fits + step, step))
    return [inner.decode(ids[s : s + fits]) for s in starts]


class TextAdapter(Adapter):
    """transformers text models (encoders, CLIP text towers, decoder LMs) read through their tokenizer.

    Scores rest on content tokens: special tokens ([CLS], [SEP], BOS, EOS, padding) never carry a verdict.
    A prompt longer than one call reads is scored over every window of it (`windows`), the largest score taken, so
    `classify` never drops the end of a prompt; its verdict says how many windows were read.
    """

    name = "text"

    @classmethod
    def matches(cls, model: Any) -> bool:
        return isinstance(model, nn.Module) and getattr(model, "config", None) is not None

    def prepare(self, model: nn.Module, inputs: Sequence[Any]) -> ModelCall:
        if self.tokenizer is None:
            raise ValueError("classifying or fitting on strings needs a tokenizer: pass tokenizer=... to guard()")
        if isinstance(inputs, str):
            inputs = [inputs]
        check_strings(inputs)
        pieces, owners = [], []
        for number, one in enumerate(inputs):
            parts = windows(self.tokenizer, model, one)
            pieces += parts
            owners += [number] * len(parts)
        encoded = tokenize(self.tokenizer, model, pieces, device_of(model))
        return ModelCall((), encoded, torch.tensor(owners, dtype=torch.long), len(inputs))

    def probe_inputs(self) -> list[Any] | None:
        return ["a"] if self.tokenizer is not None else None

    def positions(self, model: nn.Module) -> MaskFn:
        return mask_fn_for(model, special_ids(self.tokenizer) if self.tokenizer is not None else ())


def default_hookpoint(model: nn.Module) -> str:
    return Adapter(model).default_hookpoint(model)


def real_tokens(hookpoint: Hookpoint, inputs: dict[str, Tensor], tokenizer: Any = None) -> Tensor:
    """The scoring positions of `inputs` (content tokens when the tokenizer is given)."""
    return mask_fn_for(hookpoint.model, special_ids(tokenizer) if tokenizer is not None else ())((), inputs)
