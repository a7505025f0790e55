"""Configuration dataclasses: one per architecture, JSON-serialisable, saved beside the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SAEConfig:
    """Fields every SAE has. Variants subclass this and add their own hyperparameters.

    Fields marked *training* only matter while training; they are saved so a run can be repeated.
    """

    architecture: str = ""
    d_in: int = 0
    d_sae: int = 0
    # training: a latent that has not fired for this many tokens counts as dead (None: the trainer
    # picks min(10M, max(a hundredth of the run, 10 batches)): `train.trainer.default_dead_tokens`).
    dead_tokens: int | None = None
    # free-form provenance: model, hookpoint, dataset, tokens trained...
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} does not know the fields {unknown}; known: {sorted(known)}")
        return cls(**data)


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
    "dict": (dict,), "list": (list, tuple), "tuple": (list, tuple),
}


def check_field_types(config: Any) -> None:
    """Refuse a field whose value is not of its annotated type (k = 8.5, d_sae = "4096"), naming it: a config read
    from JSON is checked as strictly as one written in code. bool is not accepted where a number is asked."""
    for item in dataclasses.fields(config):
        annotation = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", "")
        names = [part.strip().split("[")[0] for part in annotation.split("|")]
        if not names or any(name not in _TYPES for name in names):
            continue  # a type this check does not know: left to the variant
        value = getattr(config, item.name)
        allowed = tuple(t for name in names for t in _TYPES[name])
        if isinstance(value, bool) and "bool" not in names:
            allowed = ()
        if not isinstance(value, allowed):
            raise ValueError(f"{type(config).__name__}.{item.name} must be {annotation}, got {value!r} "
                             f"({type(value).__name__})")
