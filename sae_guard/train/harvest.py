"""Harvesting activations at a hookpoint: the data `sae_guard.train` learns from.

    acts = harvest(model, "transformer.h.6", texts, tokenizer=tok, context_size=1024)
    sae, figures = train(sae, acts, tokens=50_000_000)

A `Harvest` is re-iterable: every pass runs the model again over the same inputs and yields the same
(n_tokens, d) chunks, one per forward batch, real tokens only (padding never appears). Each forward
pass stops right after the hooked module (its hook raises), under `torch.no_grad` and eval mode.

Two ways to lay text out (`mode`):
- "block": tokenize every text, concatenate them (documents separated the way the tokenizer marks
  them; EOS appended where it marks neither end, as GPT-2 was trained) and cut the stream into rows
  of `context_size` tokens, the usual recipe for pre-training corpora (SAELens, sparsify);
- "sequential" (FAST; Li et al. 2025, "Training Superior Sparse Autoencoders for Instruct Models",
  arXiv 2506.07691): each instance in a row of its own, truncated at `context_size`, optionally
  rendered with the tokenizer's chat template so role and control tokens appear exactly as in
  fine-tuning. Rows never mix instances; batched rows are right-padded and masked.

A diffusers pipeline is harvested the way it runs its text encoder: each prompt alone, padded to
`context_size` (the tokenizer's `model_max_length`: 77 for CLIP), no attention mask passed; its real
tokens are those up to and including the first EOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..hooks.capture import capture_hidden
from ..hooks.hookpoints import Hookpoint, find_hookpoint

_MODES = ("block", "sequential")
_MAX_DEFAULT_CONTEXT = 1024
_TOKENIZE_GROUP = 256  # texts tokenized per call (the fast tokenizers batch them in Rust)


@dataclass
class _Batch:
    model_inputs: dict[str, Any]  # keyword arguments of the model call
    ids: Tensor  # (B, T) token ids, on the CPU
    real: Tensor  # (B, T) bool, on the CPU: the positions to harvest


class Harvest:
    """Activations of `model` at one hookpoint over fixed inputs; iterate for (n_tokens, d) chunks.

    Build with `harvest(...)`. Pass it as `data` to `sae_guard.train`, which replays it through a
    shuffle buffer for as many passes as the token budget needs.
    """

    def __init__(self, model: Any, hookpoint: str, inputs: Any, *, tokenizer: Any = None, mode: str | None = None,
                 context_size: int | None = None, batch_size: int = 8, device: str | torch.device | None = None,
                 chat_template: bool = False, dtype: torch.dtype = torch.float32, drop_bos: bool = False,
                 exclude_tokens: Sequence[int] = (), buffer_size: int | None = None) -> None:
        self.hookpoint: Hookpoint = find_hookpoint(model, hookpoint)
        component = self.hookpoint.component
        self._pipeline_style = component is not None
        if tokenizer is None and component is not None and component.startswith("text_encoder"):
            # diffusers pairs text_encoder with tokenizer, text_encoder_2 with tokenizer_2, ...
            tokenizer = getattr(model, component.replace("text_encoder", "tokenizer"), None)
        mode = mode or ("sequential" if self._pipeline_style else "block")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if mode == "block" and self._pipeline_style:
            raise ValueError("a pipeline encodes each prompt on its own; harvest its text encoder with mode='sequential'")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tokenizer, self.mode, self.chat_template, self.dtype = tokenizer, mode, chat_template, dtype
        self._batch_size = batch_size
        self.buffer_size = buffer_size  # read by sae_guard.train's shuffle buffer
        self.context_size = context_size or self._default_context()
        self.device = torch.device(device) if device is not None else _device_of(self.hookpoint.model)
        self._rows_given, self._instances = _normalise_inputs(inputs)
        if self._instances and tokenizer is None and any(isinstance(x, (str, list)) and not _is_ids(x)
                                                         for x in self._instances):
            raise ValueError("text inputs need a tokenizer: pass tokenizer=... (or pre-tokenized input_ids)")
        if chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self._excluded = torch.tensor(sorted(set(exclude_tokens) | ({self._bos_id()} if drop_bos else set())),
                                      dtype=torch.long)
        self._d_in: int | None = None

    # ------------------------------------------------------------------ public
    @property
    def d_in(self) -> int:
        """Width of the harvested activations (runs one forward batch the first time it is asked)."""
        if self._d_in is None:
            chunks = iter(self)
            first = next(chunks, None)
            chunks.close()
            if first is None:
                raise ValueError("the harvest is empty: no inputs")
        return self._d_in

    def __iter__(self) -> Iterator[Tensor]:
        for acts, _ in self.with_tokens():
            yield acts

    def with_tokens(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(activations (n, d), their token ids (n,) on the CPU) per forward batch, row for row."""
        for batch in self._batches():
            hidden = capture_hidden(self.hookpoint, **batch.model_inputs)
            if hidden.ndim != 3 or hidden.shape[:2] != batch.real.shape:
                raise ValueError(f"hookpoint {self.hookpoint.name!r} gave shape {tuple(hidden.shape)}; expected "
                                 f"(batch, tokens, d) matching the inputs' {tuple(batch.real.shape)}")
            self._d_in = hidden.shape[-1]
            yield hidden[batch.real.to(hidden.device)].to(self.dtype), batch.ids[batch.real]

    def to_tensor(self, max_tokens: int | None = None) -> Tensor:
        """All harvested activations (or the first `max_tokens`) as one (N, d) tensor."""
        chunks, held = [], 0
        for chunk in self:
            chunks.append(chunk if max_tokens is None else chunk[: max_tokens - held])
            held += chunks[-1].shape[0]
            if max_tokens is not None and held >= max_tokens:
                break
        if not chunks:
            raise ValueError("the harvest is empty: no inputs")
        return torch.cat(chunks)

    def __repr__(self) -> str:
        return (f"Harvest({self.hookpoint.name!r}, mode={self.mode!r}, context_size={self.context_size}, "
                f"batch_size={self._batch_size})")

    # ------------------------------------------------------------------ batching
    def _batches(self) -> Iterator[_Batch]:
        if self._rows_given is not None:
            yield from self._given_batches(self._rows_given)
            return
        rows: list[list[int]] = []
        for row in self._token_rows():
            rows.append(row)
            if len(rows) == self._batch_size:
                yield self._padded_batch(rows)
                rows = []
        if rows:
            yield self._padded_batch(rows)

    def _given_batches(self, given: dict[str, Any]) -> Iterator[_Batch]:
        ids = given["input_ids"]
        for start in range(0, ids.shape[0], self._batch_size):
            part = {k: v[start : start + self._batch_size] if isinstance(v, Tensor) else v for k, v in given.items()}
            part_ids = part["input_ids"]
            mask = part.get("attention_mask")
            real = mask.bool() if mask is not None else self._real_without_mask(part_ids, part_ids.shape[1])
            yield self._batch({k: _to(v, self.device) for k, v in part.items()}, part_ids, real)

    def _padded_batch(self, rows: list[list[int]]) -> _Batch:
        width = self.context_size if self._pipeline_style else max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows])
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask = torch.arange(width)[None] < lengths[:, None]
        if self._pipeline_style:  # as diffusers calls its text encoders: padded, no attention mask
            return self._batch({"input_ids": ids.to(self.device)}, ids, self._real_without_mask(ids, lengths))
        return self._batch({"input_ids": ids.to(self.device), "attention_mask": mask.long().to(self.device)}, ids, mask)

    def _batch(self, model_inputs: dict[str, Any], ids: Tensor, real: Tensor) -> _Batch:
        ids, real = ids.cpu(), real.cpu()
        if self._excluded.numel():
            real = real & ~torch.isin(ids, self._excluded)
        return _Batch(model_inputs, ids, real)

    def _real_without_mask(self, ids: Tensor, lengths: Tensor | int) -> Tensor:
        """With no attention mask: every position, or (pipelines) up to and including the first EOS."""
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        real = positions < torch.as_tensor(lengths).reshape(-1, 1)
        eos = self._special_id("eos_token_id")
        if self._pipeline_style and eos is not None:
            is_eos = ids == eos
            first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1] - 1)
            real &= positions <= first_eos[:, None]
        return real

    # ------------------------------------------------------------------ tokens
    def _token_rows(self) -> Iterator[list[int]]:
        """The rows fed to the model: one per instance (sequential) or fixed blocks of the stream (block)."""
        truncate = self.mode == "sequential"
        if truncate:
            yield from self._encoded(truncate=True)
            return
        stream: list[int] = []
        for ids in self._encoded(truncate=False):
            stream.extend(self._separated(ids))
            full = len(stream) // self.context_size * self.context_size
            for start in range(0, full, self.context_size):
                yield stream[start : start + self.context_size]
            del stream[:full]
        if stream:
            yield stream

    def _encoded(self, truncate: bool) -> Iterator[list[int]]:
        """Token ids of each instance, in order; texts are tokenized in groups."""
        for start in range(0, len(self._instances), _TOKENIZE_GROUP):
            group = self._instances[start : start + _TOKENIZE_GROUP]
            texts = [(i, self._render(x)) for i, x in enumerate(group) if not _is_ids(x)]
            encoded: dict[int, list[int]] = {}
            if texts:
                kwargs = {"truncation": True, "max_length": self.context_size} if truncate else {"verbose": False}
                out = self.tokenizer([t for _, t in texts], add_special_tokens=not self.chat_template, **kwargs)
                encoded = {i: list(ids) for (i, _), ids in zip(texts, out["input_ids"])}
            for i, x in enumerate(group):
                ids = encoded[i] if i in encoded else [int(t) for t in x]
                yield ids[: self.context_size] if truncate else ids

    def _render(self, instance: Any) -> str:
        if self.chat_template:
            messages = [{"role": "user", "content": instance}] if isinstance(instance, str) else list(instance)
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not isinstance(instance, str):
            raise ValueError("message lists need chat_template=True (the tokenizer's chat template renders them)")
        return instance

    def _separated(self, ids: list[int]) -> list[int]:
        """A document as it enters the block stream: EOS appended unless BOS or EOS already marks it."""
        bos, eos = self._special_id("bos_token_id"), self._special_id("eos_token_id")
        marked = bool(ids) and ((bos is not None and ids[0] == bos) or (eos is not None and ids[-1] == eos))
        return ids if marked or eos is None else ids + [eos]

    def _special_id(self, name: str) -> int | None:
        value = getattr(self.tokenizer, name, None)
        if value is None:
            value = getattr(getattr(self.hookpoint.model, "config", None), name, None)
        return value if isinstance(value, int) else None

    def _bos_id(self) -> int:
        bos = self._special_id("bos_token_id")
        if bos is None:
            raise ValueError("drop_bos=True but neither the tokenizer nor the model config names a BOS token; "
                             "pass exclude_tokens=[...] instead")
        return bos

    def _pad_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id"):
            value = self._special_id(name)
            if value is not None:
                return value
        return 0

    def _default_context(self) -> int:
        """The tokenizer's limit (what a pipeline pads to); for models also the position limit, at most 1024."""
        limits = [getattr(self.tokenizer, "model_max_length", None)]
        if not self._pipeline_style:
            config = getattr(self.hookpoint.model, "config", None)
            limits += [getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None),
                       _MAX_DEFAULT_CONTEXT]
        sane = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
        if not sane:
            raise ValueError("cannot tell the context size: pass context_size=...")
        return min(sane)


def harvest(model: Any, hookpoint: str, inputs: Any, *, tokenizer: Any = None, mode: str | None = None,
            context_size: int | None = None, batch_size: int = 8, device: str | torch.device | None = None,
            chat_template: bool = False, dtype: torch.dtype = torch.float32, drop_bos: bool = False,
            exclude_tokens: Sequence[int] = (), buffer_size: int | None = None) -> Harvest:
    """Activations of `model` (an nn.Module or a diffusers pipeline) at `hookpoint` over `inputs`.

    inputs: texts; chat conversations (lists of {"role", "content"}) with chat_template=True; token-id
        lists or 1-D tensors (one instance each); or pre-tokenized rows fed as given: an (N, T) tensor
        of input_ids, or a mapping (a BatchEncoding) with input_ids, an optional attention_mask and
        any other per-row model inputs.
    tokenizer: needed for text; for a pipeline, taken from it (text_encoder_2 -> tokenizer_2).
    mode: "block" (default for models) or "sequential" (FAST; the default, and the only choice, for
        a pipeline's text encoder). See the module docstring.
    context_size: tokens per row; None takes the tokenizer's / model's limit (at most 1024 for a model).
    batch_size: rows per forward pass.
    device: where inputs go; None is the model's device. Chunks come back on it, cast to `dtype`.
    drop_bos, exclude_tokens: leave out every BOS token (an attention sink with an outsized norm) or
        any listed token ids.
    buffer_size: rows of the shuffle buffer `sae_guard.train` mixes this harvest through.
    """
    return Harvest(model, hookpoint, inputs, tokenizer=tokenizer, mode=mode, context_size=context_size,
                   batch_size=batch_size, device=device, chat_template=chat_template, dtype=dtype,
                   drop_bos=drop_bos, exclude_tokens=exclude_tokens, buffer_size=buffer_size)


def _normalise_inputs(inputs: Any) -> tuple[dict[str, Any] | None, list[Any]]:
    """Split inputs into pre-batched rows (fed as given) or a list of instances (laid out by mode)."""
    if isinstance(inputs, Tensor):
        if inputs.ndim not in (1, 2):
            raise ValueError(f"token-id tensors must be 1-D (one instance) or 2-D (rows), got {inputs.ndim}-D")
        if inputs.ndim == 2:
            return {"input_ids": inputs.long()}, []
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(f"pre-tokenized inputs need 'input_ids'; got keys {sorted(inputs)}")
        rows = {k: torch.as_tensor(v) if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
        if rows["input_ids"].ndim == 1:
            rows = {k: v[None] if isinstance(v, Tensor) else v for k, v in rows.items()}
        return rows, []
    if isinstance(inputs, (str, Tensor)) or _is_messages(inputs):
        return None, [inputs]
    if not isinstance(inputs, Iterable):
        raise TypeError(f"cannot harvest from {type(inputs).__name__}: pass texts, conversations or token ids")
    return None, list(inputs)  # materialised, so every pass replays the same instances


def _is_ids(instance: Any) -> bool:
    if isinstance(instance, Tensor):
        return instance.ndim == 1
    return isinstance(instance, (list, tuple)) and bool(instance) and all(isinstance(t, int) for t in instance)


def _is_messages(instance: Any) -> bool:
    return isinstance(instance, list) and bool(instance) and all(isinstance(m, Mapping) for m in instance)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
