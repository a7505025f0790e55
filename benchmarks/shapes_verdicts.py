"""How well the shipped ShapesWorld concepts classify prompts: flag rates per caption set, for every concept.

    python benchmarks/shapes_verdicts.py --json shapes_verdicts.json

For each concept of the `shapes` recipe (its shipped SAE and thresholds, on the text encoder alone, called as the
pipeline calls it): the share of prompts flagged among captions that show the concept (target) and captions that
do not (retain), for `train`-template captions of the calibrate images, `heldout` templates, the `paraphrase` set
(colours in other words; shapes keep their words) and COCO test captions that do not name the concept. For the
concept of the recipe's UNet stage, also the share of each set it leaves to that stage (unflagged, with a token
the SAE reconstructs worse than the stage's `unread_error`).
"""

from __future__ import annotations

import argparse
import json

import torch

from sae_guard.erasure.commands import verdict_rates
from sae_guard.erasure.loading import load_t2i_recipe

SETS = ("train", "heldout", "paraphrase", "general")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="shapes")
    parser.add_argument("--data", help="prompt data folder (default: the usual search)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t2i = load_t2i_recipe(args.recipe)
    results = {c.name: verdict_rates(t2i, c, args.data) for c in t2i.concepts}
    print(f"{'concept':9}" + "".join(f" {name:>10} TPR  FPR" for name in SETS))
    for name, rates in results.items():
        cells = []
        for set_name in SETS:
            r = rates[set_name]
            tpr = f"{100 * r['target']:5.1f}" if "target" in r else "   --"
            cells.append(f" {'':>9}{tpr} {100 * r['retain']:4.1f}")
        print(f"{name:9}" + "".join(cells))
    for name, rates in results.items():
        if any("retain_unread" in r for r in rates.values()):
            shares = {s: {side: f"{100 * rates[s][key]:.1f}%" if key in rates[s] else "--"
                          for side, key in (("shows", "target_unread"), ("not", "retain_unread"))} for s in SETS}
            print(f"\n{name}: left to the UNet stage, shows / does not: "
                  + ", ".join(f"{s} {cell['shows']} / {cell['not']}" for s, cell in shares.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
