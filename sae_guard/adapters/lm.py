"""Causal language models (GPT-2, Llama, Gemma, SmolLM2): hookpoints, token scopes, and guarding `generate()`.

Sites, by block N (transformers module paths):
    residual(model, N)   the residual stream after block N (the block's output)
    mlp_out(model, N)    the MLP's output, before it is added back
    attn_z(model, N)     the heads' concatenated outputs before the output projection, (batch, tokens,
                         n_heads * d_head): TransformerLens' `hook_z`, read by a pre-hook (`...o_proj:input`);
                         `split_heads(h, n_heads(model))` views it per head.

`guard_lm(model, sae=..., concepts=[...], tokenizer=...)` attaches the gate so that every forward of the model
is gated, which is what `generate()` does at prefill and at every cached decode step, greedy or sampled. The
gate reads the live call: prefill (an empty KV cache) is the PROMPT, each later step the RESPONSE. Which of
those score and may be edited is the scope ("prompt", "response" or "all"). Special tokens and chat-template
role headers (`<|im_start|>user\\n`) never score unless `score_boilerplate=True`. Per request, the guard keeps
two verdicts, one for the prompt and one for the response (Llama Guard's two roles), max-merged over steps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..concepts.concept import Concept
from ..concepts.policy import Verdict, merge_verdicts
from ..hooks.hookpoints import INPUT_SUFFIX, find_hookpoint
from .base import ModelCall
from .guard import Guard, guard
from .text import TextAdapter

SCOPES = ("prompt", "response", "all")

# (layer list, attention module, its output projection, MLP module) per family, by where the blocks live
_LAYOUTS = {
    "transformer.h": ("attn", "c_proj", "mlp"),  # GPT-2
    "model.layers": ("self_attn", "o_proj", "mlp"),  # Llama, Gemma, Mistral, Qwen, SmolLM2
}


def is_causal_lm(model: Any) -> bool:
    """A transformers model with a generation head and one of the known block layouts."""
    return isinstance(model, nn.Module) and hasattr(model, "generate") and _layers_path(model) is not None


def _layers_path(model: nn.Module) -> str | None:
    for path in _LAYOUTS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path
    return None


def _block(model: nn.Module, layer: int) -> tuple[str, tuple[str, str, str]]:
    path = _layers_path(model)
    if path is None:
        raise ValueError(f"{type(model).__name__} is not a causal LM with a known block layout "
                         f"({', '.join(_LAYOUTS)}); pass a module path as the hookpoint")
    n = len(model.get_submodule(path))
    if not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer {layer!r} is out of range: {type(model).__name__} has {n} blocks (0..{n - 1})")
    return f"{path}.{layer % n}", _LAYOUTS[path]


def residual(model: nn.Module, layer: int) -> str:
    """The residual stream after block `layer`."""
    return _block(model, layer)[0]


def mlp_out(model: nn.Module, layer: int) -> str:
    """The MLP output of block `layer`."""
    block, (_, _, mlp) = _block(model, layer)
    return f"{block}.{mlp}"


def attn_z(model: nn.Module, layer: int) -> str:
    """The concatenated head outputs of block `layer`, before the output projection (`hook_z`)."""
    block, (attn, proj, _) = _block(model, layer)
    return f"{block}.{attn}.{proj}{INPUT_SUFFIX}"


def n_heads(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "num_attention_heads", None) or config.n_head)


def default_hookpoint(model: nn.Module) -> str:
    """The residual stream two-thirds of the way up, as for text encoders."""
    path = _layers_path(model)
    n = len(model.get_submodule(path)) if path else 0
    return residual(model, (2 * n) // 3)


# ------------------------------------------------------------------------------------------ which tokens score
class TokenScope:
    """The gate's real-token reader for a causal LM: attention mask, the scope's phase, no boilerplate."""

    def __init__(self, tokenizer: Any, scope: str = "all", score_boilerplate: bool = False) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.tokenizer, self.scope, self.score_boilerplate = tokenizer, scope, score_boilerplate
        self.phase = "prompt"
        # read once here, not in the first guarded call (a 50k vocabulary takes a tenth of a second)
        self._special, self._newline = _vocab_sets(tokenizer) if tokenizer is not None else (None, None)

    def _vocab_sets(self, device: torch.device) -> tuple[Tensor, Tensor]:
        return self._special.to(device), self._newline.to(device)

    HEADER_SPAN = 4  # a role header (`user`, `assistant`, its newline) is at most this many tokens

    def boilerplate(self, ids: Tensor) -> Tensor:
        """Special tokens, and each role header: the tokens after a special token up to a newline within
        HEADER_SPAN tokens (`<|im_start|>` `user` `\n`); no newline that close: only the special token."""
        special, newline = self._vocab_sets(ids.device)
        out = torch.isin(ids, special)
        if ids.shape[1] == 1:
            return out
        is_newline = torch.isin(ids, newline) & ~out
        for row, col in out.nonzero().tolist():
            ahead = is_newline[row, col + 1 : col + 1 + self.HEADER_SPAN].nonzero()
            if len(ahead):
                out[row, col + 1 : col + 2 + int(ahead[0])] = True
        return out

    def __call__(self, args: tuple, kwargs: dict) -> Tensor | None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        past = kwargs.get("past_key_values")
        cached = past is not None and (past.get_seq_length() if hasattr(past, "get_seq_length") else len(past)) > 0
        self.phase = "response" if cached else "prompt"
        if ids is None:  # inputs_embeds: no token ids to read boilerplate from
            attention = kwargs.get("attention_mask")
            return None if attention is None else attention.bool()
        mask = torch.ones_like(ids, dtype=torch.bool)
        attention = kwargs.get("attention_mask")
        if attention is not None:
            mask &= attention[:, -ids.shape[1]:].bool()
        if not self.score_boilerplate and self.tokenizer is not None:
            mask &= ~self.boilerplate(ids)
        if self.scope not in ("all", self.phase):
            mask[:] = False
        return mask


_VOCAB_SETS: "weakref.WeakKeyDictionary[Any, tuple[Tensor, Tensor]]" = weakref.WeakKeyDictionary()


def _vocab_sets(tokenizer: Any) -> tuple[Tensor, Tensor]:
    """(special token ids, ids of tokens holding a newline) of a tokenizer, computed once per tokenizer."""
    try:
        return _VOCAB_SETS[tokenizer]
    except (KeyError, TypeError):
        pass
    special = torch.tensor(sorted(set(tokenizer.all_special_ids or [])), dtype=torch.long)
    texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # byte-level BPE spells "\n" as "Ċ"; sentencepiece as "<0x0A>"
    newline = torch.tensor([i for i, t in enumerate(texts) if t and ("\n" in t or "Ċ" in t or t == "<0x0A>")],
                           dtype=torch.long)
    try:
        _VOCAB_SETS[tokenizer] = (special, newline)
    except TypeError:  # not weak-referenceable: recomputed per scope
        pass
    return special, newline


# ------------------------------------------------------------------------------------------ per-request verdicts
@dataclass
class RequestVerdict:
    """One request's verdicts in Llama Guard's two roles."""

    prompt: Verdict | None
    response: Verdict | None

    def text(self, role: str = "response") -> str:
        """Llama Guard's text form: `safe`, or `unsafe` and the flagged concepts on the next line."""
        verdict = getattr(self, role)
        if verdict is None or not verdict.flagged:
            return "safe"
        return "unsafe\n" + ",".join(verdict.concepts)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt and self.prompt.to_dict(), "response": self.response and self.response.to_dict()}


class LMGuard(Guard):
    """A guarded causal LM. `request_verdicts` holds the last request's prompt and response verdicts per row."""

    def __init__(self, target: Any, gate, policy, adapter: "LMAdapter", scope: TokenScope) -> None:
        super().__init__(target, [gate], [policy], [adapter])
        self.scope = scope
        self._policy = policy
        self._verdicts: dict[str, list[Verdict] | None] = {"prompt": None, "response": None}
        decide = gate.decide

        def record(call):
            chosen = decide(call)
            phase = scope.phase
            if phase == "prompt":  # a new request starts at its prefill
                self._verdicts = {"prompt": None, "response": None}
            new = list(policy.last_verdicts)
            previous = self._verdicts[phase]
            self._verdicts[phase] = new if previous is None or len(previous) != len(new) \
                else merge_verdicts([previous, new])
            return chosen

        gate.decide = record

    @property
    def request_verdicts(self) -> list[RequestVerdict]:
        prompt, response = self._verdicts["prompt"], self._verdicts["response"]
        n = len(prompt or response or [])
        return [RequestVerdict(prompt[i] if prompt else None, response[i] if response else None) for i in range(n)]


def _is_chat(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item)


def chat_batch(tokenizer: Any, chats: Sequence[Sequence[dict]], model: nn.Module | None = None,
               add_generation_prompt: bool = True) -> dict[str, Tensor]:
    """Left-padded `generate()` inputs for chats, refusing what the model cannot take, with the reason."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; pass plain strings, or set "
                         "tokenizer.chat_template")
    chats = list(chats)
    for i, chat in enumerate(chats):
        if not _is_chat(chat) or not chat:
            raise ValueError(f"chat {i} is empty or not a list of {{'role', 'content'}} messages")
        if not any(str(m.get("content", "")).strip() for m in chat):
            raise ValueError(f"chat {i} has no message content")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer.apply_chat_template(chats, add_generation_prompt=add_generation_prompt, padding=True,
                                              return_tensors="pt", return_dict=True)
    finally:
        tokenizer.padding_side = side
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = int(batch["attention_mask"].sum(-1).max())
    if limit and longest > limit:
        raise ValueError(f"a chat is {longest} tokens long, more than the model's context of {limit}; "
                         "shorten it (the model was not run)")
    if model is not None:
        batch = batch.to(next(model.parameters()).device)
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def render_chats(tokenizer: Any, items: Sequence[Any]) -> list[Any]:
    """Chats among `items` rendered to the text the model reads (strings pass through): concepts from chats."""
    out = []
    for item in items:
        if _is_chat(item):
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"a concept input is a chat, but {type(tokenizer).__name__} has no chat template")
            item = tokenizer.apply_chat_template(list(item), tokenize=False)
        out.append(item)
    return out


class LMAdapter(TextAdapter):
    """Causal LMs: strings or chats in, scored positions = the scope's content tokens (see `TokenScope`)."""

    name = "lm"

    def __init__(self, model: Any, tokenizer: Any = None, scope: str = "all", score_boilerplate: bool = False
                 ) -> None:
        super().__init__(model, tokenizer=tokenizer)
        self.scope = TokenScope(tokenizer, scope, score_boilerplate)

    @classmethod
    def matches(cls, model: Any) -> bool:
        return is_causal_lm(model)

    def default_hookpoint(self, model: nn.Module) -> str:
        return default_hookpoint(model)

    def prepare(self, model: nn.Module, inputs: Sequence[Any]) -> ModelCall:
        if _is_chat(inputs) and inputs and isinstance(inputs[0], dict):  # one chat
            inputs = [inputs]
        return super().prepare(model, render_chats(self.tokenizer, list(inputs)))

    def positions(self, model: nn.Module) -> TokenScope:
        return self.scope

    def make_guard(self, target: Any, gates: list, policies: list) -> "LMGuard":
        return LMGuard(target, gates[0], policies[0], self, self.scope)


def guard_lm(model: nn.Module, sae, concepts: Sequence[Concept], tokenizer: Any, hookpoint: str | None = None,
             scope: str = "all", score_boilerplate: bool = False, **options: Any) -> LMGuard:
    """`guard()` on a causal LM, said explicitly: every forward is gated, `generate()` included. The same as
    `guard(model, sae=..., concepts=..., tokenizer=..., scope=...)`, which picks this family by itself."""
    if not is_causal_lm(model):
        raise TypeError(f"guard_lm needs a transformers causal LM (GPT-2, Llama, Gemma), got {type(model).__name__}")
    adapter = LMAdapter(model, tokenizer, scope=scope, score_boilerplate=score_boilerplate)
    return guard(model, sae=sae, concepts=concepts, hookpoint=hookpoint, tokenizer=tokenizer, adapter=adapter,
                 **options)


# ------------------------------------------------------------------------------------------ the SAE spliced in
@torch.no_grad()
def splice_eval(model: nn.Module, tokenizer: Any, sae, hookpoint: str, texts: Sequence[str],
                batch_size: int = 8, max_tokens: int = 256) -> dict[str, float]:
    """How much of the LM survives replacing the site by the SAE's reconstruction, on held-out `texts`.

    ce_clean / ce_spliced / ce_ablated: next-token cross-entropy with the site clean, reconstructed, zeroed;
    ce_loss_recovered: (ablated - spliced) / (ablated - clean); kl: mean KL(clean || spliced) per position;
    fvu and l0 of the SAE on the same positions. Only real (unpadded) positions count.
    """
    from ..hooks.hookpoints import hook_site
    from ..sae.metrics import Accumulator, ce_loss_recovered, kl_divergence

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("splice_eval needs at least one non-empty text")
    point = find_hookpoint(model, hookpoint)
    device = next(model.parameters()).device
    sae.eval()
    acc = Accumulator(sae.d_sae)
    sums = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0, "kl": 0.0}
    n_next = 0
    mode = {"value": "clean"}

    def site(hidden: Tensor) -> Tensor | None:
        if mode["value"] == "clean":
            return None
        if mode["value"] == "ablated":
            return torch.zeros_like(hidden)
        x = hidden.reshape(-1, hidden.shape[-1]).to(sae.W_enc.device, torch.float32)
        if x.shape[-1] != sae.d_in:
            raise ValueError(f"SAE d_in={sae.d_in} does not match the width {x.shape[-1]} of hookpoint {point.name!r}")
        codes = sae.encode_sparse(x)
        x_hat = sae.decode(codes)
        keep = mode["mask"].reshape(-1).to(x.device)
        acc.update(x[keep], x_hat[keep], type(codes)(codes.values[keep], codes.indices[keep]))
        return x_hat.to(hidden.dtype).reshape(hidden.shape).to(hidden.device)

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    handle = hook_site(point, site)
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_tokens).to(device)
            ids, attention = enc["input_ids"], enc["attention_mask"].bool()
            target_ok = attention[:, 1:] & attention[:, :-1]
            logits = {}
            for which in ("clean", "spliced", "ablated"):
                mode["value"], mode["mask"] = which, attention
                out = model(input_ids=ids, attention_mask=enc["attention_mask"]).logits[:, :-1].float()
                ce = torch.nn.functional.cross_entropy(out.transpose(1, 2), ids[:, 1:], reduction="none")
                sums[which] += ce[target_ok].sum().item()
                logits[which] = out
            sums["kl"] += kl_divergence(logits["clean"], logits["spliced"])[target_ok].sum().item()
            n_next += int(target_ok.sum())
    finally:
        handle.remove()
        tokenizer.padding_side = padding_side
    if n_next == 0:
        raise ValueError("the texts hold no next-token targets (each needs at least two tokens)")
    clean, spliced, ablated = (sums[k] / n_next for k in ("clean", "spliced", "ablated"))
    stats = acc.result()
    return {"ce_clean": clean, "ce_spliced": spliced, "ce_ablated": ablated,
            "ce_loss_recovered": ce_loss_recovered(clean, spliced, ablated), "kl": sums["kl"] / n_next,
            "fvu": stats["fvu"], "l0": stats["l0"], "tokens": float(n_next)}
