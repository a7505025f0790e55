"""sae_guard: sparse autoencoders patched into live models as concept classifiers and gates.

The public names are imported on first use (module `__getattr__`, PEP 562), so `import sae_guard` and the
`sae-guard` command's `--help` do not pay for importing torch (several seconds on a loaded machine).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "SAE": ".sae", "SAEConfig": ".sae", "SparseCodes": ".sae", "architectures": ".sae", "discrete_codes": ".sae",
    "TrainResult": ".train", "harvest": ".train", "train": ".train",
    "Concept": ".concepts", "Verdict": ".concepts",
    "Edit": ".hooks.gate",
    "Guard": ".adapters.guard", "guard": ".adapters.guard",
}

__all__ = [
    "SAE", "SAEConfig", "SparseCodes", "architectures", "discrete_codes", "train", "TrainResult", "harvest",
    "Concept", "Edit", "Guard", "Verdict", "guard", "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first access
    from .adapters.guard import Guard, guard
    from .concepts import Concept, Verdict
    from .hooks.gate import Edit
    from .sae import SAE, SAEConfig, SparseCodes, architectures, discrete_codes
    from .train import TrainResult, harvest, train


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(ModuleType):
    """This package, keeping a public function over the subpackage of the same name (`train`): importing
    `sae_guard.train` sets the package's `train` attribute to the subpackage, which would hide the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, ModuleType):
            return  # the subpackage stays reachable as sys.modules["sae_guard.train"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
