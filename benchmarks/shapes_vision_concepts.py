"""SAE concepts in the ShapesWorld CLIP's vision tower: image-level zero-shot classifiers and a gate on `red`.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/shapes_vision_concepts.py [--clip DIR] [--json out.json]

1. A TopK SAE on every token (class + patches) of the vision tower at `--hookpoint`, harvested from training-seed
   images (ShapesWorld seed 1000, one or two shapes).
2. One concept per colour and per shape, fitted through `guard()` on other training-seed single-shape images
   (target: images with it; retain: without), threshold at 1% FPR on their calibration split. The strategy per
   concept (coverage or probe) is the one with the higher calibrated TPR: chosen on training images only.
3. Held-out single-shape images (seed 2000, never used above): per concept AUROC and TPR at 1% FPR (threshold from
   the held-out negatives themselves, for every method alike) of the SAE concept score, beside three baselines on
   the pooled image embedding: a logistic probe fitted on the concept's fit images, CLIP text zero-shot (the class's
   probability), and the cosine to the fit target images' mean embedding (centroid).
4. Gating `red` (deactivate its latents on flagged images, strength chosen on training images: the weakest of
   0, -2, -4, -8 bringing red predictions on red training images to <= 10%): on held-out red images, the CLIP
   zero-shot colour prediction "red" before and after; on other images, how many predictions change and whether
   unflagged images' embeddings are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
import torch.nn.functional as F

from sae_guard import SAE, Concept, guard, train
from sae_guard.concepts.concept import PoorConceptWarning
from sae_guard.analysis.scores import auroc, dense_probe, tpr_at_fpr
from sae_guard.hooks.capture import capture_hidden
from sae_guard.hooks.gate import Edit
from sae_guard.hooks.hookpoints import find_hookpoint
from sae_guard.shapes.vision import (CLIP_DIR, HELDOUT_SEED, TRAIN_SEED, class_text_features, load_clip)
from sae_guard.shapes.world import COLOURS, SHAPES, ShapesWorld, to_tensor
from sae_guard.train.trainer import tenth_of_run_dead_tokens

STRENGTHS = (0.0, -2.0, -4.0, -8.0)


def images(n: int, seed: int, start: int = 0, single: bool = True):
    world = ShapesWorld(two_shape_prob=0.0) if single else ShapesWorld()
    pixels, labels, _ = world.sample(n, seed=seed, start=start)
    return to_tensor(pixels), labels


def has(labels, name: str) -> torch.Tensor:
    key = "colour" if name in COLOURS else "shape"
    return torch.tensor([any(s[key] == name for s in scene["shapes"]) for scene in labels])


@torch.no_grad()
def embed(model, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.normalize(model.encode_image(pixels[i:i + 256]), dim=-1) for i in range(0, len(pixels), 256)])


@torch.no_grad()
def colour_predictions(model, tokenizer, pixels: torch.Tensor) -> torch.Tensor:
    text = class_text_features(model, tokenizer, "colour")
    return (embed(model, pixels) @ text.T).argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", default=str(CLIP_DIR))
    # resblocks.3 (the last block): its concepts calibrate higher on training images than resblocks.2's (the
    # adapter's default): colours 1.00 against 0.98-1.00, circle and triangle 0.62 / 0.55 against 0.45 / 0.48
    ap.add_argument("--hookpoint", default="visual.transformer.resblocks.3")
    ap.add_argument("--sae-images", type=int, default=4000)
    ap.add_argument("--concept-images", type=int, default=1200)
    ap.add_argument("--heldout", type=int, default=1200)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, _, tokenizer = load_clip(args.clip)
    point = find_hookpoint(model, args.hookpoint)

    # 1. the SAE, on training-seed images only
    sae_pixels, _ = images(args.sae_images, TRAIN_SEED, start=50_000, single=False)
    acts = torch.cat([capture_hidden(point, sae_pixels[i:i + 256]) for i in range(0, len(sae_pixels), 256)])
    acts = acts.reshape(-1, acts.shape[-1])
    torch.manual_seed(0)
    # the rate and dead window its recorded figures were measured with (before the narrow-input defaults)
    sae = SAE.create("topk", d_in=acts.shape[1], d_sae=args.d_sae, k=args.k,
                     dead_tokens=tenth_of_run_dead_tokens(args.tokens, 1024))
    sae, figures = train(sae, acts, tokens=args.tokens, batch_size=1024, lr=sae.width_lr(), seed=0, progress=False)
    sae.eval()
    print(f"SAE on {len(acts)} tokens ({args.hookpoint}): FVU {figures['fvu']:.4f}, {time.time() - t0:.0f}s")

    # 2. concepts, fitted and calibrated on other training-seed images
    fit_pixels, fit_labels = images(args.concept_images, TRAIN_SEED, start=80_000)
    concepts = []
    for name in COLOURS + SHAPES:
        mask = has(fit_labels, name)
        target, retain = list(fit_pixels[mask]), list(fit_pixels[~mask])
        best = None
        for strategy in ("coverage", "probe"):
            c = Concept(name, target=target, retain=retain, strategy=strategy, n_features=16, fpr=0.01)
            try:
                with warnings.catch_warnings():  # a poor calibrated TPR is reported below, not warned twice
                    warnings.simplefilter("ignore", PoorConceptWarning)
                    guard(model, sae=sae, concepts=[c], hookpoint=args.hookpoint).detach()
            except ValueError:
                continue
            if best is None or c.calibration["tpr"] > best.calibration["tpr"]:
                best = c
        if best is None:
            print(f"  {name}: no concept could be fitted (no feature flags its calibration targets)")
            continue
        concepts.append(best)
        print(f"  {name}: {best.strategy}, calibrated TPR {best.calibration['tpr']:.3f} at FPR "
              f"{best.calibration['fpr']:.3f}", flush=True)

    # 3. held-out classification against baselines
    held_pixels, held_labels = images(args.heldout, HELDOUT_SEED)
    g = guard(model, sae=sae, concepts=concepts, hookpoint=args.hookpoint)
    verdicts = g.classify(list(held_pixels), batch_size=256)
    g.detach()
    fit_embed, held_embed = embed(model, fit_pixels), embed(model, held_pixels)
    text = {"colour": class_text_features(model, tokenizer, "colour"), "shape": class_text_features(model, tokenizer, "shape")}
    scale = model.logit_scale.exp()
    rows = []
    fitted = {c.name for c in concepts}
    for name in COLOURS + SHAPES:
        attribute, classes = ("colour", COLOURS) if name in COLOURS else ("shape", SHAPES)
        y, y_fit = has(held_labels, name).long(), has(fit_labels, name).long()
        methods = {
            "SAE concept": torch.tensor([v.scores[name] if name in fitted else 0.0 for v in verdicts]),
            "linear probe": dense_probe(fit_embed, y_fit)(held_embed),
            "CLIP zero-shot": (scale * held_embed @ text[attribute].T).softmax(-1)[:, classes.index(name)],
            "centroid": held_embed @ F.normalize(fit_embed[y_fit == 1].mean(0), dim=-1),
        }
        row = {"concept": name}
        for method, scores in methods.items():
            row[method] = {"auroc": auroc(scores, y), "tpr@1%fpr": tpr_at_fpr(scores, y, 0.01)}
        rows.append(row)
        print(f"  {name:9} " + "  ".join(f"{m}: {r['auroc']:.3f}/{r['tpr@1%fpr']:.3f}" for m, r in row.items()
                                         if m != "concept"), flush=True)

    # 4. gating red: strength chosen on training images, measured on held-out ones
    red = next(c for c in concepts if c.name == "red")
    red_index = COLOURS.index("red")

    def red_rate(pixels, strength):
        gate = guard(model, sae=sae, concepts=[red], hookpoint=args.hookpoint, edit=Edit("deactivate", strength))
        try:
            return (colour_predictions(model, tokenizer, pixels) == red_index).float().mean().item()
        finally:
            gate.detach()

    fit_red = fit_pixels[has(fit_labels, "red")]
    chosen = next((s for s in STRENGTHS if red_rate(fit_red, s) <= 0.10), STRENGTHS[-1])
    is_red = has(held_labels, "red")
    before = colour_predictions(model, tokenizer, held_pixels)
    plain_embed = embed(model, held_pixels)
    gate = guard(model, sae=sae, concepts=[red], hookpoint=args.hookpoint, edit=Edit("deactivate", chosen))
    try:
        after = colour_predictions(model, tokenizer, held_pixels)
        gated_embed = embed(model, held_pixels)
        flagged = torch.tensor([v.flagged for v in gate.classify(list(held_pixels), batch_size=256)])
    finally:
        gate.detach()
    others = ~is_red
    gating = {"strength": chosen, "red_images": int(is_red.sum()),
              "red_predicted_before": (before[is_red] == red_index).float().mean().item(),
              "red_predicted_after": (after[is_red] == red_index).float().mean().item(),
              "other_images_prediction_changed": (before[others] != after[others]).float().mean().item(),
              "other_images_flagged": flagged[others].float().mean().item(),
              "unflagged_bit_identical": bool(torch.equal(plain_embed[~flagged], gated_embed[~flagged]))}
    print(json.dumps(gating))
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"sae": {k: figures[k] for k in ("fvu", "l0")}, "concepts": rows, "gating": gating,
                       "strategies": {c.name: c.strategy for c in concepts}}, fh, indent=2)


if __name__ == "__main__":
    main()
