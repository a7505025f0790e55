"""How many latents should a concept's readout use, at which FPR? Measured on the calibrate split of a built recipe.

    python benchmarks/readout_budget.py --concept celebrity --strategy token_probe --budgets 1024 2048 4096
    python benchmarks/readout_budget.py --concept nudity --strategy probe --budgets 128 256

For each budget: fit the concept on its fit split (the recipe's dataset, on the recipe's packaged SAE, or `--sae`),
score its calibrate split, and print the calibrate TPR at thresholds that flag 0.4%, 1%, 2% and 3% (`--fprs`) of
the calibrate retains, with the share of its near-miss retains (look-alikes: other people, benign senses, other
painters) and of its ordinary retains (COCO captions and benign user prompts, `prompts._with_ordinary`) above each
threshold. A recipe's `n_features` and `fpr` are chosen from this table; the test split and the held-out sets are
never read.
Activations come from the build's harvest cache in `--work` (the one `sae-guard train --work` wrote), or are
harvested there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from sae_guard import prompts as prompt_sets
from sae_guard.concepts import Concept, PoorConceptWarning, load_concepts, threshold_at_fpr
from sae_guard.recipes import load_recipe
from sae_guard.recipes.models import load_model
from sae_guard.recipes.text import HarvestedCodes, concept_datasets, concept_prompts, harvest_activations
from sae_guard.sae.base import SAE

FPRS = (0.004, 0.01, 0.02, 0.03)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="minilm-prompts")
    parser.add_argument("--concept", required=True)
    parser.add_argument("--strategy", default=None, help="default: the recipe's")
    parser.add_argument("--budgets", type=int, nargs="+", default=[])
    parser.add_argument("--concepts", default=None,
                        help="a built concepts/ folder: read its fitted concept at --fprs instead of fitting budgets")
    parser.add_argument("--data", default=None, help="folder of the prompt CSVs")
    parser.add_argument("--sae", default=None, help="the SAE folder (default: the recipe's packaged sae/)")
    parser.add_argument("--work", default=None, help="harvest cache folder (default: a temporary one)")
    parser.add_argument("--fprs", type=float, nargs="+", default=list(FPRS),
                        help="calibrate-retain flag rates to read the TPR at (default: %(default)s)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not args.budgets and not args.concepts:
        parser.error("give --budgets to fit, or --concepts to read a fitted concept")

    recipe = load_recipe(args.recipe)
    spec = next((c for c in recipe.concepts if c.name == args.concept), None)
    if spec is None:
        sys.exit(f"recipe {recipe.name!r} has no concept {args.concept!r}")
    strategy = args.strategy or spec.strategy
    datasets = concept_datasets(recipe, args.data)
    data = datasets[args.concept]
    model, tokenizer = load_model(recipe)
    sae = SAE.load(Path(args.sae) if args.sae else recipe.assets / "sae")
    prompts = concept_prompts(datasets)  # the build's harvest: the same cache file as `sae-guard train --work`
    codes = HarvestedCodes(sae, harvest_activations(recipe, model, tokenizer, prompts, args.work), prompts, tokenizer)
    ordinary = set(prompt_sets.coco(args.data)) | set(prompt_sets.user_prompts(args.data))
    is_ordinary = torch.tensor([p in ordinary for p in data.calibrate.retain])
    print(f"{args.concept}: {strategy}; calibrate {len(data.calibrate.target)} targets, "
          f"{int((~is_ordinary).sum())} near-miss and {int(is_ordinary.sum())} ordinary retains")

    rows = []
    fitted = {c.name: c for c in load_concepts(Path(args.concepts))} if args.concepts else {}
    for budget in args.budgets or [None]:
        started = time.perf_counter()
        if budget is None:
            concept = fitted[args.concept]
            budget = concept.n_features
        else:
            concept = Concept(args.concept, target=data.fit.target, retain=data.fit.retain,
                              calibrate_target=data.calibrate.target, calibrate_retain=data.calibrate.retain,
                              strategy=strategy, n_features=budget, fpr=max(args.fprs))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PoorConceptWarning)  # the table says how poor
                concept.fit(codes, sae.d_sae, sae.W_dec.detach())
        target = concept.scores(codes, data.calibrate.target, sae.d_sae, sae.W_dec.detach())
        retain = concept.scores(codes, data.calibrate.retain, sae.d_sae, sae.W_dec.detach())
        row = {"budget": budget, "latents": int(concept.features.numel()), "seconds": 0.0, "at": {}}
        for fpr in args.fprs:
            threshold = threshold_at_fpr(retain, fpr)
            row["at"][fpr] = {"tpr": float((target > threshold).float().mean()),
                              "near_miss": float((retain[~is_ordinary] > threshold).float().mean()),
                              "ordinary": float((retain[is_ordinary] > threshold).float().mean())}
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        cells = "  ".join(f"{fpr:.3f}: {v['tpr']:.3f} ({v['near_miss']:.3f} / {v['ordinary']:.3f})"
                          for fpr, v in row["at"].items())
        print(f"budget {budget:5d}  latents {row['latents']:5d}  TPR (near-miss / ordinary FPR) at FPR  {cells}  "
              f"[{row['seconds']:.0f} s]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"concept": args.concept, "strategy": strategy, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
