"""The erasure suite: every method on the same prompts and seeds, scored image by image, summed up per group.

    prompts = shapes_prompts("red", n=40)
    result = run_suite(pipe, [Unguarded(), Gate(...), KeywordFilter(["red"])], prompts, ShapesScorer("red"))
    result.table()          # per method and group: concept present, other attributes kept, flagged, identical

Figures per (method, group), each a share of that group's images:
    present    the scorer finds the erased concept in the image
    kept       the prompt's other attributes are drawn (where the scorer can tell)
    flagged    the method acted on the prompt (the gate's and ItD's classifier verdicts, the keyword match)
    identical  the image is bit-identical to the unguarded image of the same prompt and seed
The first method is the reference for `identical`; put `Unguarded()` first.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..shapes.concepts import concept_kind, single_shape_worlds
from .methods import Generation, Method, T2ISettings
from .scorers import BenchPrompt, Scorer

GROUPS = ("named", "paraphrase", "control")
BENCH_WORLD_SEED = 1000  # no concept split uses this world seed (see sae_guard.shapes.concepts.SPLIT_SEEDS)


def shapes_prompts(concept: str, n: int = 40, seed: int = BENCH_WORLD_SEED) -> list[BenchPrompt]:
    """Single-shape ShapesWorld prompts with their scenes: `n` naming `concept`, `n` saying it in other words
    (colours only: the world's paraphrase set, whose words never occur in training captions) and `n` controls
    that show neither (other colours, or other shapes)."""
    showing, without = single_shape_worlds(concept)
    sets = [("named", showing, "train", seed), ("control", without, "train", seed + 1)]
    if concept_kind(concept) == "colour":
        sets.insert(1, ("paraphrase", showing, "paraphrase", seed + 2))
    prompts = []
    for group, world, caption_set, world_seed in sets:
        _, labels, captions = world.sample(n, world_seed, caption_set)
        prompts += [BenchPrompt(text, group, scene) for text, scene in zip(captions, labels)]
    return prompts


@dataclass
class MethodRun:
    name: str
    generation: Generation
    rows: list[dict[str, float]]
    seconds: float


@dataclass
class SuiteResult:
    prompts: list[BenchPrompt]
    seeds: list[int]
    runs: list[MethodRun] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        present = {p.group for p in self.prompts}
        return [g for g in GROUPS if g in present] + sorted(present - set(GROUPS))

    def indices(self, group: str) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if p.group == group]

    def metrics(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """{method: {group: {present, kept, flagged, identical, n}}} (None where nothing could be measured)."""
        reference = self.runs[0].generation.images if self.runs else None
        out: dict[str, dict[str, dict[str, float | None]]] = {}
        for run in self.runs:
            per_group = {}
            for group in self.groups:
                index = self.indices(group)
                kept = [run.rows[i]["kept"] for i in index if "kept" in run.rows[i]]
                extra = sorted({k for i in index for k in run.rows[i]} - {"present", "kept"})
                per_group[group] = {
                    "n": len(index),
                    "present": _mean([run.rows[i]["present"] for i in index if "present" in run.rows[i]]),
                    "kept": _mean(kept),
                    "flagged": _mean([float(run.generation.flagged[i]) for i in index]),
                    "identical": _mean([float(np.array_equal(run.generation.images[i], reference[i]))
                                        for i in index]),
                    **{k: _mean([run.rows[i][k] for i in index if k in run.rows[i]]) for k in extra},
                }
            out[run.name] = per_group | {"seconds": run.seconds}
        return out

    def table(self) -> str:
        """A plain-text table: one row per method, per group present / kept / flagged / identical."""
        metrics = self.metrics()
        header = f"{'method':18}" + "".join(f" | {g[:10]:>10} pres  kept  flag  same" for g in self.groups)
        lines = [header, "-" * len(header)]
        for name, per_group in metrics.items():
            cells = []
            for group in self.groups:
                m = per_group[group]
                cells.append(f" | {'':>10} {_pct(m['present'])} {_pct(m['kept'])} {_pct(m['flagged'])} "
                             f"{_pct(m['identical'])}")
            lines.append(f"{name[:18]:18}" + "".join(cells))
        return "\n".join(lines)


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def _pct(value: float | None) -> str:
    return "  -- " if value is None else f"{100 * value:4.0f}%"


def run_suite(pipe: Any, methods: Sequence[Method], prompts: Sequence[BenchPrompt], scorer: Scorer,
              settings: T2ISettings = T2ISettings(), seed: int = 0) -> SuiteResult:
    """Run every method on `prompts` (image i from seed `seed + i`) and score the images."""
    if not methods:
        raise ValueError("the suite needs at least one method (put Unguarded() first: it is the reference)")
    texts = [p.text for p in prompts]
    result = SuiteResult(list(prompts), [seed + i for i in range(len(prompts))])
    for method in methods:
        started = time.perf_counter()
        generation = method.generate(pipe, texts, result.seeds, settings)
        rows = scorer.score(generation.pil(), result.prompts)
        result.runs.append(MethodRun(method.name, generation, rows, round(time.perf_counter() - started, 1)))
    return result
