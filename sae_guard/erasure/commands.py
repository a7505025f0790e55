"""The `sae-guard demo`, `generate` and `bench erasure` commands (argument parsers and runners for sae_guard.cli).

    sae-guard demo --out demo/                       # the shipped ShapesWorld model erases `red`: report.html
    sae-guard generate shapes --prompts p.txt --out imgs/ --seed 0 [--no-guard] [--concept NAME ...]
    sae-guard bench erasure shapes [--concept red] [--out DIR]   # our gate against three baselines

Heavy imports happen inside the runners, so `sae-guard --help` stays fast; sae_guard.cli imports this module when
it builds its parser. Errors the user can fix raise the CLI's `UsageError` (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cli import UsageError, read_prompt_lines

DEFAULT_RECIPE = "shapes"
DEMO_PROMPTS_PER_GROUP = 48
BENCH_PROMPTS_PER_GROUP = 60
REPORT_MARKER = "metrics.json"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _output_folder(path: str, marker: str | None) -> Path:
    """A folder the command may (re)write: absent, empty, or (with `marker`) one of this command's own outputs."""
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a folder")
        if any(out.iterdir()) and (marker is None or not (out / marker).is_file()):
            raise UsageError(f"--out {out}: folder is not empty; give a new or empty folder (nothing was written)")
    try:  # find out now, not after minutes of drawing: outputs are staged beside the folder, then renamed
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{out.name}-probe-", dir=out.parent))
    except OSError as error:
        raise UsageError(f"--out {out}: cannot write there ({error.strerror or error}); give a folder you can write "
                         "to") from None
    return out


MAX_SEED = 2**63 - 1  # torch seeds are signed 64-bit


def seed_argument(text: str) -> int:
    """--seed: an integer torch can seed with (0 to 2**63 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {value}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the ShapesWorld models are small, and on a shared "
                             "machine one thread is many times faster than two competing with other work)")


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads)


def _load(recipe_name: str, assets: str | None = None) -> Any:
    from ..recipes import RecipeError
    from .loading import load_t2i_recipe

    try:
        return load_t2i_recipe(recipe_name, assets)
    except (RecipeError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None


def _pipeline(t2i: Any) -> Any:
    from .loading import load_t2i_pipeline

    try:
        return load_t2i_pipeline(t2i.recipe)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None


def _concepts(t2i: Any, names: Sequence[str] | None) -> list[Any]:
    from ..recipes import RecipeError

    try:
        return t2i.concepts_named(names)
    except RecipeError as error:
        raise UsageError(str(error)) from None


# ------------------------------------------------------------------------------------------------ verdicts
def verdict_rates(t2i: Any, concept: Any, data_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Share of prompts the concept flags, per ShapesWorld caption set (train, heldout, paraphrase) and side
    (target: shows the concept; retain: does not), and on COCO test captions; classified by the recipe's SAE on
    the text encoder alone, as the pipeline calls it (attention mask, real tokens). With a UNet stage for the
    concept, also the share it would judge (`target_unread`, `retain_unread`: unflagged, error above its
    `unread_error`) and the largest error (`target_error_max`, ...)."""
    from tqdm.auto import tqdm

    from ..adapters.guard import guard
    from ..recipes import load_model
    from ..shapes.concepts import evaluation_sets

    model, tokenizer = load_model(t2i.recipe)
    g = guard(model, sae=t2i.sae, concepts=[concept], hookpoint=t2i.recipe.hookpoint, tokenizer=tokenizer)
    stage = t2i.unet_stage_for([concept])
    rates: dict[str, dict[str, float]] = {}
    try:
        sets = evaluation_sets(concept.name, data_dir)
        for name, split in tqdm(sets.items(), desc=f"verdicts ({concept.name})", unit="set", leave=False):
            rates[name] = {}
            for side in ("target", "retain"):
                prompts = getattr(split, side)
                if prompts:
                    verdicts = g.classify(prompts, batch_size=64)
                    rates[name][side] = round(sum(v.flagged for v in verdicts) / len(prompts), 4)
                    rates[name][f"n_{side}"] = len(prompts)
                    if stage is not None:
                        unread = sum(stage.judges(v) for v in verdicts)
                        rates[name][f"{side}_unread"] = round(unread / len(prompts), 4)
                        rates[name][f"{side}_error_max"] = round(max(v.error for v in verdicts), 4)
    finally:
        g.detach()
    return rates


def _verdict_section(rates: dict[str, dict[str, float]], concept: str) -> str:
    staged = any("target_unread" in r or "retain_unread" in r for r in rates.values())
    unread = ("<th>left to the UNet stage, shows / does not</th>" if staged else "")
    rows = "".join(f"<tr><th>{name}</th><td>{_cell(r.get('target'))}</td><td>{_cell(r.get('retain'))}</td>"
                   + (f"<td>{_cell(r.get('target_unread'))} / {_cell(r.get('retain_unread'))}</td>" if staged else "")
                   + f"<td>{r.get('n_target', 0)} / {r.get('n_retain', 0)}</td></tr>" for name, r in rates.items())
    return (f"<h2>Classifier verdicts for {concept!r} (text only)</h2><table><tr><th>caption set</th>"
            f"<th>flagged, shows {concept}</th><th>flagged, does not</th>{unread}<th>n</th></tr>{rows}</table>")


def _cell(value: float | None) -> str:
    return "&ndash;" if value is None else f"{100 * value:.1f}%"


# ------------------------------------------------------------------------------------------------ demo
def demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_threads_argument(parser)
    parser.add_argument("--out", required=True, help="folder for report.html, metrics.json and image grids")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="text-to-image recipe (default: shapes)")
    parser.add_argument("--concept", action="append", help="concept to erase (default: the recipe's [guard] list)")
    parser.add_argument("--n", type=int, default=DEMO_PROMPTS_PER_GROUP, help="prompts per group")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the recipe's)")
    parser.add_argument("--data", help="prompt data folder (COCO captions for the verdict table)")
    parser.add_argument("--assets", help="assets folder to use instead of the recipe's packaged one")


def run_demo(args: argparse.Namespace) -> int:
    from ..shapes.concepts import concept_kind
    from .methods import Gate, Unguarded
    from .report import write_report
    from .scorers import ShapesScorer
    from .suite import run_suite, shapes_prompts

    started = time.perf_counter()
    _set_threads(args)
    out = _output_folder(args.out, REPORT_MARKER)
    if args.n <= 0:
        raise UsageError(f"--n must be positive, got {args.n}")
    _log(f"loading recipe {args.recipe!r} and its pipeline")
    t2i = _load(args.recipe, args.assets)
    concepts = _concepts(t2i, args.concept)
    first = concepts[0]
    try:
        concept_kind(first.name)
    except ValueError as error:
        raise UsageError(f"the demo scores ShapesWorld concepts: {error}") from None
    pipe = _pipeline(t2i)
    settings = _settings(t2i.settings, args.steps)
    prompts = shapes_prompts(first.name, args.n)
    stage = _unet_stage(t2i, concepts, settings)
    methods = [Unguarded(), Gate(t2i.sae, concepts, t2i.hookpoint, t2i.edit, stage)]
    _log(f"drawing {len(prompts)} prompts x {len(methods)} methods ({settings.steps} steps, "
         f"{settings.image_size}px); erasing {[c.name for c in concepts]} at {t2i.hookpoint}")
    result = run_suite(pipe, methods, prompts, ShapesScorer(first.name), settings, seed=t2i.seed)
    rates = verdict_rates(t2i, first, args.data)
    facts = {"recipe": t2i.recipe.name, "erased": [c.name for c in concepts], "hookpoint": t2i.hookpoint,
             "edit": f"{t2i.edit.mode} (strength {t2i.edit.strength})", "steps": settings.steps,
             "guidance_scale": settings.guidance_scale, "seed": t2i.seed, "verdicts": rates,
             "unet_stage": _stage_facts(stage),
             "seconds": round(time.perf_counter() - started, 1)}
    write_report(out, result, f"sae-guard demo: erasing {', '.join(c.name for c in concepts)}", facts,
                 [_verdict_section(rates, first.name)])
    print(result.table())
    print(f"\nverdicts ({first.name}): " + ", ".join(
        f"{name} {100 * r.get('target', 0):.0f}% / {100 * r.get('retain', 0):.1f}%" for name, r in rates.items())
        + "  (flagged when shown / when not)")
    print(f"report: {out / 'report.html'}  ({facts['seconds']} s)")
    return 0


def _unet_stage(t2i: Any, concepts: Sequence[Any], settings: Any) -> Any:
    """The recipe's UNet stage when it judges one of `concepts`, refused when sampling never reaches it."""
    from .methods import Gate

    stage = t2i.unet_stage_for(concepts)
    try:
        Gate.check_steps(stage, settings.steps)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return stage


def _stage_facts(stage: Any) -> dict[str, Any] | None:
    """What the report says of a UNet stage: where and when it judges, which prompts, its calibration."""
    if stage is None:
        return None
    calibration = stage.concept.calibration
    return {"block": stage.block, "detect_step": stage.detect_step, "unread_error": stage.unread_error,
            "edit": f"{stage.edit.mode} (strength {stage.edit.strength})", "threshold": stage.concept.threshold,
            "calibration": {k: calibration.get(k) for k in ("fpr", "tpr", "n_features")}}


def _settings(settings: Any, steps: int | None) -> Any:
    from dataclasses import replace

    if steps is None:
        return settings
    if steps <= 0:
        raise UsageError(f"--steps must be positive, got {steps}")
    return replace(settings, steps=steps)


# ------------------------------------------------------------------------------------------------ generate
def generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_threads_argument(parser)
    parser.add_argument("recipe", help="text-to-image recipe name (e.g. shapes) or path to a .toml")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line ('-' reads stdin)")
    parser.add_argument("--out", required=True, help="new folder: 0000.png, 0001.png, ... and verdicts.jsonl")
    parser.add_argument("--seed", type=seed_argument, required=True, help="image i is drawn from seed N + i")
    parser.add_argument("--no-guard", action="store_true", help="draw unguarded (verdicts are still recorded)")
    parser.add_argument("--concept", action="append", help="concept to erase (default: the recipe's [guard] list)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the recipe's)")
    parser.add_argument("--assets", help="assets folder to use instead of the recipe's packaged one")


def run_generate(args: argparse.Namespace) -> int:
    """Write one PNG per prompt line, in order, and one verdict per line, into a new folder (atomically)."""
    from .methods import Gate, draw

    out = _output_folder(args.out, None)
    prompts = read_prompt_lines(args.prompts)
    if not prompts:
        raise UsageError(f"--prompts {args.prompts}: no lines")
    if args.seed + len(prompts) - 1 > MAX_SEED:
        raise UsageError(f"--seed {args.seed}: image {len(prompts) - 1} would need seed {args.seed + len(prompts) - 1}, "
                         "past 2**63 - 1")
    _set_threads(args)
    t2i = _load(args.recipe, args.assets)
    concepts = _concepts(t2i, args.concept)
    settings = _settings(t2i.settings, args.steps)
    pipe = _pipeline(t2i)
    stage = _unet_stage(t2i, concepts, settings)
    guard = Gate.attach(pipe, t2i.sae, concepts, t2i.hookpoint, t2i.edit, stage)
    verdicts: list[Any] = []
    try:
        if args.no_guard:
            for gate in guard.gates:
                gate.mode = "score"  # verdicts without edits: the images are the unguarded pipeline's
        seeds = [args.seed + i for i in range(len(prompts))]
        images = draw(pipe, prompts, seeds, settings, desc="generate",
                      after_batch=lambda: verdicts.extend(guard.last_verdicts))
    finally:
        guard.detach()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        from PIL import Image

        lines = []
        for i, (prompt, image, verdict) in enumerate(zip(prompts, images, verdicts, strict=True)):
            Image.fromarray((image * 255).round().astype("uint8")).save(staging / f"{i:04d}.png")
            lines.append(json.dumps({"index": i, "prompt": prompt, "seed": seeds[i], "guarded": not args.no_guard,
                                     **verdict.to_dict()}, ensure_ascii=False))
        (staging / "verdicts.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    flagged = sum(v.flagged for v in verdicts)
    print(f"{len(prompts)} images in {out} ({flagged} flagged{', not edited' if args.no_guard else ''})")
    return 0


# ------------------------------------------------------------------------------------------------ bench
def bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_threads_argument(parser)
    parser.add_argument("suite", choices=["erasure"], help="which suite")
    parser.add_argument("recipe", help="text-to-image recipe name (e.g. shapes) or path to a .toml")
    parser.add_argument("--concept", help="concept to erase (default: the recipe's first [guard] concept)")
    parser.add_argument("--out", help="folder for report.html, metrics.json, grids (default: bench-erasure-NAME)")
    parser.add_argument("--n", type=int, default=BENCH_PROMPTS_PER_GROUP, help="prompts per group")
    parser.add_argument("--scorer", default="shapes", choices=["shapes", "nudenet", "clip"])
    parser.add_argument("--clip-weights", help="local CLIP folder (transformers format) for --scorer clip")
    parser.add_argument("--named", help="text file of prompts naming the concept (other recipes than ShapesWorld)")
    parser.add_argument("--paraphrase", help="text file of prompts saying it in other words")
    parser.add_argument("--control", help="text file of control prompts")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the recipe's)")
    parser.add_argument("--data", help="prompt data folder (the concept's fit split, for ItD)")


def run_bench(args: argparse.Namespace) -> int:
    from ..adapters.guard import guard
    from ..concepts.concept import Concept
    from ..recipes import concept_datasets, load_model
    from .methods import Gate, InterpretThenDeactivate, KeywordFilter, NegativePrompt, Unguarded
    from .report import write_report
    from .scorers import BenchPrompt, scorer_for
    from .suite import run_suite, shapes_prompts

    started = time.perf_counter()
    _set_threads(args)
    t2i = _load(args.recipe)
    concept = _concepts(t2i, [args.concept] if args.concept else t2i.erase[:1])[0]
    out = _output_folder(args.out or f"bench-erasure-{concept.name}", REPORT_MARKER)
    if args.n <= 0:
        raise UsageError(f"--n must be positive, got {args.n}")
    files = {"named": args.named, "paraphrase": args.paraphrase, "control": args.control}
    if any(files.values()):
        prompts = [BenchPrompt(text, group) for group, path in files.items() if path for text in read_prompt_lines(path)]
    else:
        try:
            prompts = shapes_prompts(concept.name, args.n)
        except ValueError as error:
            raise UsageError(f"{error}; for other concepts give --named/--paraphrase/--control prompt files") from None
    try:
        scorer = scorer_for(args.scorer, concept.name, **({"weights": args.clip_weights} if args.clip_weights else {}))
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    settings = _settings(t2i.settings, args.steps)
    pipe = _pipeline(t2i)

    _log("fitting ItD's features on the concept's fit split and its threshold on the same target prompts")
    data = concept_datasets(t2i.recipe, args.data)[concept.name]
    n_top = 2 * int(getattr(t2i.sae.cfg, "k", 32))  # ItD: top-128 per prompt for k = 64
    itd_concept = Concept(concept.name, target=data.fit.target, retain=data.fit.retain,
                          calibrate_target=data.fit.target, calibrate_retain=data.fit.retain, strategy="itd",
                          n_features=n_top)
    model, tokenizer = load_model(t2i.recipe)
    guard(model, sae=t2i.sae, concepts=[itd_concept], hookpoint=t2i.recipe.hookpoint, tokenizer=tokenizer).detach()
    itd = InterpretThenDeactivate(t2i.sae, itd_concept.features, t2i.hookpoint)
    itd.calibrate(pipe, data.fit.target)

    stage = _unet_stage(t2i, [concept], settings)
    methods = [Unguarded(), Gate(t2i.sae, [concept], t2i.hookpoint, t2i.edit, stage), KeywordFilter([concept.name]),
               NegativePrompt(concept.name), itd]
    _log(f"drawing {len(prompts)} prompts x {len(methods)} methods ({settings.steps} steps)")
    result = run_suite(pipe, methods, prompts, scorer, settings, seed=t2i.seed)
    facts = {"recipe": t2i.recipe.name, "concept": concept.name, "scorer": scorer.name, "hookpoint": t2i.hookpoint,
             "edit": f"{t2i.edit.mode} (strength {t2i.edit.strength})", "steps": settings.steps,
             "guidance_scale": settings.guidance_scale, "seed": t2i.seed,
             "gate_threshold": concept.threshold, "gate_features": int(concept.features.numel()),
             "itd_threshold": itd.threshold, "itd_features": int(itd.features.numel()),
             "unet_stage": _stage_facts(stage),
             "seconds": round(time.perf_counter() - started, 1)}
    write_report(out, result, f"sae-guard bench erasure: {concept.name} ({t2i.recipe.name})", facts)
    print(result.table())
    print(f"report: {out / 'report.html'}  ({facts['seconds']} s)")
    return 0
