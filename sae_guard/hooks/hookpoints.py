"""Hookpoints: find a module by name, read its hidden state, and put an edited one back.

A hookpoint is a module path as `named_modules()` spells it (`encoder.layers.8`, `transformer.h.6`).
On a diffusers pipeline (or any object holding modules as attributes) the path starts with the
component: `text_encoder.encoder.layers.8`.

A path ending in `:input` names the module's INPUT (its first positional argument, read and replaced by a
forward pre-hook) instead of its output: `model.layers.3.self_attn.o_proj:input` is the concatenated per-head
attention output before the output projection (TransformerLens' `hook_z`, flattened to n_heads * d_head).

transformers 4 and 5 differ in three ways that break naive hooks, and this module absorbs them:
- paths: v5 `CLIPTextModel` / `CLIPVisionModel` lost the `text_model.` / `vision_model.` level, so
  each spelling is tried with and without it, then as a unique suffix of a module name;
- outputs: a layer returns a tensor, a tuple whose first element is the hidden state (T5 blocks in
  both versions, CLIP layers in v4), or a `ModelOutput`; `hidden_of` / `with_hidden` read and
  rebuild each form;
- `output_hidden_states` in v5 is recorded by forward hooks installed on the first call, so an edit
  must be registered in front of them (`prepend=True`) for the recorded states to include it.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

# wrapper levels that transformers 5 removed from some models (CLIPTextModel, CLIPVisionModel)
_WRAPPER_PREFIXES = ("text_model.", "vision_model.")
INPUT_SUFFIX = ":input"  # `<module path>:input`: the module's first input, not its output


class HookpointError(LookupError):
    """A hookpoint name that matches no module, or more than one."""

    def __str__(self) -> str:  # LookupError would quote the message like a dict key
        return str(self.args[0])


@dataclass(frozen=True)
class Hookpoint:
    """A resolved hookpoint: the module to hook and the model to run to reach it."""

    name: str  # full path as found, component first for a pipeline
    module: nn.Module  # the module whose output is read or edited
    model: nn.Module  # what to call to run `module`: the root, or the pipeline component holding it
    component: str | None = None  # the pipeline attribute holding `model`; None for a plain module
    reads_input: bool = False  # True: the site is `module`'s first input (name ends in ":input"), not its output


def find_hookpoint(root: Any, name: str) -> Hookpoint:
    """Resolve `name` on an `nn.Module` or a pipeline; raise `HookpointError` listing near misses."""
    if name.endswith(INPUT_SUFFIX):
        point = find_hookpoint(root, name[: -len(INPUT_SUFFIX)])
        return Hookpoint(point.name + INPUT_SUFFIX, point.module, point.model, point.component, reads_input=True)
    if isinstance(root, nn.Module):
        path = _find_in_module(root, name, type(root).__name__)
        return Hookpoint(path, root.get_submodule(path), root)
    components = _module_components(root)
    component, _, rest = name.partition(".")
    if component not in components:
        raise HookpointError(
            f"{type(root).__name__} has no module component {component!r} (hookpoint {name!r}); "
            f"a pipeline hookpoint starts with one of: {', '.join(sorted(components)) or 'none'}"
        )
    model = components[component]
    path = _find_in_module(model, rest, f"{type(root).__name__}.{component}", prefix=component + ".")
    return Hookpoint(f"{component}.{path}" if path else component, model.get_submodule(path), model, component)


def find_module(root: Any, name: str) -> nn.Module:
    """The module a hookpoint name refers to."""
    return find_hookpoint(root, name).module


def hidden_of(output: Any) -> Tensor:
    """The hidden-state tensor in a module output: the tensor, the first tuple element, or the first field."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping) and output:  # transformers ModelOutput (only set fields are keys)
        first = next(iter(output.values()))
        if isinstance(first, Tensor):
            return first
    raise TypeError(f"cannot find a hidden-state tensor in a module output of type {type(output).__name__}")


def with_hidden(output: Any, hidden: Tensor) -> Any:
    """`output` with its hidden state replaced by `hidden`, in the same structure (the rest untouched)."""
    if isinstance(output, Tensor):
        return hidden
    if isinstance(output, tuple):
        items = (hidden, *output[1:])
        return type(output)._make(items) if hasattr(output, "_make") else items  # namedtuple or tuple
    if isinstance(output, list):
        return [hidden, *output[1:]]
    if isinstance(output, Mapping):
        replaced = copy.copy(output)
        replaced[next(iter(output))] = hidden  # ModelOutput.__setitem__ keeps the attribute in sync
        return replaced
    raise TypeError(f"cannot put a hidden state back into a module output of type {type(output).__name__}")


def hook_hidden(module: nn.Module, fn: Callable[[Tensor], Tensor | None], *, prepend: bool = True) -> RemovableHandle:
    """Call `fn(hidden)` after `module` runs; a tensor it returns replaces the hidden state.

    Registered in front of other forward hooks by default, so transformers 5's hook-recorded
    `output_hidden_states` see the edit. Remove with `handle.remove()`.
    """

    return module.register_forward_hook(_HiddenHook(fn), prepend=prepend)


class _HiddenHook:
    """A forward hook that hands `fn` the hidden state. Copying or pickling a model carrying one copies `fn` too,
    which only `fn`'s owner can allow (a Gate refuses: the copy would share its gates)."""

    def __init__(self, fn: Callable[[Tensor], Tensor | None]) -> None:
        self.fn = fn

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        new = self.fn(hidden_of(output))
        return None if new is None else with_hidden(output, new)


def hook_site(point: Hookpoint, fn: Callable[[Tensor], Tensor | None], *, prepend: bool = True) -> RemovableHandle:
    """`hook_hidden` at a hookpoint's site: after its module runs, or before it for an `:input` site."""
    if not point.reads_input:
        return hook_hidden(point.module, fn, prepend=prepend)

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args and isinstance(args[0], Tensor):
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        key = next((k for k, v in kwargs.items() if isinstance(v, Tensor)), None)
        if key is None:
            raise TypeError(f"{point.name}: the module was called without a tensor input to read")
        new = fn(kwargs[key])
        return None if new is None else (args, {**kwargs, key: new})

    return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)


def split_heads(hidden: Tensor, n_heads: int, where: str = "the hidden state") -> Tensor:
    """(..., n_heads * d_head) -> (..., n_heads, d_head): an attention-output (`hook_z`) site per head."""
    width = hidden.shape[-1]
    if n_heads <= 0 or width % n_heads:
        raise ValueError(f"{where} has width {width}, which {n_heads} heads do not divide; per-head reading needs "
                         "width = n_heads * d_head (pass the model's own head count)")
    return hidden.unflatten(-1, (n_heads, width // n_heads))


def merge_heads(per_head: Tensor) -> Tensor:
    """(..., n_heads, d_head) -> (..., n_heads * d_head), the inverse of `split_heads`."""
    return per_head.flatten(-2)


def _module_components(root: Any) -> dict[str, nn.Module]:
    components = getattr(root, "components", None)  # diffusers pipelines list theirs here
    items = components.items() if isinstance(components, Mapping) else getattr(root, "__dict__", {}).items()
    return {key: value for key, value in items if isinstance(value, nn.Module)}


def _spellings(path: str) -> list[str]:
    """`path` without, or with each, wrapper level transformers 5 removed (not `path` itself)."""
    for prefix in _WRAPPER_PREFIXES:
        if path.startswith(prefix):
            return [path[len(prefix):]]
    return [prefix + path for prefix in _WRAPPER_PREFIXES]


def _find_in_module(model: nn.Module, path: str, owner: str, prefix: str = "") -> str:
    names = [name for name, _ in model.named_modules()]
    known = set(names)
    if not path or path in known:
        return path
    # then the other transformers version's spelling, then a unique suffix; two candidates is an error
    other_version = [s for s in _spellings(path) if s in known]
    suffixes = [[n for n in names if n.endswith("." + s)] for s in [path, *_spellings(path)]]
    for candidates in [other_version, *suffixes]:
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise HookpointError(
                f"hookpoint {prefix + path!r} is ambiguous in {owner}: it may be "
                f"{', '.join(repr(prefix + c) for c in candidates[:8])}; pass the full path"
            )
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    lines = [f"no module {prefix + path!r} in {owner}."]
    if close:
        lines.append("Close matches: " + ", ".join(repr(prefix + c) for c in close) + ".")
    containers = numbered_containers(model)
    if containers:
        lines.append("Numbered layers: " + ", ".join(prefix + c for c in containers) + ".")
    raise HookpointError(" ".join(lines))


def numbered_containers(model: nn.Module, limit: int = 8) -> list[str]:
    """`encoder.layers.[0-11]`-style summaries of the outermost ModuleLists, where layers live."""
    found = [f"{name}.[0-{len(module) - 1}]" for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and name
             and not any(part.isdigit() for part in name.split("."))]
    return found[:limit]
