"""sae_guard: sparse autoencoders patched into live models as concept classifiers and gates.

The public names below are imported on first use, so `import sae_guard` (and `sae-guard --help`) does not pay for
torch, transformers or diffusers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "SAE": ".sae", "SAEConfig": ".sae", "SparseCodes": ".sae", "architectures": ".sae", "discrete_codes": ".sae",
    "train": ".train", "TrainResult": ".train", "TrainingDiverged": ".train", "harvest": ".train",
    "Concept": ".concepts", "Verdict": ".concepts", "Edit": ".hooks.gate", "Guard": ".adapters.guard",
    "guard": ".adapters.guard",
}

_SUBPACKAGES = {"adapters", "analysis", "cache", "cli", "concepts", "erasure", "hooks", "prompts", "recipes", "sae",
                "shapes", "synthetic", "train"}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .adapters.guard import Guard, guard
    from .concepts import Concept, Verdict
    from .hooks.gate import Edit
    from .sae import SAE, SAEConfig, SparseCodes, architectures, discrete_codes
    from .train import TrainingDiverged, TrainResult, harvest, train


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    if name in _SUBPACKAGES:  # `sae_guard.hooks.find_hookpoint` after a bare `import sae_guard`
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sae_guard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
