"""How well the shipped ShapesWorld concepts classify prompts: flag rates per caption set, for every concept.

    python benchmarks/shapes_verdicts.py --json shapes_verdicts.json
    python benchmarks/shapes_verdicts.py --stage        # also the UNet stage's own verdicts, drawn

For each concept of the `shapes` recipe (its shipped SAE and thresholds, on the text encoder alone, called as the
pipeline calls it): the share of prompts flagged among captions that show the concept (target) and captions that
do not (retain), for `train`-template captions of the calibrate images, `heldout` templates, the `paraphrase` set
(colours in other words; shapes keep their words) and COCO test captions that do not name the concept. For the
concept of the recipe's UNet stage, also the share of each set it leaves to that stage (unflagged, with a token
the SAE reconstructs worse than the stage's `unread_error`), and with `--stage` the share it flags: every prompt
is drawn under the guard with the recipe's 20-step schedule, stopped after the detect step (the verdict is made
there; image i from seed i).
"""

from __future__ import annotations

import argparse
import json

import torch

from sae_guard.erasure.commands import verdict_rates
from sae_guard.erasure.loading import T2IRecipe, load_t2i_pipeline, load_t2i_recipe
from sae_guard.erasure.methods import Gate, draw
from sae_guard.shapes.concepts import evaluation_sets

SETS = ("train", "heldout", "paraphrase", "general")


def stage_flag_rates(t2i: T2IRecipe, data: str | None) -> dict[str, dict[str, float]]:
    """Per caption set and side, the share of prompts the UNet stage judged and flagged."""
    stage = t2i.unet_stage
    pipe = load_t2i_pipeline(t2i.recipe)
    concept = t2i.concepts_named([stage.concept.name])
    guard = Gate.attach(pipe, t2i.sae, concept, t2i.hookpoint, t2i.edit, stage)

    def stop_after_detect(pipeline, i, _t, outputs):
        pipeline._interrupt = i >= stage.detect_step
        return outputs

    rates: dict[str, dict[str, float]] = {}
    try:
        for name, split in evaluation_sets(stage.concept.name, data).items():
            for side in ("target", "retain"):
                prompts, judged = getattr(split, side), []
                if prompts:
                    draw(pipe, prompts, list(range(len(prompts))), t2i.settings, desc=f"stage ({name}, {side})",
                         after_batch=lambda: judged.extend(guard.stage.last_verdicts),
                         callback_on_step_end=stop_after_detect)
                    flagged = sum(v is not None and v.flagged for v in judged)
                    rates.setdefault(name, {})[side] = round(flagged / len(prompts), 4)
    finally:
        guard.detach()
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="shapes")
    parser.add_argument("--data", help="prompt data folder (default: the usual search)")
    parser.add_argument("--json")
    parser.add_argument("--stage", action="store_true", help="also draw, for the UNet stage's own flag rates")
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
            print(f"{name}: largest relative reconstruction error, shows / does not: " + ", ".join(
                f"{s} " + " / ".join(f"{rates[s][key]:.3f}" if key in rates[s] else "--"
                                     for key in ("target_error_max", "retain_error_max")) for s in SETS))
    if args.stage and t2i.unet_stage is not None:
        staged = stage_flag_rates(t2i, args.data)
        print(f"\n{t2i.unet_stage.concept.name}: flagged by the UNet stage, shows / does not: " + ", ".join(
            f"{name} " + " / ".join(f"{100 * r[side]:.1f}%" if side in r else "--" for side in ("target", "retain"))
            for name, r in staged.items()))
        results[f"{t2i.unet_stage.concept.name} (UNet stage)"] = staged
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
