"""The blindspot study behind `sae-guard blindspots`: an archetypal SAE on the ShapesWorld ViT's final tokens reads
which concepts the shipped text-to-image model under- or over-draws, validated where the truth is known.

1. Dictionary: a relaxed archetypal SAE (RA-SAE, `SAE.create("archetypal", ...)`) on every token (class + patches)
   of the ShapesWorld ViT after its final LayerNorm (`norm`, the paper's hookpoint on DINOv2), fitted on real
   images of world seed `FIT_SEED` only, as the paper's dictionary is fitted on real images. Each concept is named
   from those images' known labels (`blindspots.label_concepts`).
2. Evaluation: `n` captions of world seed `EVAL_SEED` (never used to fit or name anything); their real images, and
   one image drawn from each caption by every variant of the pipeline:
   - "shipped": the shipped model as it is;
   - a planted concept ("red"): the shipped model behind the `shapes` recipe's gate on that concept (the demo's
     guard), a variant known to draw that colour badly;
   - a planted pair ("blue star"): a variant that never draws that pair: every caption naming it is re-captioned
     with the same template and the star swapped for another shape (the images of other captions are the shipped
     model's own, same seeds).
3. Per variant: concept energies on both sets, delta, ranked suppressed / exaggerated lists; where the planted
   concepts fall in the suppressed ranking (ranks, share of the top 10, AUROC of -delta for "names the planted
   attribute"); per-attribute delta against the pixel scorers' generation rate of that attribute (Spearman); per
   caption the energy difference between real and drawn image (memorisation / novelty), against whether the
   drawing shows what the caption names (AUROC).
It writes figures.json, report.md and report.html (tables, charts, exemplar grids as inline PNGs).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..hooks.capture import capture_hidden
from ..hooks.hookpoints import find_hookpoint
from ..sae.base import SAE
from ..sae.metrics import evaluate
from ..shapes.t2i_eval import to_uint8
from ..shapes.world import COLOURS, SHAPES, ShapesWorld, caption, to_tensor
from .blindspots import (EXAGGERATED, SUPPRESSED, EnergyComparison, ConceptLabel, attribute_delta, attributes,
                         compare, compare_paired, image_energy, label_concepts, mentions, nearest_real,
                         pair_difference, spearman)
from .charts import bar_chart, histogram
from .scores import auroc

FIT_SEED, EVAL_SEED = 3000, 3001  # ShapesWorld seeds no other part of the project draws from
HOOKPOINT = "norm"  # the ViT's final LayerNorm: every token of the last block, normalised
CAPTION_SET = "train"
LIST_LENGTH, GRID_CONCEPTS, GRID_IMAGES = 15, 6, 8


@dataclass
class StudyConfig:
    """What the study draws and fits; defaults run in a few minutes on one CPU thread."""

    n: int = 400  # evaluation captions (real images, and one drawing per variant)
    plant: tuple[str, ...] = ("red", "blue star")
    fit_images: int = 3000  # real images the SAE is fitted on and its concepts are named from
    d_sae: int = 512
    k: int = 8
    tokens: int = 600_000
    batch_size: int = 1024
    lr: float = 2e-4  # the variant's default (1.1e-3 at 512 concepts) diverges on these tokens
    dead_tokens: int = 60_000  # a tenth of the run, the window the recorded study figures were measured with
    steps: int | None = None  # denoising steps (None: the recipe's)
    seed: int = 0
    pair_swap: dict[str, str] = field(default_factory=lambda: {s: ("circle" if s != "circle" else "square")
                                                               for s in SHAPES})

    def __post_init__(self) -> None:
        for name in ("n", "fit_images", "d_sae", "k", "tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n < 20:
            raise ValueError(f"n must be at least 20 captions (energies over fewer images say little), got {self.n}")
        if self.k > self.d_sae:
            raise ValueError(f"k ({self.k}) cannot exceed d_sae ({self.d_sae})")
        if self.batch_size < self.d_sae:
            raise ValueError(f"the archetypal SAE takes its {self.d_sae} candidate points from the first batch: "
                             f"batch_size ({self.batch_size}) must be at least d_sae")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        self.plant = tuple(self.plant)
        for name in self.plant:
            plant_kind(name)


def plant_kind(name: str) -> str:
    """"concept" for a colour or shape (gated by the recipe's concept), "pair" for "colour shape"."""
    if name in COLOURS or name in SHAPES:
        return "concept"
    words = name.split(" ")
    if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES:
        return "pair"
    raise ValueError(f"cannot plant {name!r}: give a colour ({', '.join(COLOURS)}), a shape "
                     f"({', '.join(SHAPES)}) or a colour-shape pair such as 'blue star'")


# ------------------------------------------------------------------------------------------------ tokens and SAE
@torch.no_grad()
def vit_tokens(vit: Any, pixels: np.ndarray, batch: int = 256, desc: str = "ViT tokens") -> Tensor:
    """(n, tokens, d) final-LayerNorm tokens of uint8 (n, H, W, 3) images."""
    point = find_hookpoint(vit, HOOKPOINT)
    chunks = [capture_hidden(point, to_tensor(pixels[i:i + batch]))
              for i in tqdm(range(0, len(pixels), batch), desc=desc, unit="batch", leave=False)]
    return torch.cat(chunks)


def fit_sae(tokens: Tensor, cfg: StudyConfig) -> tuple[SAE, dict[str, float]]:
    """The archetypal SAE on real tokens (n, T, d) scaled to mean norm 1, every token a training row."""
    from ..train import train

    rows = tokens.reshape(-1, tokens.shape[-1])
    # Candidate points are data rows, so unit-norm rows keep atoms and codes near 1 (raw tokens, norm ~10, start
    # with a reconstruction 10x too large and the loss diverges); the caller scales every token set the same way.
    torch.manual_seed(cfg.seed)
    sae = SAE.create("archetypal", d_in=rows.shape[1], d_sae=cfg.d_sae, k=cfg.k, dead_tokens=cfg.dead_tokens)
    sae, metrics = train(sae, rows, tokens=cfg.tokens, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    return sae.eval(), {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


@torch.no_grad()
def energies(sae: SAE, tokens: Tensor, batch: int = 512) -> Tensor:
    """(n, d_sae) per-image concept energies of (n, T, d) tokens."""
    return torch.cat([image_energy(sae.encode(tokens[i:i + batch])) for i in range(0, len(tokens), batch)])


# ------------------------------------------------------------------------------------------------ variants
def pair_captions(labels: Sequence[dict], captions: Sequence[str], pair: str, swap: dict[str, str],
                  world_seed: int) -> tuple[list[str], list[int]]:
    """Captions with every `pair` ("blue star") re-drawn as another shape: the scene's shape swapped and the caption
    remade with the same template (same generator). Returns the captions and the indices changed."""
    colour, shape = pair.split(" ")
    out, changed = list(captions), []
    for i, scene in enumerate(labels):
        if not any(item["colour"] == colour and item["shape"] == shape for item in scene["shapes"]):
            continue
        items = [dict(item, shape=swap[shape]) if item["colour"] == colour and item["shape"] == shape else item
                 for item in scene["shapes"]]
        out[i] = caption(dict(scene, shapes=items), np.random.default_rng([world_seed, i, 1]), CAPTION_SET)
        changed.append(i)
    return out, changed


def draw_variants(captions: list[str], labels: Sequence[dict], cfg: StudyConfig,
                  log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """uint8 images per variant ("shipped", then each plant), image i from seed recipe seed + i."""
    from dataclasses import replace

    from ..erasure.loading import load_t2i_pipeline, load_t2i_recipe
    from ..erasure.methods import Gate, Unguarded, draw

    t2i = load_t2i_recipe("shapes")
    pipe = load_t2i_pipeline(t2i.recipe)
    settings = t2i.settings if cfg.steps is None else replace(t2i.settings, steps=cfg.steps)
    seeds = [t2i.seed + i for i in range(len(captions))]
    log(f"drawing {len(captions)} captions with the shipped model ({settings.steps} steps, {settings.image_size}px)")
    shipped = to_uint8(Unguarded().generate(pipe, captions, seeds, settings).images)
    variants = {"shipped": {"images": shipped, "how": "the shipped model"}}
    for name in cfg.plant:
        if plant_kind(name) == "concept":
            concepts = t2i.concepts_named([name])
            stage = t2i.unet_stage_for(concepts)
            log(f"drawing with `{name}` gated (the shapes recipe's guard: {t2i.edit.mode} {t2i.edit.strength:g})")
            gated = Gate(t2i.sae, concepts, t2i.hookpoint, t2i.edit, stage).generate(pipe, captions, seeds, settings)
            variants[name] = {"images": to_uint8(gated.images), "flagged": int(sum(gated.flagged)),
                              "how": f"the shipped model behind the shapes recipe's gate on `{name}`"}
        else:
            swapped, changed = pair_captions(labels, captions, name, cfg.pair_swap, EVAL_SEED)
            images = shipped.copy()
            swap = cfg.pair_swap[name.split(' ')[1]]
            log(f"drawing {len(changed)} captions naming `{name}` as {name.split(' ')[0]} {swap}s")
            if changed:
                images[changed] = to_uint8(draw(pipe, [swapped[i] for i in changed], [seeds[i] for i in changed],
                                              settings, desc=name))
            variants[name] = {"images": images, "changed": len(changed),
                              "how": f"never draws a {name}: captions naming it re-captioned with a {swap}"}
    return variants


# ------------------------------------------------------------------------------------------------ pixel scorers
def drawn(images: np.ndarray, labels: Sequence[dict]) -> dict[str, Any]:
    """What the pixel scorers read in each drawing against what its caption names: per attribute (colour, shape)
    the generation rate (share of captions naming it whose image shows it), and per caption whether the image
    shows exactly the named colours and shapes."""
    from ..shapes.scorers import colours_present, shapes_present

    colours = [colours_present(image) for image in images]
    shapes = [shapes_present(image) for image in images]
    named_colours = [{item["colour"] for item in scene["shapes"]} for scene in labels]
    named_shapes = [{item["shape"] for item in scene["shapes"]} for scene in labels]
    rates = {}
    for attribute in COLOURS + SHAPES:
        key, found = (named_colours, colours) if attribute in COLOURS else (named_shapes, shapes)
        rows = [i for i, named in enumerate(key) if attribute in named]
        rates[attribute] = float(np.mean([attribute in found[i] for i in rows])) if rows else None
    right = [c == nc and s == ns for c, s, nc, ns in zip(colours, shapes, named_colours, named_shapes)]
    return {"rates": rates, "right": np.array(right)}


# ------------------------------------------------------------------------------------------------ one variant
def plant_figures(comparison: EnergyComparison, labels: Sequence[ConceptLabel], attribute: str) -> dict[str, Any]:
    """Where the concepts naming `attribute` fall in the suppressed ranking."""
    members = {k for k, label in enumerate(labels) if mentions(label.name, attribute)}
    ranks = comparison.rank_of(sorted(members))
    order = comparison.suppressed()
    ranked = torch.tensor(order)
    is_member = torch.tensor([k in members for k in order])
    top10 = order[:10]
    return {"attribute": attribute, "concepts": len(members), "ranked": len(ranks), "of": len(order),
            "ranks": ranks, "best_rank": ranks[0] if ranks else None,
            "median_rank": float(np.median(ranks)) if ranks else None,
            "share_of_top10": sum(k in members for k in top10) / max(1, len(top10)),
            "below_0.1": sum(comparison.delta[k].item() < SUPPRESSED for k in members if comparison.ranked[k]),
            "auroc": auroc(-comparison.delta[ranked].float(), is_member.float())
            if 0 < is_member.sum() < len(order) else None}


def study_variant(real: Tensor, generated: Tensor, images: np.ndarray, eval_labels: Sequence[dict],
                  labels: Sequence[ConceptLabel], plants: Sequence[str]) -> dict[str, Any]:
    comparison = compare(real, generated)
    scored = drawn(images, eval_labels)
    deltas = attribute_delta(comparison, labels, COLOURS + SHAPES)
    pairs = [(a, deltas[a], scored["rates"][a]) for a in COLOURS + SHAPES
             if deltas[a] is not None and scored["rates"][a] is not None]
    correlation = spearman([p[1] for p in pairs], [p[2] for p in pairs]) if len(pairs) >= 3 else None
    per_image = pair_difference(real, generated)
    nearest, _ = nearest_real(real, generated)
    wrong = torch.tensor(~scored["right"], dtype=torch.float32)
    row = lambda k: {"concept": k, "label": labels[k].name, "delta": comparison.delta[k].item(),
                     "real": comparison.real[k].item(), "generated": comparison.generated[k].item(),
                     "fire_real": comparison.fire_real[k].item(), "fire_generated": comparison.fire_generated[k].item()}
    ranked_deltas = comparison.delta[comparison.ranked]
    return {
        "comparison": comparison,
        "ranked_concepts": int(comparison.ranked.sum()),
        "suppressed_below_0.1": int((ranked_deltas < SUPPRESSED).sum()),
        "exaggerated_above_0.9": int((ranked_deltas > EXAGGERATED).sum()),
        "deltas": ranked_deltas.tolist(),
        "suppressed": [row(k) for k in comparison.suppressed()[:LIST_LENGTH]],
        "exaggerated": [row(k) for k in comparison.exaggerated()[:LIST_LENGTH]],
        "plants": [plant_figures(comparison, labels, p) for p in plants],
        "plants_paired": [plant_figures(compare_paired(real, generated), labels, p) for p in plants],
        "attributes": [{"attribute": a, "delta": d, "rate": r} for a, d, r in pairs],
        "spearman_delta_vs_rate": correlation,
        "drawn_right": float(scored["right"].mean()),
        "per_image": {"pair_difference": per_image.tolist(), "nearest_real": nearest.tolist(),
                      "pair_difference_mean": per_image.mean().item(),
                      "auroc_pair_difference_for_drawn_wrong":
                          auroc(per_image.float(), wrong) if 0 < wrong.sum() < len(wrong) else None},
    }


# ------------------------------------------------------------------------------------------------ the study
def run_study(out: str | Path, cfg: StudyConfig | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit, draw, compare, write the report; returns the figures written to figures.json."""
    from ..shapes.vision import load_vit

    cfg = cfg or StudyConfig()
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vit = load_vit()
    log(f"dictionary: archetypal SAE ({cfg.d_sae} concepts, k {cfg.k}) on the ViT's `{HOOKPOINT}` tokens of "
        f"{cfg.fit_images} real images (world seed {FIT_SEED})")
    fit_pixels, fit_labels, _ = ShapesWorld().sample(cfg.fit_images, FIT_SEED)
    fit_tokens = vit_tokens(vit, fit_pixels, desc="ViT tokens (fit)")
    scale = fit_tokens.norm(dim=-1).mean().item()  # one scalar for every token set: mean token norm 1 on fit images
    fit_tokens = fit_tokens / scale
    sae, sae_figures = fit_sae(fit_tokens, cfg)
    names, present = attributes(fit_labels)
    labels = label_concepts(energies(sae, fit_tokens), names, present)
    eval_pixels, eval_labels, captions = ShapesWorld().sample(cfg.n, EVAL_SEED, CAPTION_SET)
    eval_tokens = vit_tokens(vit, eval_pixels, desc="ViT tokens (real)") / scale
    real = energies(sae, eval_tokens)
    heldout = evaluate(sae, eval_tokens.reshape(-1, eval_tokens.shape[-1]))
    variants = draw_variants(captions, eval_labels, cfg, log)
    figures: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "pair_swap"} | {
            "token_scale": scale, "fit_seed": FIT_SEED, "eval_seed": EVAL_SEED, "hookpoint": HOOKPOINT,
            "caption_set": CAPTION_SET},
        "sae": {"training": sae_figures, "heldout_real": heldout},
        "labels": _label_counts(labels),
        "variants": {},
    }
    grids: dict[str, list[tuple[str, Any]]] = {}
    for name, variant in variants.items():
        log(f"comparing: {name}")
        generated = energies(sae, vit_tokens(vit, variant["images"], desc=f"ViT tokens ({name})") / scale)
        result = study_variant(real, generated, variant["images"], eval_labels, labels, cfg.plant)
        comparison = result.pop("comparison")
        grids[name] = _grids(comparison, labels, real, generated, eval_pixels, variant["images"],
                             result["per_image"]["pair_difference"], captions)
        figures["variants"][name] = {k: v for k, v in variant.items() if k != "images"} | result
    figures["seconds"] = round(time.perf_counter() - started, 1)
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    (out / "report.md").write_text(markdown(figures))
    (out / "report.html").write_text(page(figures, grids))
    return figures


def _label_counts(labels: Sequence[ConceptLabel]) -> dict[str, Any]:
    kinds = {"colour": 0, "shape": 0, "pair": 0, "background": 0, "mixed": 0, "silent": 0}
    for label in labels:
        words = label.name.split(" ")
        kind = (label.name if label.name in ("mixed", "silent") else "background" if words[-1] == "background"
                else "pair" if len(words) == 2 else "colour" if label.name in COLOURS else "shape")
        kinds[kind] += 1
    return {"kinds": kinds, "names": [label.name for label in labels]}


# ------------------------------------------------------------------------------------------------ report
def _grids(comparison: EnergyComparison, labels: Sequence[ConceptLabel], real: Tensor, generated: Tensor,
           real_pixels: np.ndarray, gen_pixels: np.ndarray, per_image: Sequence[float],
           captions: Sequence[str]) -> list[tuple[str, Any]]:
    """(title, PIL image) exemplar grids: top real and top generated images of the most suppressed and most
    exaggerated concepts, and the caption pairs of lowest and highest per-image difference."""
    from ..erasure.report import grid

    def top(energy: Tensor, pixels: np.ndarray, k: int) -> list[np.ndarray]:
        values, rows = energy[:, k].topk(min(GRID_IMAGES, len(energy)))
        return [pixels[r] / 255.0 for r, v in zip(rows.tolist(), values.tolist()) if v > 0]

    out = []
    for side, order in (("suppressed", comparison.suppressed()), ("exaggerated", comparison.exaggerated())):
        for k in order[:GRID_CONCEPTS]:
            out.append((f"{side} #{k} ({labels[k].name}, delta {comparison.delta[k].item():.2f}): top real | "
                        "top generated", grid(top(real, real_pixels, k) + [np.ones_like(real_pixels[0], float)]
                                               + top(generated, gen_pixels, k), columns=2 * GRID_IMAGES + 1)))
    order = np.argsort(np.asarray(per_image))
    for side, rows in (("lowest", order[:GRID_IMAGES]), ("highest", order[::-1][:GRID_IMAGES])):
        images = [real_pixels[r] / 255.0 for r in rows] + [gen_pixels[r] / 255.0 for r in rows]
        words = "; ".join(f"{captions[r]!r} {per_image[r]:.2f}" for r in rows)
        out.append((f"per-image difference, {side} (top row real, bottom row drawn): {words}",
                    grid(images, columns=len(rows))))
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def tables(figures: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the markdown and HTML pages."""
    out = []
    sae, kinds = figures["sae"]["heldout_real"], figures["labels"]["kinds"]
    out.append(("Dictionary (archetypal SAE fitted on real tokens; FVU, L0, dead on the evaluation's real tokens) "
                "and its concept names",
                ["FVU", "L0", "dead", *kinds],
                [[_fmt(sae.get("fvu")), _fmt(sae.get("l0"), 1), _fmt(sae.get("dead_fraction")),
                  *map(str, kinds.values())]]))
    summary = []
    for name, v in figures["variants"].items():
        rho = v["spearman_delta_vs_rate"] or {}
        summary.append([name, str(v["ranked_concepts"]), str(v["suppressed_below_0.1"]),
                        str(v["exaggerated_above_0.9"]), _fmt(v["drawn_right"]), _fmt(rho.get("rho")),
                        _fmt(rho.get("p")), str(rho.get("n", "-")), _fmt(v["per_image"]["pair_difference_mean"]),
                        _fmt(v["per_image"]["auroc_pair_difference_for_drawn_wrong"])])
    out.append(("Variants: ranked concepts, blindspots, Spearman(per-attribute delta, generation rate), per-image "
                "difference", ["variant", "ranked", "delta < 0.1", "delta > 0.9", "drawn right", "Spearman rho", "p",
                               "n", "mean pair difference", "AUROC pair difference -> drawn wrong"], summary))

    def plant_rows(key: str) -> list[list[str]]:
        return [[name, p["attribute"], f"{p['ranked']} / {p['concepts']}", str(p["of"]), _fmt(p["best_rank"]),
                 _fmt(p["median_rank"], 1), _fmt(p["share_of_top10"], 2), str(p["below_0.1"]), _fmt(p["auroc"])]
                for name, v in figures["variants"].items() for p in v[key]]

    header = ["variant", "attribute", "ranked / named", "ranked concepts", "best rank", "median rank",
              "share of top 10", "delta < 0.1", "AUROC (-delta)"]
    out.append(("Planted blindspots: where concepts naming the planted attribute fall in each variant's suppressed "
                "ranking (1 = most suppressed)", header, plant_rows("plants")))
    out.append(("Planted blindspots, paired statistic (each concept's delta over the caption pairs whose real image "
                "it fires on; `compare_paired`)", header, plant_rows("plants_paired")))
    for name, v in figures["variants"].items():
        for side in ("suppressed", "exaggerated"):
            out.append((f"{name}: most {side} concepts",
                        ["concept", "label", "delta", "E real", "E generated", "fires real", "fires generated"],
                        [[str(r["concept"]), r["label"], _fmt(r["delta"]), _fmt(r["real"], 2),
                          _fmt(r["generated"], 2), _fmt(r["fire_real"], 2), _fmt(r["fire_generated"], 2)]
                         for r in v[side]]))
        out.append((f"{name}: per-attribute delta (concepts naming it) and generation rate (pixel scorers)",
                    ["attribute", "delta", "generation rate"],
                    [[a["attribute"], _fmt(a["delta"]), _fmt(a["rate"])] for a in v["attributes"]]))
    return out


def markdown(figures: dict[str, Any]) -> str:
    parts = ["# Conceptual blindspots of the ShapesWorld text-to-image model (archetypal SAE on the ShapesWorld "
             "ViT)\n", _facts(figures)]
    for title, header, rows in tables(figures):
        parts.append(f"## {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" +
                     "".join("| " + " | ".join(row) + " |\n" for row in rows))
    return "\n".join(parts)


def _facts(figures: dict[str, Any]) -> str:
    c = figures["config"]
    hows = "; ".join(f"{name}: {v['how']}" for name, v in figures["variants"].items())
    return (f"{c['n']} captions of world seed {c['eval_seed']}; SAE fitted and concepts named on {c['fit_images']} "
            f"real images of seed {c['fit_seed']}; hookpoint `{c['hookpoint']}`. Variants: {hows}. "
            f"{figures['seconds']} s.\n")


def page(figures: dict[str, Any], grids: dict[str, list[tuple[str, Any]]]) -> str:
    from ..erasure.report import _png_data

    charts = [histogram(f"{name}: delta of each ranked concept (0.1 dashed)", v["deltas"], marker=SUPPRESSED)
              for name, v in figures["variants"].items()]
    charts += [bar_chart(f"{name}: per-attribute delta and generation rate", {
        "delta": {a["attribute"]: a["delta"] for a in v["attributes"]},
        "generation rate": {a["attribute"]: a["rate"] for a in v["attributes"]}}, width=900)
        for name, v in figures["variants"].items()]
    body = []
    for title, header, rows in tables(figures):
        body.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                    + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                        for row in rows) + "</table>")
    for name, items in grids.items():
        body.append(f"<h2>{html.escape(name)}: exemplars</h2>")
        body += [f"<p>{html.escape(title)}</p><img src='{_png_data(image)}'>" for title, image in items]
    style = "body{font-family:sans-serif;max-width:1200px}table{border-collapse:collapse}td,th{border:1px solid #ccc;" \
            "padding:2px 6px;text-align:right}img{image-rendering:pixelated}"
    return (f"<!doctype html><meta charset=utf-8><title>Conceptual blindspots</title><style>{style}</style>"
            f"<h1>Conceptual blindspots (archetypal SAE on the ShapesWorld ViT)</h1><p>{html.escape(_facts(figures))}"
            f"</p>{''.join(body)}<h2>Charts</h2>{'<br>'.join(charts)}")
