"""ShapesWorld vision backbones on held-out images: CLIP zero-shot colour/shape accuracy and the ViT's accuracy.

    python benchmarks/shapes_vision.py                 # the shipped assets, 2000 held-out single-shape images
    python benchmarks/shapes_vision.py --n 500 --json vision.json

Held-out images: ShapesWorld seed HELDOUT_SEED (2000), one shape each, never trained on (training uses seed 1000).
CLIP zero-shot: each class's text embedding is the mean of "a <colour> <shape>" over the other attribute (prompt
ensembling), the image's class is the nearest one; targets: colour >= 0.90, shape >= 0.80. The ViT reads its own
head (arg-max over colours, over shapes). Both models are loaded by the stock loaders (timm, open_clip).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sae_guard.shapes.vision import CLIP_DIR, VIT_DIR, load_clip, load_vit, vit_accuracy, zero_shot_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    model, _, tokenizer = load_clip(CLIP_DIR)
    clip = zero_shot_accuracy(model, tokenizer, n=args.n)
    vit = vit_accuracy(load_vit(VIT_DIR), n=args.n)
    result = {"clip_zero_shot": clip, "vit": vit,
              "targets_met": {"clip_colour>=0.90": clip["colour"] >= 0.90, "clip_shape>=0.80": clip["shape"] >= 0.80},
              "seconds": round(time.perf_counter() - started, 1)}
    print(f"CLIP zero-shot  colour {clip['colour']:.3f}  shape {clip['shape']:.3f}   (n={args.n} held-out images)")
    print(f"ViT head        colour {vit['colour']:.3f}  shape {vit['shape']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
