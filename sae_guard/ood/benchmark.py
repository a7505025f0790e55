"""The OOD benchmark behind `sae-guard ood` and `benchmarks/ood.py`: one model, its ID and OOD sets, every method.

Per model:
1. a TopK SAE on the hookpoint's tokens of in-distribution fit images only (`train_ood_sae`);
2. `OODDetector.fit` on those same fit images;
3. validation sets (other images of the same kinds) pick the SAE score reported as "best SAE" (highest mean AUROC
   over the validation splits); the test sets are scored once, every method on the same images, ID test images
   (never used to fit) as the negatives of every split.

Models and sets:
- `shapes-vit`: `sae_guard/assets/shapes-vit-ood` (trained without purple and star). ID: its sub-world (fit: world
  seed 1000 from index 50,000, beyond its 8,000 training images; validation: seed 3000; test: seed 2000). OOD:
  held-out colour, held-out shape, textured background, natural photos (skimage crops), noise.
- `efficientnet`: timm `tf_efficientnet_lite0` with ImageNet weights. ID: crops of skimage photographs, fit /
  validation / test from disjoint photographs (`ood_splits.FIT_PHOTOS` ...). OOD: ShapesWorld scenes, textures, noise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.scores import auroc, fpr_at_tpr
from .detector import BASELINES, FUSED_WEIGHT, METHODS, SAE_SCORES, SHRINKAGE, OODDetector, train_ood_sae

MODELS = ("shapes-vit", "efficientnet")
TOLERANCE = 0.02  # the per-split goal: the best SAE score within this AUROC of the best method
TEST_SEED = 2000  # the test sets' seed; another draws a fresh test set of the same kinds


def shapes_vit_setup(n: int, test_seed: int = TEST_SEED) -> dict[str, Any]:
    """The held-out-trained ShapesWorld ViT and its image sets ((n, 3, 32, 32) tensors in [-1, 1])."""
    from ..shapes.ood_splits import (FIT_PHOTOS, TEST_PHOTOS, VALIDATION_PHOTOS, held_out_images, noise_images,
                                    photo_crops, textured_background_images)
    from ..shapes.vision import ASSETS, TRAIN_SEED, load_vit, sub_world
    from ..shapes.world import to_tensor

    directory = ASSETS / "shapes-vit-ood"
    held = json.loads((directory / "config.json").read_text())["held_out"]
    world = sub_world(tuple(held["colours"] + held["shapes"]))

    def sets(seed: int, photos: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {"id": world.sample(n, seed=seed)[0],
                "held-out colour": held_out_images(world, n, seed=seed, colours=tuple(held["colours"])),
                "held-out shape": held_out_images(world, n, seed=seed, shapes=tuple(held["shapes"])),
                "textured background": textured_background_images(world, n, seed=seed),
                "natural photos": photo_crops(photos, -(-n // len(photos)), 32, seed=seed)[:n],
                "noise": noise_images(n, 32, seed=seed)}

    fit = world.sample(4 * n, seed=TRAIN_SEED, start=50_000)[0]
    return {"model": load_vit(directory), "hookpoint": "blocks.2", "d_sae": 512, "k": 8, "tokens": 300_000,
            "fit": to_tensor(fit), "validation": {k: to_tensor(v) for k, v in sets(3000, VALIDATION_PHOTOS).items()},
            "test": {k: to_tensor(v) for k, v in sets(test_seed, TEST_PHOTOS + FIT_PHOTOS).items()},
            "notes": f"ViT trained without {held['colours'] + held['shapes']}; natural photos for validation from "
                     f"{VALIDATION_PHOTOS}, for test from the others"}


def efficientnet_setup(n: int, test_seed: int = TEST_SEED) -> dict[str, Any]:
    """EfficientNet-Lite0 (ImageNet) with photo crops as ID and synthetic OOD sets (PIL images, its preprocessing)."""
    from PIL import Image

    from ..adapters.efficientnet import efficientnet_lite0
    from ..shapes.ood_splits import (FIT_PHOTOS, PHOTOS, TEST_PHOTOS, VALIDATION_PHOTOS, noise_images, photo_crops,
                                    texture_images)
    from ..shapes.world import ShapesWorld

    def pil(images: np.ndarray) -> list:
        return [Image.fromarray(image) for image in images]

    def sets(seed: int, photos: tuple[str, ...]) -> dict[str, list]:
        return {"id": pil(photo_crops(photos, -(-n // len(photos)), 256, seed=seed)[:n]),
                "shapesworld": pil(ShapesWorld().sample(n, seed=seed)[0]),
                "textures": pil(texture_images(n, 256, seed=seed)),
                "noise": pil(noise_images(n, 256, seed=seed))}

    fit = pil(photo_crops(FIT_PHOTOS, -(-2 * n // len(FIT_PHOTOS)), 256, seed=1))
    return {"model": efficientnet_lite0(), "hookpoint": "blocks.4", "d_sae": 1024, "k": 16, "tokens": 300_000,
            "fit": fit, "validation": sets(3000, VALIDATION_PHOTOS), "test": sets(test_seed, TEST_PHOTOS),
            "notes": f"ID = crops of skimage photographs: fit {FIT_PHOTOS} ({len(fit)} crops), validation "
                     f"{VALIDATION_PHOTOS}, test {TEST_PHOTOS}: {len(PHOTOS)} photographs in all, a small and "
                     "narrow ID set"}


SETUPS = {"shapes-vit": shapes_vit_setup, "efficientnet": efficientnet_setup}


def split_table(scores: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {method: {auroc, fpr95}}} with the "id" set's scores as negatives of every other split."""
    negatives = scores["id"]
    table = {}
    for split, positives in scores.items():
        if split == "id":
            continue
        table[split] = {}
        for method in METHODS:
            values = torch.cat([negatives[method], positives[method]])
            labels = torch.cat([torch.zeros(len(negatives[method])), torch.ones(len(positives[method]))])
            table[split][method] = {"auroc": auroc(values, labels), "fpr95": fpr_at_tpr(values, labels, 0.95)}
    return table


def average(table: dict[str, dict[str, dict[str, float]]], metric: str = "auroc") -> dict[str, float]:
    return {method: float(np.mean([row[method][metric] for row in table.values()])) for method in METHODS}


def goals(test: dict, chosen: str) -> dict[str, Any]:
    """The issue's goals for the SAE score chosen on validation: a higher mean AUROC over the test splits than every
    baseline, and within TOLERANCE AUROC of the best method (any, SAE scores included) on each split."""
    means = average(test)
    best_baseline = max(BASELINES, key=means.get)
    per_split = {}
    for split, row in test.items():
        best = max(row, key=lambda m: row[m]["auroc"])
        gap = row[best]["auroc"] - row[chosen]["auroc"]
        per_split[split] = {"best": best, "gap": gap, "pass": gap <= TOLERANCE}
    return {"chosen_sae_score": chosen, "best_baseline": best_baseline,
            "average_pass": means[chosen] >= means[best_baseline], "per_split": per_split}


def run(model_name: str, *, n: int = 200, hookpoint: str | None = None, shrinkage: float = SHRINKAGE,
        fused_weight: float = FUSED_WEIGHT, test_seed: int = TEST_SEED, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Train the SAE, fit the detector, score validation and test sets; the whole result as a dict. `hookpoint`
    overrides the model's default one; `shrinkage` is every Gaussian's (the baseline's and the SAE scores'),
    `fused_weight` the error term's weight in `sae_fused`."""
    from tqdm.auto import tqdm

    if model_name not in SETUPS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(MODELS)}")
    if n < 10:
        raise ValueError(f"n={n} images per split is too few to measure AUROC; use at least 10")
    torch.manual_seed(0)
    setup = SETUPS[model_name](n, test_seed)
    setup["hookpoint"] = hookpoint or setup["hookpoint"]
    model = setup["model"]
    log(f"{model_name}: SAE on {setup['hookpoint']} from {len(setup['fit'])} ID images")
    sae, figures = train_ood_sae(model, setup["hookpoint"], setup["fit"], d_sae=setup["d_sae"], k=setup["k"],
                                 tokens=setup["tokens"], progress=progress)
    detector = OODDetector(model, sae, setup["hookpoint"], shrinkage=shrinkage, fused_weight=fused_weight)
    detector.fit(setup["fit"])
    results = {}
    for stage in ("validation", "test"):
        sets = setup[stage]
        scores = {split: detector.score(images)
                  for split, images in tqdm(sets.items(), desc=f"{model_name} {stage}", unit="set",
                                            disable=not progress)}
        results[stage] = split_table(scores)
    chosen = max(SAE_SCORES, key=average(results["validation"]).get)
    return {"model": model_name, "hookpoint": setup["hookpoint"], "shrinkage": shrinkage, "fused_weight": fused_weight,
            "test_seed": test_seed, "n_per_split": n, "n_fit": len(setup["fit"]),
            "sae": {"d_sae": setup["d_sae"], "k": setup["k"], "tokens": setup["tokens"],
                    "fvu": figures["fvu"], "l0": figures["l0"]},
            "notes": setup["notes"], "validation": results["validation"], "test": results["test"],
            "validation_average": average(results["validation"]),
            "test_average": {"auroc": average(results["test"]), "fpr95": average(results["test"], "fpr95")},
            "goals": goals(results["test"], chosen)}


def markdown(result: dict) -> str:
    """The test table (AUROC / FPR95 per split and method, and the average), then the goals."""
    splits = list(result["test"])
    lines = [f"### {result['model']} ({result['hookpoint']}; {result['n_per_split']} images per split, SAE d_sae "
             f"{result['sae']['d_sae']} k {result['sae']['k']}, FVU {result['sae']['fvu']:.3f})", "",
             "AUROC / FPR95 on the test sets (ID test images as negatives):", "",
             "| method | " + " | ".join(splits) + " | average |", "| --- |" + " --- |" * (len(splits) + 1)]
    for method in METHODS:
        cells = [f"{result['test'][s][method]['auroc']:.3f} / {result['test'][s][method]['fpr95']:.3f}"
                 for s in splits]
        avg = f"{result['test_average']['auroc'][method]:.3f} / {result['test_average']['fpr95'][method]:.3f}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {avg} |")
    g = result["goals"]
    lines += ["", f"Best SAE score chosen on validation sets: `{g['chosen_sae_score']}`.", ""]
    lines += goal_lines(result)
    lines += ["", f"Notes: {result['notes']}."]
    return "\n".join(lines) + "\n"


def goal_lines(result: dict) -> list[str]:
    g = result["goals"]
    average_auroc = result["test_average"]["auroc"]
    lines = [f"{'PASS' if g['average_pass'] else 'FAIL'} best on average: {g['chosen_sae_score']} "
             f"{average_auroc[g['chosen_sae_score']]:.3f}, best baseline {g['best_baseline']} "
             f"{average_auroc[g['best_baseline']]:.3f}"]
    for split, row in g["per_split"].items():
        lines.append(f"{'PASS' if row['pass'] else 'FAIL'} {split}: {g['chosen_sae_score']} within {TOLERANCE} "
                     f"of the best ({row['best']}): gap {row['gap']:.3f}")
    return lines


def html(result: dict) -> str:
    """The test table as a standalone HTML page, each split's best AUROC in bold."""
    from html import escape

    splits = list(result["test"])
    head = "".join(f"<th>{escape(s)}</th>" for s in splits)
    rows = []
    for method in METHODS:
        cells = []
        for split in splits:
            row = result["test"][split]
            value = row[method]
            best = value["auroc"] == max(r["auroc"] for r in row.values())
            text = f"{value['auroc']:.3f} / {value['fpr95']:.3f}"
            cells.append(f"<td>{'<b>' + text + '</b>' if best else text}</td>")
        mean = result["test_average"]
        cells.append(f"<td>{mean['auroc'][method]:.3f} / {mean['fpr95'][method]:.3f}</td>")
        rows.append(f"<tr><th>{escape(method)}</th>{''.join(cells)}</tr>")
    goals = "".join(f"<li>{escape(line)}</li>" for line in goal_lines(result))
    return (f"<!doctype html><meta charset='utf-8'><title>OOD: {escape(result['model'])}</title>"
            "<style>td,th{padding:2px 8px;text-align:right}table{border-collapse:collapse}</style>"
            f"<h1>OOD detection: {escape(result['model'])} ({escape(result['hookpoint'])})</h1>"
            "<p>AUROC / FPR95 per test split, ID test images as negatives; bold: the best AUROC of the split.</p>"
            f"<table><tr><th>method</th>{head}<th>average</th></tr>{''.join(rows)}</table>"
            f"<p>Best SAE score chosen on validation sets: {escape(result['goals']['chosen_sae_score'])}</p>"
            f"<ul>{goals}</ul><p>{escape(result['notes'])}</p>\n")


def write_report(result: dict, out: str | Path) -> list[Path]:
    """ood-MODEL.md, ood-MODEL.json and ood-MODEL.html in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ood-{result['model']}"
    paths = [stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".html")]
    paths[0].write_text(markdown(result))
    paths[1].write_text(json.dumps(result, indent=2) + "\n")
    paths[2].write_text(html(result))
    return paths
