"""Commands of the analyses. `sae-guard blindspots --out DIR [--plant red] [--n N]`: the blindspot study
(sae_guard.analysis.blindspots_study).

Heavy imports happen inside the runner, so `sae-guard --help` stays fast; errors the user can fix raise the CLI's
`UsageError` (exit code 2) before anything is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def blindspots_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for report.html, report.md and figures.json")
    parser.add_argument("--n", type=int, help="evaluation captions (default 400)")
    parser.add_argument("--plant", action="append", metavar="ATTRIBUTE",
                        help="a planted blindspot: a colour or shape (drawn behind the shapes recipe's gate on it) or "
                             "a 'colour shape' pair (never drawn); repeat for several (default: red, 'blue star')")
    parser.add_argument("--fit-images", type=int, help="real images the SAE is fitted on and its concepts are named "
                                                       "from (default 3000)")
    parser.add_argument("--d-sae", type=int, help="SAE concepts (default 512)")
    parser.add_argument("--k", type=int, help="SAE top-k (default 8)")
    parser.add_argument("--tokens", type=int, help="SAE training tokens (default 600000)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def run_blindspots(args: argparse.Namespace) -> int:
    import torch

    from .blindspots_study import StudyConfig, run_study
    from ..cli import UsageError

    if args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "figures.json").is_file())):
        raise UsageError(f"--out {out}: give a new or empty folder, or one this command wrote (nothing was written)")
    try:
        given = {"n": args.n, "plant": tuple(args.plant) if args.plant else None, "fit_images": args.fit_images,
                 "d_sae": args.d_sae, "k": args.k, "tokens": args.tokens, "steps": args.steps}
        cfg = StudyConfig(**{name: value for name, value in given.items() if value is not None})
    except ValueError as error:
        raise UsageError(str(error)) from None
    torch.set_num_threads(args.threads)
    figures = run_study(out, cfg, log=lambda message: print(message, file=sys.stderr, flush=True))
    summary = {name: {"plants": {p["attribute"]: {"best_rank": p["best_rank"], "median_rank": p["median_rank"],
                                                  "of": p["of"], "auroc": p["auroc"]} for p in v["plants"]},
                      "spearman_delta_vs_rate": v["spearman_delta_vs_rate"]}
               for name, v in figures["variants"].items()}
    print(json.dumps(summary, indent=2))
    print(f"report: {out / 'report.html'}  ({figures['seconds']} s)", file=sys.stderr)
    return 0
