"""Could a better classifier let the ShapesWorld gate erase a colour said in other words? An oracle bound.

    python benchmarks/shapes_paraphrase.py                 # the erasure suite's 200 paraphrase prompts for red
    python benchmarks/shapes_paraphrase.py --n 60 --strengths 0 -8 --threads 2

The erasure suite (`sae-guard bench erasure shapes --n 200`) draws its "paraphrase" prompts from the world's
paraphrase set ("a crimson star", "a circle the colour of fresh blood"); the shipped `red` concept flags none of
them, so the gate draws them as the model does. This script asks what a perfect classifier would buy. Its oracle
gate is the gate's own edit at the recipe's hookpoint (`Gate`, `deactivate` at each strength, the SAE's error term
kept) with a decision that knows the answer: on every prompt, each token of the paraphrase's own words ("crimson",
"fresh blood"; not "a", "the colour of") has all of its SAE latents edited. Beside it, the same words deleted from
the prompt (`KeywordFilter`: no SAE). On the suite's prompts and seeds (prompt i of the suite from seed i), so the
unguarded row is the suite's. Prints the suite table, the red rate per paraphrase, and the SAE's relative
reconstruction error on each paraphrase's tokens (how much of the word the SAE's latents hold at all).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sae_guard.adapters.text import mask_fn_for
from sae_guard.erasure.loading import T2IRecipe, load_t2i_pipeline, load_t2i_recipe
from sae_guard.erasure.methods import Generation, KeywordFilter, Method, T2ISettings, Unguarded, draw
from sae_guard.erasure.scorers import ShapesScorer
from sae_guard.erasure.suite import run_suite, shapes_prompts
from sae_guard.hooks.capture import capture_hidden
from sae_guard.hooks.gate import Edit, Gate, GateCall
from sae_guard.hooks.hookpoints import find_hookpoint
from sae_guard.shapes.world import colour_paraphrases

FUNCTION_WORDS = ("a", "an", "the", "of", "colour", "coloured", "-")


def paraphrase_words(colour: str) -> list[str]:
    """The words each paraphrase of `colour` adds ("crimson", "ripe strawberries"), without "the colour of"."""
    return [p.removeprefix("the colour of ") for p in colour_paraphrases(colour)]


def located_ids(tokenizer: Any, words: Sequence[str]) -> Tensor:
    """The token ids that say the colour in `words`: all of theirs but FUNCTION_WORDS'."""
    ids = {i for w in words for i in tokenizer(w, add_special_tokens=False)["input_ids"]}
    ignored = {i for w in FUNCTION_WORDS for i in tokenizer(w, add_special_tokens=False)["input_ids"]}
    return torch.tensor(sorted(ids - ignored))


class OracleGate(Method):
    """The gate's edit at the recipe's hookpoint, on every latent of the tokens that say the colour."""

    def __init__(self, t2i: T2IRecipe, words: Sequence[str], strength: float) -> None:
        self.t2i, self.words, self.edit = t2i, list(words), Edit("deactivate", strength)
        self.name = f"oracle gate {strength:g}"

    def generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: T2ISettings) -> Generation:
        encoder = pipe.text_encoder
        located, real_tokens = located_ids(pipe.tokenizer, self.words), mask_fn_for(encoder)
        call_ids: list[Tensor] = []

        def mask_fn(args: tuple, kwargs: dict) -> Tensor | None:
            call_ids[:] = [kwargs.get("input_ids", args[0] if args else None)]
            return real_tokens(args, kwargs)

        def decide(call: GateCall) -> Tensor:
            ids = call_ids[0].to(call.prompt_index.device)[call.prompt_index, call.token_index]
            return torch.isin(ids, located.to(ids.device))[:, None] & (call.codes.values != 0)

        gate = Gate(find_hookpoint(encoder, self.t2i.recipe.hookpoint), self.t2i.sae, decide, self.edit,
                    mask_fn=mask_fn).attach()
        try:
            images = draw(pipe, prompts, seeds, settings, desc=self.name)
        finally:
            gate.detach()
        flagged = [bool(torch.isin(pipe.tokenizer(p, return_tensors="pt").input_ids, located).any()) for p in prompts]
        return Generation(images, flagged, [None] * len(prompts))


@torch.no_grad()
def reconstruction_error(t2i: T2IRecipe, pipe: Any, words: Sequence[str]) -> dict[str, float]:
    """||x - x_hat|| / ||x|| of the recipe's SAE on the tokens of each word that the oracle edits (`located_ids`),
    read in the prompt "a WORD"."""
    point, errors = find_hookpoint(pipe.text_encoder, t2i.recipe.hookpoint), {}
    for word in words:
        inputs = pipe.tokenizer(f"a {word}", return_tensors="pt")
        said = torch.isin(inputs["input_ids"][0], located_ids(pipe.tokenizer, [word]))
        x = capture_hidden(point, **inputs)[0, said].float()
        errors[word] = float((x - t2i.sae.decode(t2i.sae.encode(x))).norm() / x.norm())
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="shapes")
    parser.add_argument("--assets", help="the recipe's assets folder, if not the packaged one")
    parser.add_argument("--concept", default="red")
    parser.add_argument("--n", type=int, default=200, help="prompts (the suite's paraphrase group of this size)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, -2.0, -4.0, -8.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t2i = load_t2i_recipe(args.recipe, args.assets)
    pipe = load_t2i_pipeline(t2i.recipe)
    suite = shapes_prompts(args.concept, args.n)
    first = next(i for i, p in enumerate(suite) if p.group == "paraphrase")
    prompts = [p for p in suite if p.group == "paraphrase"]
    words = paraphrase_words(args.concept)
    methods = [Unguarded(), *(OracleGate(t2i, words, s) for s in args.strengths), KeywordFilter(words)]
    methods[-1].name = "delete the words"
    result = run_suite(pipe, methods, prompts, ShapesScorer(args.concept), t2i.settings, seed=t2i.seed + first)
    print(result.table())

    errors = reconstruction_error(t2i, pipe, [args.concept, *words])
    print(f"\n{args.concept} drawn, per paraphrase (n prompts), and the SAE's relative reconstruction error on its "
          f"tokens ({args.concept!r} itself: {errors[args.concept]:.2f})")
    print(f"{'paraphrase':28}" + "".join(f" | {run.name[:16]:>16}" for run in result.runs) + " | SAE error")
    for word in words:
        index = [i for i, p in enumerate(result.prompts) if word in p.text]
        if index:
            rates = [sum(run.rows[i]["present"] for i in index) / len(index) for run in result.runs]
            cells = "".join(f" | {rate:16.2f}" for rate in rates)
            print(f"{word + f' ({len(index)})':28}{cells} | {errors[word]:9.2f}")


if __name__ == "__main__":
    main()
