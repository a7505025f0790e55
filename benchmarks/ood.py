"""OOD detection with SAE features against MSP, energy, Mahalanobis and KNN, per model and split.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/ood.py [--model shapes-vit efficientnet] [--n 200]
                                                                [--shrinkage S] [--fused-weight W] [--test-seed S]
                                                                [--json F]

For each model (see `sae_guard.ood.benchmark`): a TopK SAE trained on in-distribution fit images only, every score
fitted on the same images, the best SAE score chosen on validation sets, then AUROC and FPR95 per test split (ID test
images, never used to fit, as negatives), the average over splits, and a PASS/FAIL line per goal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sae_guard.ood.benchmark import MODELS, TEST_SEED, goal_lines, markdown, run
from sae_guard.ood.detector import FUSED_WEIGHT, SHRINKAGE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--n", type=int, default=200, help="images per split (ID test and each OOD split)")
    ap.add_argument("--shrinkage", type=float, default=SHRINKAGE, help="every Gaussian's covariance shrinkage")
    ap.add_argument("--fused-weight", type=float, default=FUSED_WEIGHT, help="weight of sae_fused's error term")
    ap.add_argument("--test-seed", type=int, default=TEST_SEED, help="seed of the test sets (another: a fresh draw)")
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for model in args.model:
        started = time.time()
        result = run(model, n=args.n, shrinkage=args.shrinkage, fused_weight=args.fused_weight,
                     test_seed=args.test_seed, progress=sys.stderr.isatty(),
                     log=lambda line: print(line, flush=True))
        print(markdown(result))
        means = result["validation_average"]
        ranked = sorted(means, key=means.get, reverse=True)
        print("Mean AUROC over the validation splits: " + ", ".join(f"{m} {means[m]:.3f}" for m in ranked) + "\n")
        print(f"{model}: {time.time() - started:.0f}s\n", flush=True)
        results.append(result)
    print("\n".join(line for result in results for line in [f"[{result['model']}]"] + goal_lines(result)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
