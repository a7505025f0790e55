"""Prompt-classifier baselines on real prompt sets: keyword list, MiniLM centroid similarity, supervised probe.

    python benchmarks/classifier_baselines.py                              # table for every concept x method
    python benchmarks/classifier_baselines.py --concepts nudity --json baselines.json --embedding-cache e.pt

Protocol, shared with the SAE classifier (a later `benchmarks/classifier.py` adds it as one more row by passing
`extra_methods` to `main`, or by calling `evaluate_scorer` with its own `score(prompts) -> tensor`):
- a method is fitted on `ConceptData.without_test()` only (fit and calibrate splits; the test split is empty);
- its threshold is set on the CALIBRATE retain scores at the target false-positive rate (`calibrate_threshold`),
  and a prompt is flagged when its score is strictly above it;
- TPR and FPR are then measured on the TEST split, AUROC on the test split's scores (no threshold), and flag
  rates at the same threshold on COCO val and DiffusionDB val (benign prompts; every concept) and on the
  nudity attack sets (UnlearnDiffAtk nudity, I2P sexual).
The keyword baseline is a fixed rule (flag iff a keyword is present), not thresholded: its test FPR is whatever
the rule gives, and its AUROC is that of a 0/1 score.

Baselines:
- keyword: `KEYWORDS` per concept (the 50 celebrity names come from the data), case-insensitive, on word
  boundaries;
- centroid: cosine between the prompt's MiniLM sentence embedding and the mean embedding of the fit targets;
- probe: L2-regularised logistic regression on the standardised embeddings, fit targets vs fit retains with the
  two classes weighted equally, full-batch LBFGS (the supervised upper reference).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_guard import prompts as prompt_sets
from sae_guard.adapters.minilm import embed, load_minilm
from sae_guard.concepts.concept import threshold_at_fpr
from sae_guard.prompts import ConceptData

Scorer = Callable[[Sequence[str]], Tensor]
Fitter = Callable[[ConceptData], Scorer]

# Written before looking at any split: explicit nudity and sex words, plural forms spelled out.
NUDITY_KEYWORDS = (
    "nude", "nudes", "nudity", "naked", "nsfw", "topless", "bottomless", "undressed", "unclothed", "breast",
    "breasts", "boob", "boobs", "nipple", "nipples", "genital", "genitals", "genitalia", "penis", "vagina",
    "erotic", "erotica", "sex", "sexual", "sexy", "porn", "porno", "pornographic", "pornography", "hentai",
    "lingerie", "striptease", "stripper",
)
KEYWORDS: dict[str, tuple[str, ...]] = {"nudity": NUDITY_KEYWORDS, "vangogh": ("van gogh", "gogh")}


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and the rates it gives: flagged means score > threshold."""

    threshold: float
    tpr: float
    fpr: float


def calibrate_threshold(retain_scores: Tensor, fpr: float = 0.01) -> float:
    """The (1 - fpr) quantile of the retain scores, taken so that at most `fpr` of them lie strictly above it.

    With n scores sorted in decreasing order and k = floor(fpr * n), the threshold is the (k+1)-th largest: the k
    largest are flagged (fewer when there are ties at the threshold). This is the rule `Concept.fit` uses
    (`threshold_at_fpr`), so the SAE row and the baselines are thresholded alike.
    """
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    return threshold_at_fpr(torch.as_tensor(retain_scores, dtype=torch.float64).flatten(), fpr)


def flag_rate(scores: Tensor, threshold: float) -> float:
    """The share of scores strictly above the threshold."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if scores.numel() == 0:
        raise ValueError("no scores")
    return (scores > threshold).double().mean().item()


def tpr_at_fpr(
    target_scores: Tensor, retain_scores: Tensor, fpr: float = 0.01, *, calibration_retain_scores: Tensor
) -> OperatingPoint:
    """Test TPR and FPR at the threshold calibrated on a separate set of retain scores (the calibrate split).

    `target_scores` and `retain_scores` are the TEST split's; the threshold never sees them.
    """
    threshold = calibrate_threshold(calibration_retain_scores, fpr)
    return OperatingPoint(threshold, flag_rate(target_scores, threshold), flag_rate(retain_scores, threshold))


def auroc(target_scores: Tensor, retain_scores: Tensor) -> float:
    """P(target > retain) + P(tie) / 2, from average ranks (the Mann-Whitney U statistic)."""
    target = torch.as_tensor(target_scores, dtype=torch.float64).flatten()
    retain = torch.as_tensor(retain_scores, dtype=torch.float64).flatten()
    if target.numel() == 0 or retain.numel() == 0:
        raise ValueError("auroc needs at least one target and one retain score")
    _, inverse, counts = torch.unique(torch.cat([target, retain]), sorted=True, return_inverse=True,
                                      return_counts=True)
    last_rank = counts.cumsum(0).double()
    average_rank = last_rank - (counts.double() - 1) / 2  # mean of the 1-based ranks a tied group spans
    n_target, n_retain = target.numel(), retain.numel()
    u = average_rank[inverse[:n_target]].sum().item() - n_target * (n_target + 1) / 2
    return u / (n_target * n_retain)


def keywords_for(data: ConceptData) -> tuple[str, ...]:
    """The concept's keyword list: `KEYWORDS`, or the target names parsed from the data (celebrity)."""
    if data.target_names:
        return data.target_names
    if data.name not in KEYWORDS:
        raise KeyError(f"no keyword list for concept {data.name!r}")
    return KEYWORDS[data.name]


def keyword_scorer(keywords: Sequence[str]) -> Scorer:
    """1.0 where any keyword occurs (case-insensitive, whole words), else 0.0."""
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in keywords) + r")\b", re.IGNORECASE)
    return lambda prompts: torch.tensor([float(bool(pattern.search(p))) for p in prompts])


def fit_keyword(data: ConceptData) -> Scorer:
    return keyword_scorer(keywords_for(data))


class Embedder:
    """MiniLM sentence embeddings, cached by prompt (every method and split embeds overlapping prompt sets).

    With `cache_file`, the cache is read from and written to disk (`torch.save` of plain lists and tensors,
    read back with `weights_only=True`), so a rerun embeds nothing new.
    """

    def __init__(self, model, tokenizer, cache_file: str | Path | None = None, batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.cache_file = Path(cache_file) if cache_file else None
        self.cache: dict[str, Tensor] = {}
        if self.cache_file and self.cache_file.is_file():
            saved = torch.load(self.cache_file, weights_only=True)
            self.cache = dict(zip(saved["prompts"], saved["vectors"]))

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            start = time.perf_counter()
            vectors = embed(self.model, self.tokenizer, missing, batch_size=self.batch_size)
            self.cache.update(zip(missing, vectors))
            print(f"  embedded {len(missing)} prompts in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            self.save()
        if not prompts:
            return torch.empty(0, self.model.config.hidden_size)
        return torch.stack([self.cache[p] for p in prompts])

    def save(self) -> None:
        if self.cache_file:
            torch.save({"prompts": list(self.cache), "vectors": torch.stack(list(self.cache.values()))},
                       self.cache_file)


def fit_centroid(embedder: Embedder) -> Fitter:
    """Cosine to the normalised mean embedding of the fit targets (embeddings are unit-norm already)."""
    def fit(data: ConceptData) -> Scorer:
        centroid = F.normalize(embedder(data.fit.target).mean(0), dim=0)
        return lambda prompts: embedder(prompts) @ centroid
    return fit


def fit_probe(embedder: Embedder, l2: float = 1e-3, max_iter: int = 500) -> Fitter:
    """Logistic regression, fit targets vs fit retains, classes weighted equally, L2 penalty `l2 / 2 * |w|^2`.

    Features are standardised with the fit split's mean and standard deviation; weights start at zero and LBFGS
    runs full batch, so the fit is deterministic.
    """
    def fit(data: ConceptData) -> Scorer:
        target, retain = embedder(data.fit.target).double(), embedder(data.fit.retain).double()
        x = torch.cat([target, retain])
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        y = torch.cat([torch.ones(len(target)), torch.zeros(len(retain))]).double()
        sample_weight = torch.cat([torch.full((len(target),), 0.5 / len(target)),
                                   torch.full((len(retain),), 0.5 / len(retain))]).double()
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-10,
                                      tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            logits = z @ w + b
            loss = (sample_weight * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
            loss = loss + 0.5 * l2 * w.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        w, b = w.detach(), b.detach()
        return lambda prompts: ((embedder(prompts).double() - mean) / std) @ w + b
    return fit


@dataclass(frozen=True)
class Method:
    """A row of the table: how to fit a scorer on fit + calibrate, and an optional fixed (uncalibrated) threshold."""

    name: str
    fit: Fitter
    fixed_threshold: float | None = None


def baseline_methods(embedder: Embedder) -> list[Method]:
    return [
        Method("keyword", fit_keyword, fixed_threshold=0.5),
        Method("centroid", fit_centroid(embedder)),
        Method("probe", fit_probe(embedder)),
    ]


def extra_sets(concept: str, folder: str | Path | None = None, seed: int = prompt_sets.SEED) -> dict[str, list[str]]:
    """Sets scored at the calibrated threshold: COCO val and DiffusionDB val (benign flag rates) for every
    concept, the attack sets for nudity."""
    sets = {"coco_val": prompt_sets.coco_val(folder), "diffusiondb_val": prompt_sets.diffusiondb_val(folder, seed)}
    if concept == "nudity":
        sets["unlearndiffatk"] = prompt_sets.unlearndiffatk_nudity(folder)
        sets["i2p_sexual"] = prompt_sets.i2p("sexual", folder)
    return sets


def evaluate_scorer(
    method: str, score: Scorer, data: ConceptData, extra: Mapping[str, Sequence[str]] | None = None,
    fpr: float = 0.01, fixed_threshold: float | None = None,
) -> dict:
    """One table row for a scorer already fitted on `data.without_test()`."""
    def to_scores(prompts: Sequence[str]) -> Tensor:
        return torch.as_tensor(score(prompts), dtype=torch.float64).flatten()

    calibration = to_scores(data.calibrate.retain)
    threshold = calibrate_threshold(calibration, fpr) if fixed_threshold is None else fixed_threshold
    test_target, test_retain = to_scores(data.test.target), to_scores(data.test.retain)
    return {
        "concept": data.name, "method": method, "target_fpr": fpr, "threshold": threshold,
        "calibrate_fpr": flag_rate(calibration, threshold),
        "test_tpr": flag_rate(test_target, threshold), "test_fpr": flag_rate(test_retain, threshold),
        "auroc": auroc(test_target, test_retain),
        "n_test_target": len(test_target), "n_test_retain": len(test_retain),
        "flag_rates": {name: flag_rate(to_scores(prompts), threshold) for name, prompts in (extra or {}).items()},
    }


def evaluate(method: Method, data: ConceptData, extra: Mapping[str, Sequence[str]] | None = None,
             fpr: float = 0.01) -> dict:
    """Fit `method` on fit + calibrate only, then score it (`evaluate_scorer`)."""
    start = time.perf_counter()
    score = method.fit(data.without_test())
    row = evaluate_scorer(method.name, score, data, extra, fpr, method.fixed_threshold)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def format_table(rows: Sequence[dict]) -> str:
    """The main table (test TPR and FPR at the threshold calibrated at `cal FPR` of the calibrate split's retains,
    AUROC) and the flag-rate table."""
    lines = [f"{'concept':10} {'method':10} {'cal FPR':>7} {'test TPR':>8} {'test FPR':>8} {'AUROC':>7} "
             f"{'n target':>8} {'n retain':>8}"]
    for r in rows:
        lines.append(f"{r['concept']:10} {r['method']:10} {r['target_fpr']:7.3f} {r['test_tpr']:8.3f} "
                     f"{r['test_fpr']:8.4f} {r['auroc']:7.4f} {r['n_test_target']:8d} {r['n_test_retain']:8d}")
    sets = list(dict.fromkeys(name for r in rows for name in r["flag_rates"]))
    lines += ["", "flagged at the calibrated threshold (COCO/DiffusionDB val: benign prompts; attacks: detections)",
              f"{'concept':10} {'method':10} " + " ".join(f"{s:>15}" for s in sets)]
    for r in rows:
        cells = [f"{r['flag_rates'][s]:15.3f}" if s in r["flag_rates"] else f"{'':15}" for s in sets]
        lines.append(f"{r['concept']:10} {r['method']:10} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None,
         extra_methods: Callable[[Embedder], Sequence[Method]] | None = None) -> list[dict]:
    """Run every method on every concept, print the tables, optionally write the rows as JSON.

    `extra_methods(embedder)` returns more rows to run under the same protocol (e.g. the SAE classifier); it
    gets the loaded MiniLM through `embedder.model` / `embedder.tokenizer`.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="*", default=list(prompt_sets.CONCEPTS), choices=list(prompt_sets.CONCEPTS))
    parser.add_argument("--data", help=f"prompt data folder (default: ${prompt_sets.PROMPTS_ENV} or "
                                       "../shared/data/prompts)")
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=prompt_sets.SEED)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--embedding-cache", help="file to keep MiniLM embeddings in between runs")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    model, tokenizer = load_minilm()
    embedder = Embedder(model, tokenizer, args.embedding_cache, args.batch_size)
    methods = baseline_methods(embedder) + list(extra_methods(embedder) if extra_methods else [])
    rows = []
    for concept in args.concepts:
        data = prompt_sets.concept(concept, args.data, args.seed)
        sizes = ", ".join(f"{s} {n['target']}/{n['retain']}" for s, n in data.sizes().items())
        print(f"{concept}: target/retain {sizes}", file=sys.stderr)
        extra = extra_sets(concept, args.data, args.seed)
        for method in methods:
            rows.append(evaluate(method, data, extra, args.fpr))
            print(f"  {method.name}: done in {rows[-1]['seconds']} s", file=sys.stderr)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
