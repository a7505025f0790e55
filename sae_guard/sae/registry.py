"""The architecture registry: name -> SAE class (which names its own config class)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from .base import SAE

_REGISTRY: dict[str, type["SAE"]] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make an SAE subclass creatable as `SAE.create(name, ...)`."""

    def wrap(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def architectures() -> list[str]:
    """Names of every registered SAE architecture."""
    return sorted(_REGISTRY)


def get_architecture(name: str) -> type["SAE"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown SAE architecture {name!r}; known: {', '.join(architectures())}") from None
