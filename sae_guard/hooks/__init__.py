"""The hook layer: hookpoints (find a module by name, read and replace its output)."""

from .hookpoints import Hookpoint, HookpointError, find_hookpoint, find_module, hidden_of, hook_hidden, with_hidden

__all__ = ["Hookpoint", "HookpointError", "find_hookpoint", "find_module", "hidden_of", "hook_hidden", "with_hidden"]
