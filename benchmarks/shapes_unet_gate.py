"""The shapes recipe's UNet stage measured: which prompts it judges, at which threshold, and what it costs.

    python benchmarks/shapes_unet_gate.py --threads 2                                          # the suite's prompts
    python benchmarks/shapes_unet_gate.py --n 60 --world-seed 2000 --fpr 0.05 0.15 0.3 --threads 2   # selection

The text gate reads prompts through an SAE on MiniLM's embedding output, where rare words ("crimson": relative
reconstruction error 0.7-0.8, `benchmarks/shapes_paraphrase.py`) stay in the SAE's error term, so it flags no
paraphrase. The recipe's `[guard.unet]` stage (sae_guard.adapters.unet_stage) judges those prompts again inside
the UNet, where red is drawn the same way whatever word asked for it. This script builds the stage exactly as
`sae-guard train` does (`unet_stage_build`: same captions, image seeds and SAE), once, with its concept calibrated
at each `--fpr`, and nothing is saved.

Rows: unguarded; the text gate alone; the text gate with the stage at each FPR; at the first FPR, the stage
judging every prompt the text gate passed (`unread_error` 0, so read prompts too); and the stage editing every
prompt it judges (a classifier that flags everything: what the edit alone can do). Groups: the suite's named,
paraphrase and control prompts (prompt i from seed i, scored as `sae-guard bench erasure` scores them), and
"other paraphrase": other colours said in other words, prompts the stage judges and should leave red-free and
alone.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from sae_guard.erasure.loading import load_t2i_pipeline, load_t2i_recipe
from sae_guard.erasure.methods import Gate, Unguarded
from sae_guard.erasure.scorers import BenchPrompt, ShapesScorer
from sae_guard.erasure.suite import BENCH_WORLD_SEED, run_suite, shapes_prompts
from sae_guard.erasure.unet_stage_build import build_unet_stages
from sae_guard.shapes.concepts import single_shape_worlds


def other_paraphrases(concept: str, n: int, seed: int) -> list[BenchPrompt]:
    """Single-shape prompts saying another colour in other words (the world's paraphrase set)."""
    _, labels, captions = single_shape_worlds(concept)[1].sample(n, seed, "paraphrase")
    return [BenchPrompt(text, "other paraphrase", scene) for text, scene in zip(captions, labels)]


class Named(Gate):
    def __init__(self, name: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="shapes")
    parser.add_argument("--n", type=int, default=200, help="prompts per group of the suite")
    parser.add_argument("--world-seed", type=int, default=BENCH_WORLD_SEED,
                        help="the suite's world seed (2000: the prompts the recipe's settings were chosen on)")
    parser.add_argument("--fpr", type=float, nargs="+", help="calibration FPRs (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t2i = load_t2i_recipe(args.recipe, unet_stage=False)
    pipe = load_t2i_pipeline(t2i.recipe)
    concepts = t2i.concepts_named(None)[:1]
    stages = build_unet_stages(t2i, pipe, args.fpr)
    text = (t2i.sae, concepts, t2i.hookpoint, t2i.edit)
    methods = [Unguarded(), Gate(*text)]
    for stage, report in stages:
        calibration = report["concept"]
        print(f"stage at FPR {calibration['fpr_target']:g}: threshold {calibration['threshold']:.3g}, calibrate "
              f"TPR {calibration['tpr']:.3f} / FPR {calibration['fpr']:.3f}, {calibration['n_features']} latents")
        methods.append(Named(f"stage fpr {calibration['fpr_target']:g}", *text, stage))
    first = stages[0][0]
    every_unflagged = dataclasses.replace(first, unread_error=0.0)
    flag_all = dataclasses.replace(first, concept=dataclasses.replace(first.concept, threshold=-float("inf")))
    methods += [Named("stage, all passed", *text, every_unflagged), Named("stage edits all", *text, flag_all)]
    prompts = shapes_prompts(concepts[0].name, args.n, seed=args.world_seed)
    prompts += other_paraphrases(concepts[0].name, args.n, args.world_seed + 3)
    result = run_suite(pipe, methods, prompts, ShapesScorer(concepts[0].name), t2i.settings, seed=t2i.seed)
    print(f"{first.block}, detect step {first.detect_step}, unread error > {first.unread_error:g}")
    print(result.table())


if __name__ == "__main__":
    main()
