"""Which MiniLM layer should the ShapesWorld guard sit on? Measured per layer: the verdicts and what the UNet sees.

    python benchmarks/shapes_hookpoint.py --json shapes_hookpoint.json
    python benchmarks/shapes_hookpoint.py --points embeddings 2 --tokens 300000        # quicker

The ShapesWorld pipeline (`sae_guard.shapes.t2i`) calls MiniLM with an attention mask on prompts padded to 32
tokens, and its UNet cross-attends to all 32 final-layer states, padding included. The gate edits real tokens
only, so an edit on the last layer leaves the padding states, which have read the prompt, as they were; an edit
lower down is re-read by every later layer, and the embedding output (`embeddings`, before any attention) is
the one point where a word is still held by its own token alone. For each point (`embeddings`, and the output of
each layer `encoder.layer.L`, given as L):

1. train a TopK SAE on the real-token activations of ShapesWorld train captions (world seed 0) plus COCO and
   DiffusionDB prompts, and fit the `red` concept on its fit split (`sae_guard.shapes.concepts`), threshold at
   1% FPR on its calibrate split;
2. verdicts: the share of flagged prompts among heldout-template and paraphrase captions with and without red,
   and among COCO test captions;
3. what the UNet sees: a logistic probe for "the prompt asks for red", trained on unguarded final-layer states
   (mean over all 32 positions) of fit captions, is read on the guarded final-layer states of the heldout and
   paraphrase red captions, for each edit strength (`deactivate`: z -> strength * z on the concept's latents).
   The share it still calls red is the text-side proxy for erasure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import sae_guard
from sae_guard import prompts as prompt_sets
from sae_guard.concepts import Concept
from sae_guard.hooks.gate import Edit
from sae_guard.shapes.concepts import concept_data, evaluation_sets, world_captions
from sae_guard.shapes.t2i import MAX_TOKENS, text_components

N_LAYERS = 6  # all-MiniLM-L6-v2


@torch.no_grad()
def point_activations(model, tokenizer, prompts: list[str], points: list[str],
                      batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Real-token activations at every point, (n_tokens, 384) fp16 each, from one forward pass per batch."""
    index = {point: 0 if point == "embeddings" else int(point) + 1 for point in points}
    chunks: dict[str, list[torch.Tensor]] = {point: [] for point in points}
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True,
                          max_length=MAX_TOKENS, return_tensors="pt")
        states = model(**batch, output_hidden_states=True).hidden_states  # [embeddings, layer 0, ..., layer 5]
        real = batch["attention_mask"].bool()
        for point in points:
            chunks[point].append(states[index[point]][real].half())
    return {point: torch.cat(parts) for point, parts in chunks.items()}


def module_path(point: str) -> str:
    return point if point == "embeddings" else f"encoder.layer.{point}"


@torch.no_grad()
def unet_view(model, tokenizer, prompts: list[str], batch_size: int = 128) -> torch.Tensor:
    """(n, 384): the mean of the 32 final-layer states the pipeline hands the UNet, padding included."""
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], padding="max_length", truncation=True,
                          max_length=MAX_TOKENS, return_tensors="pt")
        out.append(model(**batch).last_hidden_state.mean(1))
    return torch.cat(out)


def train_probe(features: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> torch.nn.Linear:
    """Logistic regression (standardised inputs folded into the weights), full-batch Adam."""
    torch.manual_seed(0)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    probe = torch.nn.Linear(features.shape[1], 1)
    optimiser = torch.optim.Adam(probe.parameters(), lr=0.05)
    x = (features - mean) / std
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x)[:, 0], labels.float())
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        probe.weight /= std
        probe.bias -= (probe.weight * mean).sum()
    return probe


def red_rate(probe: torch.nn.Linear, features: torch.Tensor) -> float:
    with torch.no_grad():
        return (probe(features)[:, 0] > 0).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", nargs="+", default=["embeddings", *map(str, range(N_LAYERS))],
                        help="'embeddings' and/or layer numbers")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, -4.0, -8.0])
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=600_000)
    parser.add_argument("--coco", type=int, default=8000, help="COCO captions in the SAE's training prompts")
    parser.add_argument("--world", type=int, default=6000, help="ShapesWorld train-caption images (seed 0)")
    parser.add_argument("--concept", default="red")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    model, tokenizer = text_components()
    data = concept_data(args.concept)
    held_out = data.held_out()
    world = list(dict.fromkeys(world_captions("train", 0, args.world)[0]))
    general = prompt_sets.coco()[: args.coco] + prompt_sets.diffusiondb()[: args.coco // 4]
    training = [p for p in prompt_sets.clean(world + general) if p not in held_out]
    print(f"harvesting {len(training)} prompts at {args.points}", file=sys.stderr)
    activations = point_activations(model, tokenizer, training, args.points)

    sets = evaluation_sets(args.concept)
    fit_captions = data.fit.target + data.fit.retain
    probe = train_probe(unet_view(model, tokenizer, fit_captions),
                        torch.tensor([1] * len(data.fit.target) + [0] * len(data.fit.retain)))
    red_sets = {name: sets[name].target for name in ("heldout", "paraphrase")}
    unguarded = {name: red_rate(probe, unet_view(model, tokenizer, p)) for name, p in red_sets.items()}
    results = {"probe_unguarded_red_rate": unguarded, "training_prompts": len(training), "layers": {}}
    for point in args.points:
        torch.manual_seed(0)
        sae = sae_guard.SAE.create("topk", d_in=384, d_sae=args.d_sae, k=args.k)
        sae, figures = sae_guard.train(sae, activations[point].float(), tokens=args.tokens, batch_size=4096,
                                       progress=False)
        concept = Concept(args.concept, target=data.fit.target, retain=data.fit.retain,
                          calibrate_target=data.calibrate.target, calibrate_retain=data.calibrate.retain,
                          strategy="greedy_tpr", n_features=32)
        flag_rates, guarded = {}, {}
        for strength in args.strengths:
            g = sae_guard.guard(model, sae=sae, concepts=[concept], hookpoint=module_path(point),
                                tokenizer=tokenizer, edit=Edit("deactivate", strength))
            if not flag_rates:
                for name, split in sets.items():
                    for side in ("target", "retain"):
                        prompts = getattr(split, side)
                        if prompts:
                            flag_rates[f"{name}_{side}"] = sum(v.flagged for v in g.classify(prompts)) / len(prompts)
            guarded[strength] = {name: red_rate(probe, unet_view(model, tokenizer, p)) for name, p in red_sets.items()}
            g.detach()
        results["layers"][point] = {"fvu": figures.get("fvu"), "dead": figures.get("dead_fraction"),
                                    "calibration": concept.calibration, "flag_rates": flag_rates,
                                    "probe_guarded_red_rate": guarded}
        print(json.dumps({point: results["layers"][point]}), file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"unguarded probe red rate: heldout {unguarded['heldout']:.2f}, paraphrase {unguarded['paraphrase']:.2f}")
    print(f"{'point':>10} {'FVU':>6} {'cal TPR':>7} {'heldout':>7} {'paraph':>7} {'nonred':>7} {'COCO':>6}  "
          "probe red after the edit (heldout/paraphrase) per strength")
    for point, r in results["layers"].items():
        f = r["flag_rates"]
        probes = "  ".join(f"{s:g}: {v['heldout']:.2f}/{v['paraphrase']:.2f}"
                           for s, v in r["probe_guarded_red_rate"].items())
        print(f"{point:>10} {r['fvu'] or float('nan'):6.3f} {r['calibration']['tpr']:7.3f} {f['heldout_target']:7.3f} "
              f"{f['paraphrase_target']:7.3f} {f['heldout_retain']:7.3f} {f['general_retain']:6.3f}  {probes}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
