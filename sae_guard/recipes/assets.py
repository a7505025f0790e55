"""A recipe's trained assets on disk: written whole or not at all, readable by every user, fp16-exact."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..concepts import Concept, save_concepts
from ..sae.base import SAE
from .spec import RECIPE_COPY

if TYPE_CHECKING:
    from .spec import Recipe

TRAINING_REPORT = "training.json"


def save_assets(recipe: Recipe, sae: SAE, concepts: Sequence[Concept], out: Path, report: Mapping[str, Any],
                extra: Callable[[Path], Any] | None = None) -> Path:
    """Write sae/ (fp16), concepts/, recipe.toml and training.json as the folder `out`, replacing it whole.

    extra(folder) writes what else a recipe kind keeps beside them (a model it trained, say).

    Everything is written into a temporary sibling first and renamed into place, so a reader never sees a half-
    written folder and a failure leaves the old one.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-new-", dir=out.parent))
    try:
        copy.deepcopy(sae).cpu().half().save(staging / "sae")
        save_concepts(concepts, staging / "concepts")
        if recipe.text:
            (staging / RECIPE_COPY).write_text(recipe.text, encoding="utf-8")
        (staging / TRAINING_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if extra is not None:
            extra(staging)
        make_readable(staging)
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent)) / out.name
        if out.exists():
            out.rename(retired)
        try:
            staging.rename(out)
        except BaseException:
            if retired.exists():
                retired.rename(out)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired.parent, ignore_errors=True)
    return out


def attached_concepts(recipe: Recipe, folder: Path, names: Sequence[str] | None) -> list[Concept]:
    """The fitted concepts of `folder` to attach: `names`, else the recipe's [guard] concepts, else all; refused
    when the folder's concepts are not the recipe's (assets built from another version of it)."""
    from ..concepts import load_concepts
    from .errors import RecipeError

    fitted = {c.name: c for c in load_concepts(folder / "concepts")}
    expected = [c.name for c in recipe.concepts]
    if sorted(fitted) != sorted(expected):
        raise RecipeError(f"assets in {folder} hold concepts {sorted(fitted)}, the recipe names {expected}; "
                          f"rebuild them")
    names = list(names if names is not None else recipe.guard.concepts or expected)
    unknown = [n for n in names if n not in fitted]
    if unknown or not names:
        raise RecipeError(f"no concepts {unknown or names} in recipe {recipe.name!r} (it has {', '.join(expected)})")
    return [fitted[n] for n in names]


def make_readable(folder: Path) -> None:
    """Package data is read by every user: folders 0755, files 0644 (temporary files are created owner-only)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def round_to_fp16(sae: SAE) -> None:
    """Round every weight to fp16 precision in place (kept fp32), as the shipped files will hold it."""
    with torch.no_grad():
        for tensor in [*sae.parameters(), *sae.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().to(tensor.dtype))


def fingerprint(parts: Sequence[Any]) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)
