"""ShapesWorld text-to-image quality: colour right / shape right on captions the model was not trained on.

    python benchmarks/shapes_t2i.py                        # the shipped pipeline at the [t2i] defaults
    python benchmarks/shapes_t2i.py --n 100 --scheduler DDIMScheduler DPMSolverMultistepScheduler \
        --guidance-scale 1.5 3 5                           # every scheduler x guidance scale, to pick defaults
    python benchmarks/shapes_t2i.py --json t2i.json
    python benchmarks/shapes_t2i.py --vae-only             # the VAE's round trip alone: its ceiling on colour right

Definitions (sae_guard/shapes/t2i_eval.py): one-shape captions from ShapesWorld's "heldout" templates (world seed
EVAL_SEED, never trained on); colour right = the scorer's colours are exactly {named colour}; shape right = the
shape classifier's shapes are exactly {named shape}. `<colour>_present` = share of that colour's prompts whose
image shows it. Steps, guidance scale and seed come from the `[t2i]` table of pipelines/shapes.toml.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import torch

from sae_guard.shapes.t2i import T2I_ASSETS, load_pipeline
from sae_guard.shapes.t2i_eval import t2i_quality, vae_roundtrip

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "shapes.toml"


def use_scheduler(pipe, name: str) -> None:
    """Swap in another stock scheduler over the same noise schedule and prediction type."""
    import diffusers

    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)


def main(argv: list[str] | None = None) -> None:
    defaults = tomllib.loads(RECIPE.read_text())["t2i"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="held-out captions")
    parser.add_argument("--caption-set", default="heldout", choices=("heldout", "train", "paraphrase"))
    parser.add_argument("--steps", type=int, default=defaults["steps"])
    parser.add_argument("--guidance-scale", type=float, nargs="+", default=[defaults["guidance_scale"]])
    parser.add_argument("--scheduler", nargs="+", default=None,
                        help="diffusers scheduler classes to compare (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--assets", default=str(T2I_ASSETS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vae-only", action="store_true",
                        help="only the VAE's round trip of rendered held-out images (colour right after decode)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = load_pipeline(assets=args.assets)
    if args.vae_only:
        figures = vae_roundtrip(pipe, args.n, args.caption_set)
        print(f"VAE round trip of {args.n} rendered {args.caption_set} images: colour right "
              f"{figures['vae_colour_right']:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        return
    schedulers = args.scheduler or [type(pipe.scheduler).__name__]
    settings = [(scheduler, guidance) for scheduler in schedulers for guidance in args.guidance_scale]
    rows = []
    print(f"{args.n} {args.caption_set} one-shape captions, {args.steps} steps, seed {args.seed}")
    print("| scheduler | guidance | colour right | shape right | both | red present | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for scheduler, guidance in settings:
        use_scheduler(pipe, scheduler)
        start = time.perf_counter()
        figures = t2i_quality(pipe, args.n, args.caption_set, args.steps, guidance, args.seed)
        seconds = time.perf_counter() - start
        rows.append({"scheduler": scheduler, "guidance_scale": guidance, "steps": args.steps, "n": args.n,
                     "caption_set": args.caption_set, "seconds": round(seconds, 1)} | figures)
        print(f"| {scheduler} | {guidance} | {figures['colour_right']:.3f} | {figures['shape_right']:.3f} | "
              f"{figures['both_right']:.3f} | {figures.get('red_present', float('nan')):.3f} | {seconds:.0f} |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
