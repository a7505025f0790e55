"""`sae-guard ood --model {shapes-vit,efficientnet} --out DIR`: the OOD benchmark of one model as a report.

Writes DIR/ood-MODEL.md and DIR/ood-MODEL.html (the table of AUROC / FPR95 per split and method, the goals)
and DIR/ood-MODEL.json (every figure, validation included); progress bars on stderr. Heavy imports wait until it runs.
"""

from __future__ import annotations

import argparse

# sae_guard.ood.benchmark.MODELS (a test keeps them equal), repeated here so that --help loads no torch
MODELS = ("shapes-vit", "efficientnet")


def ood_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=MODELS, help="the ShapesWorld ViT trained without purple "
                        "and star, or EfficientNet-Lite0 (ImageNet) with photo crops as in-distribution")
    parser.add_argument("--out", required=True, help="folder for ood-MODEL.md, .json and .html")
    parser.add_argument("--n", type=int, default=200, help="images per split (default 200)")
    parser.add_argument("--hookpoint", help="where the SAE reads (default: blocks.2 for the ViT, blocks.4 for "
                                            "EfficientNet)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run_ood(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..cli import UsageError
    from ..hooks.hookpoints import HookpointError
    from .benchmark import markdown, run, write_report

    if args.n < 10:
        raise UsageError(f"--n {args.n}: use at least 10 images per split")
    torch.set_num_threads(1)
    try:
        result = run(args.model, n=args.n, hookpoint=args.hookpoint, progress=not args.quiet,
                     log=lambda line: None if args.quiet else print(line, file=sys.stderr, flush=True))
    except HookpointError as error:
        raise UsageError(str(error)) from None
    paths = write_report(result, args.out)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
