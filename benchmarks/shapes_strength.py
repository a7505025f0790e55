"""How strongly should the ShapesWorld guard push the concept's latents? Red images per deactivate strength.

    python benchmarks/shapes_strength.py --strengths 0 -2 -3 -4 -5 -6 -8 -16
    python benchmarks/shapes_strength.py --recipe other.toml --assets DIR      # another hookpoint's SAE

The `shapes` recipe's gate (its shipped SAE and `red` concept) with `deactivate` edits z -> strength * z on the
flagged tokens, on 40 single-shape prompts naming red from world seed 2000, a seed the erasure suite
(`sae-guard bench erasure`, seed 1000) never draws from, so the strength is chosen on other prompts than the ones
it is reported on. Prints the suite's table: red present, shape kept, flagged, identical.
"""

from __future__ import annotations

import argparse

import torch

from sae_guard.erasure.loading import load_t2i_pipeline, load_t2i_recipe
from sae_guard.erasure.methods import Gate, Unguarded
from sae_guard.erasure.scorers import ShapesScorer
from sae_guard.erasure.suite import run_suite, shapes_prompts
from sae_guard.hooks.gate import Edit

SELECTION_WORLD_SEED = 2000


class _Strength(Gate):
    def __init__(self, *args, strength: float) -> None:
        super().__init__(*args, edit=Edit("deactivate", strength))
        self.name = f"deactivate {strength:g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="shapes")
    parser.add_argument("--assets", help="the recipe's assets folder, if not the packaged one")
    parser.add_argument("--concept", default="red")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, -2.0, -3.0, -4.0, -5.0, -6.0, -8.0, -16.0])
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t2i = load_t2i_recipe(args.recipe, args.assets)
    pipe = load_t2i_pipeline(t2i.recipe)
    concepts = t2i.concepts_named([args.concept])
    prompts = [p for p in shapes_prompts(args.concept, args.n, seed=SELECTION_WORLD_SEED) if p.group == "named"]
    methods = [Unguarded()] + [_Strength(t2i.sae, concepts, t2i.hookpoint, strength=s) for s in args.strengths]
    print(run_suite(pipe, methods, prompts, ShapesScorer(args.concept), t2i.settings, seed=t2i.seed).table())


if __name__ == "__main__":
    main()
