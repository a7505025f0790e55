"""The recommender study behind `sae-guard rec`: what a RecSAE on a SASRec keeps, reads and controls.

Five parts, every figure on held-out users (odd ids; even ids fit the concepts and dictionaries):
1. ranking: leave-one-out HR@10 / NDCG@10 by full ranking over the catalogue (history items excluded) of the
   SASRec, a popularity baseline, and the SASRec with its SAE spliced in;
2. the concept dictionary (RecSAE): each latent's best attribute on fit users, its precision / recall / F1 on
   held-out users, and the share of latents with a confident concept;
3. control per genre through the Gate: deactivating the genre concept's latents on every user (strength chosen
   on fit users), and steering along their mean decoder direction: the genre's share of the top-10, and HR@10 on
   users whose next item is of another genre;
4. per-user verdicts of the recipe's genre concepts against fan labels, beside a dense logistic probe on the same
   user state (the ceiling a sparse readout of the SAE is measured against);
5. the recipe's guard itself: its flagged users' top-10 before and after the gate.
It writes figures.json, report.md, report.html (tables and SVG charts) and concepts.tsv.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapters.recsys import RecAdapter, SASRec, pad_histories, rank_metrics
from ..hooks.gate import Edit, Gate
from ..hooks.hookpoints import find_hookpoint
from ..recsys_data import GENRES, MovieLens
from ..sae.base import SAE
from .charts import bar_chart, histogram
from .rec_concepts import attributes, concept_dictionary, fan_labels, genre_shares, split_users
from .scores import auroc, dense_probe

CONFIDENT_F1, CONFIDENT_LIFT = 0.3, 2.0
CUT_TARGET, HR_TOLERANCE = 0.5, 0.02  # a genre's top-10 share cut by >= 50%, other users' HR@10 within 2 points
DEACTIVATION_STRENGTHS = (0.0, -1.0, -2.0)  # tried on fit users: remove the latents, or push them negative


class Ranker:
    """Full-ranking evaluation of one SASRec on the leave-one-out test position of chosen users."""

    def __init__(self, model: SASRec, data: MovieLens) -> None:
        self.model, self.data = model, data
        self.histories = data.test_histories
        self.targets = data.test_targets
        self.ids = pad_histories(self.histories, data.n_items, model.max_len)

    @torch.no_grad()
    def __call__(self, users: Sequence[int] | None = None) -> dict[str, Tensor]:
        users = list(range(len(self.histories))) if users is None else list(users)
        return rank_metrics(self.model.scores(self.ids[users]), [self.histories[u] for u in users],
                            self.targets[users])

    def gated(self, gate: Gate, users: Sequence[int]) -> dict[str, Tensor]:
        gate.attach()
        try:
            return self(users)
        finally:
            gate.detach()


def ranking(ranker: Ranker, sae: SAE) -> dict[str, Any]:
    data = ranker.data
    plain = ranker()
    counts = torch.bincount(torch.tensor([i for s in data.train_sequences for i in s]), minlength=data.n_items + 1)
    popular = rank_metrics(counts.float().expand(len(ranker.histories), -1), ranker.histories, ranker.targets)
    handle = ranker.model.final_norm.register_forward_hook(lambda m, i, o: sae(o.flatten(0, 1)).view_as(o))
    try:
        spliced = ranker()
    finally:
        handle.remove()
    row = lambda r: {"HR@10": r["hit"].mean().item(), "NDCG@10": r["ndcg"].mean().item()}
    figures = {"sasrec": row(plain), "popularity": row(popular), "spliced": row(spliced)}
    figures["spliced"]["HR_ratio"] = figures["spliced"]["HR@10"] / figures["sasrec"]["HR@10"]
    figures["spliced"]["NDCG_ratio"] = figures["spliced"]["NDCG@10"] / figures["sasrec"]["NDCG@10"]
    return figures


@torch.no_grad()
def user_states(ranker: Ranker) -> Tensor:
    return ranker.model(ranker.ids)[:, -1]


def dictionary(codes: Tensor, data: MovieLens, fit: list[int], held: list[int]) -> tuple[dict[str, Any], list]:
    fires = codes > 0
    attrs, names = attributes(data, range(len(codes)), [h[-1] for h in data.test_histories])
    best, precision, recall, f1, lift = concept_dictionary(fires[fit], attrs[fit], fires[held], attrs[held])
    alive = fires[fit].any(0) & fires[held].any(0)
    confident = alive & (f1 >= CONFIDENT_F1) & (lift >= CONFIDENT_LIFT)
    rows = sorted(((f1[i].item(), i, names[best[i]], precision[i].item(), recall[i].item(), lift[i].item())
                   for i in confident.nonzero().flatten().tolist()), reverse=True)
    figures = {"alive_latents": int(alive.sum()), "confident": int(confident.sum()),
               "confident_share_of_alive": confident.sum().item() / max(1, int(alive.sum())),
               "rule": f"held-out F1 >= {CONFIDENT_F1} and precision >= {CONFIDENT_LIFT}x the attribute's base rate",
               "held_out_f1_of_alive": f1[alive].tolist()}
    return figures, rows


def control(ranker: Ranker, sae: SAE, concepts: Sequence[Any], fit: list[int], held: list[int], steer: float,
            strengths: Sequence[float] = DEACTIVATION_STRENGTHS) -> list[dict[str, Any]]:
    """Per genre concept: deactivate its latents (the positive-weight features of its readout) on every user, and
    steer every user along their mean decoder direction. The deactivation strength is chosen on FIT users (the
    largest top-10 share cut whose HR@10 on other-genre fit users stays within HR_TOLERANCE) and reported on
    held-out users."""
    data, model = ranker.data, ranker.model
    point = find_hookpoint(model, "final_norm")
    positions = RecAdapter(model).positions(model)
    plain = {"fit": ranker(fit), "held": ranker(held)}
    rows = []
    for concept in concepts:
        g = GENRES.index(concept.name)
        latents = concept.members(sae.cfg.d_sae)
        share = lambda top: data.item_genres[top][..., g].float().mean().item()
        others = {split: [i for i, u in enumerate(users) if not data.item_genres[ranker.targets[u], g]]
                  for split, users in (("fit", fit), ("held", held))}

        def deactivated(strength: float, split: str) -> dict[str, Tensor]:
            gate = Gate(point, sae, lambda call: latents[call.codes.indices], Edit("deactivate", strength),
                        mask_fn=positions)
            return ranker.gated(gate, fit if split == "fit" else held)

        def outcome(result: dict[str, Tensor], split: str) -> tuple[float, float]:
            cut = 1 - share(result["top"]) / max(share(plain[split]["top"]), 1e-12)
            idx = others[split]
            return cut, (result["hit"][idx].mean() - plain[split]["hit"][idx].mean()).item()

        tried = {s: outcome(deactivated(s, "fit"), "fit") for s in strengths}
        allowed = [s for s, (cut, hr) in tried.items() if hr >= -HR_TOLERANCE] or [strengths[0]]
        strength = max(allowed, key=lambda s: tried[s][0])
        off = deactivated(strength, "held")
        direction = sae.W_dec.detach()[latents].mean(0)
        steering = Gate(point, sae, lambda call: torch.ones_like(call.codes.values, dtype=torch.bool),
                        Edit("steer", steer, direction=direction / direction.norm().clamp_min(1e-12)),
                        mask_fn=positions)
        steered = ranker.gated(steering, held)
        cut, hr_change = outcome(off, "held")
        idx = others["held"]
        rows.append({"genre": concept.name, "latents": int(latents.sum()), "strength": strength,
                     "share_before": share(plain["held"]["top"]), "share_deactivated": share(off["top"]),
                     "share_steered": share(steered["top"]), "cut": cut,
                     "HR@10_other_before": plain["held"]["hit"][idx].mean().item(),
                     "HR@10_other_deactivated": off["hit"][idx].mean().item(), "n_other_users": len(idx),
                     "HR@10_all_steered": steered["hit"].mean().item(),
                     "met": bool(cut >= CUT_TARGET and hr_change >= -HR_TOLERANCE)})
    return rows


def verdicts(guard: Any, ranker: Ranker, states: Tensor, fit: list[int], held: list[int]) -> list[dict[str, Any]]:
    """Per concept of the guard: held-out TPR / FPR at its shipped threshold and AUROC against fan labels, beside
    the dense probe's AUROC on the same users."""
    data = ranker.data
    results = guard.classify([ranker.histories[u] for u in held])
    rows = []
    for concept in guard.concepts:
        labels = fan_labels(data, ranker.histories, concept.name, fit)
        y = labels[held]
        scores = torch.tensor([v.scores[concept.name] for v in results])
        flagged = torch.tensor([concept.name in v.concepts for v in results])
        probe = dense_probe(states, labels, fit)(states[held])
        rows.append({"concept": concept.name, "fans": int((y == 1).sum()), "non_fans": int((y == 0).sum()),
                     "tpr": flagged[y == 1].float().mean().item(), "fpr": flagged[y == 0].float().mean().item(),
                     "auroc": auroc(scores, y), "dense_probe_auroc": auroc(probe, y),
                     "calibrated_tpr": concept.calibration.get("tpr"), "features": int(concept.features.numel())})
    return rows


def examples(classifier: Any, ranker: Ranker, users: Sequence[int]) -> list[dict[str, Any]]:
    """A few users: the genres of their recent items (largest shares) beside the concepts their verdict names."""
    shares = genre_shares(ranker.data, [ranker.histories[u] for u in users])
    results = classifier.classify([ranker.histories[u] for u in users])
    return [{"user": u + 1, "recent_genres": {GENRES[g]: round(shares[i, g].item(), 2)
                                              for g in shares[i].topk(3).indices.tolist()},
             "verdict": v.concepts} for i, (u, v) in enumerate(zip(users, results))]


def guard_effect(guard: Any, ranker: Ranker, held: list[int]) -> list[dict[str, Any]]:
    """The recipe's guard as shipped: for each of its concepts, the top-10 share of that genre among the held-out
    users it flags, ungated and gated."""
    data = ranker.data
    results = guard.classify([ranker.histories[u] for u in held])
    gated = ranker(held)  # the guard is attached: flagged users' representations are edited
    guard.detach()
    plain = ranker(held)
    rows = []
    for concept in guard.concepts:
        g = GENRES.index(concept.name)
        rows_flagged = [i for i, v in enumerate(results) if concept.name in v.concepts]
        rest = [i for i, v in enumerate(results) if not v.flagged]
        share = lambda top: data.item_genres[top][..., g].float().mean().item() if len(top) else math.nan
        rows.append({"concept": concept.name, "flagged_users": len(rows_flagged),
                     "share_flagged_plain": share(plain["top"][rows_flagged]),
                     "share_flagged_gated": share(gated["top"][rows_flagged]),
                     "unflagged_identical": bool(torch.equal(plain["top"][rest], gated["top"][rest]))})
    return rows


def run_study(classifier: Any, guard: Any, data: MovieLens, out: str | Path, steer: float = 4.0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """All five parts, then the report. `classifier`: the recipe's SASRec guarded with every concept (only its
    verdicts are read); `guard`: the recipe's guard as shipped (`recipes.load_guard`), on another copy."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, sae = classifier.target, classifier.gates[0].sae
    fit, held = split_users(len(data.sequences))
    # parts 1-4 read the model as it is: the classifier stands aside (classify attaches it only while it reads)
    classifier.detach()
    ranker = Ranker(model, data)
    figures: dict[str, Any] = {"users": {"fit": len(fit), "held_out": len(held)}}
    log("ranking: SASRec, popularity, SAE spliced in")
    figures["ranking"] = ranking(ranker, sae)
    states = user_states(ranker)
    codes = sae.encode(states).detach()
    log("concept dictionary")
    figures["dictionary"], table = dictionary(codes, data, fit, held)
    log(f"control: {len(classifier.concepts)} genres, deactivated and steered (+{steer})")
    figures["control"] = control(ranker, sae, classifier.concepts, fit, held, steer)
    log("per-user verdicts of the recipe's concepts")
    figures["verdicts"] = verdicts(classifier, ranker, states, fit, held)
    figures["examples"] = examples(classifier, ranker, held[:8])
    figures["guard"] = guard_effect(guard, Ranker(guard.target, data), held)
    figures["steer"] = steer
    with open(out / "concepts.tsv", "w") as fh:
        fh.write("latent\tconcept\tprecision\trecall\tf1\tlift\n")
        for f1, i, name, p, r, lift in table:
            fh.write(f"{i}\t{name}\t{p:.3f}\t{r:.3f}\t{f1:.3f}\t{lift:.2f}\n")
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    (out / "report.md").write_text(markdown(figures, table))
    (out / "report.html").write_text(page(figures, table))
    return figures


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def tables(figures: dict[str, Any], table: list) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table in the report, shared by the markdown and HTML pages."""
    r = figures["ranking"]
    out = [("Ranking (leave-one-out, full ranking, all users)", ["model", "HR@10", "NDCG@10"],
            [[name, f"{r[key]['HR@10']:.4f}", f"{r[key]['NDCG@10']:.4f}"] for name, key in
             (("SASRec", "sasrec"), ("popularity", "popularity"),
              (f"SAE spliced in ({r['spliced']['HR_ratio']:.2f}x / {r['spliced']['NDCG_ratio']:.2f}x)", "spliced"))])]
    d = figures["dictionary"]
    out.append((f"Concept dictionary: {d['confident']} of {d['alive_latents']} live latents "
                f"({_pct(d['confident_share_of_alive'])}) confident ({d['rule']})",
                ["latent", "concept", "precision", "recall", "F1", "lift"],
                [[str(i), name, f"{p:.3f}", f"{rc:.3f}", f"{f1:.3f}", f"{lift:.2f}"]
                 for f1, i, name, p, rc, lift in table[:25]]))
    out.append((f"Control per genre concept (held-out users; deactivation strength chosen on fit users; steer "
                f"+{figures['steer']:g})",
                ["genre", "latents", "strength", "top-10 share", "deactivated", "cut", "steered",
                 "HR@10 others: before", "deactivated", "cut >= 50%, HR within 2 pts"],
                [[c["genre"], str(c["latents"]), f"{c['strength']:g}", _pct(c["share_before"]),
                  _pct(c["share_deactivated"]), _pct(c["cut"]), _pct(c["share_steered"]),
                  f"{c['HR@10_other_before']:.4f}", f"{c['HR@10_other_deactivated']:.4f}",
                  "met" if c["met"] else "not met"] for c in figures["control"]]))
    out.append(("Per-user verdicts (held-out users: fans against non-fans of each genre)",
                ["concept", "fans / non-fans", "TPR", "FPR", "AUROC", "dense probe AUROC", "features"],
                [[v["concept"], f"{v['fans']} / {v['non_fans']}", _pct(v["tpr"]), _pct(v["fpr"]), f"{v['auroc']:.3f}",
                  f"{v['dense_probe_auroc']:.3f}", str(v["features"])] for v in figures["verdicts"]]))
    out.append(("Example held-out users: their recent genres and their verdict", ["user", "recent genres (share)",
                                                                                  "concepts flagged"],
                [[str(e["user"]), ", ".join(f"{g} {v:.0%}" for g, v in e["recent_genres"].items()),
                  ", ".join(e["verdict"]) or "-"] for e in figures["examples"]]))
    out.append(("The recipe's guard (flagged held-out users' top-10 share of the genre)",
                ["concept", "flagged users", "plain", "gated", "unflagged users identical"],
                [[g["concept"], str(g["flagged_users"]), _pct(g["share_flagged_plain"]),
                  _pct(g["share_flagged_gated"]), str(g["unflagged_identical"])] for g in figures["guard"]]))
    return out


def markdown(figures: dict[str, Any], table: list) -> str:
    parts = ["# RecSAE on SASRec (MovieLens-100k)\n"]
    for title, header, rows in tables(figures, table):
        parts.append(f"## {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" +
                     "".join("| " + " | ".join(row) + " |\n" for row in rows))
    return "\n".join(parts)


def page(figures: dict[str, Any], table: list) -> str:
    control_rows = figures["control"]
    charts = [bar_chart("Genre share of the top-10: before, deactivated, steered", {
        label: {c["genre"]: c[key] for c in control_rows}
        for label, key in (("before", "share_before"), ("deactivated", "share_deactivated"),
                           ("steered", "share_steered"))}, width=1100),
        histogram("Held-out F1 of each live latent's best attribute", figures["dictionary"]["held_out_f1_of_alive"],
                  marker=CONFIDENT_F1),
        bar_chart("Per-user verdicts: AUROC (SAE concept) and dense probe AUROC", {
            "SAE concept": {v["concept"]: v["auroc"] for v in figures["verdicts"]},
            "dense probe": {v["concept"]: v["dense_probe_auroc"] for v in figures["verdicts"]}}, width=1100)]
    body = []
    for title, header, rows in tables(figures, table):
        body.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                    + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                        for row in rows) + "</table>")
    style = "body{font-family:sans-serif;max-width:1150px}table{border-collapse:collapse}td,th{border:1px solid #ccc;" \
            "padding:2px 6px;text-align:right}"
    return (f"<!doctype html><meta charset=utf-8><title>RecSAE on SASRec</title><style>{style}</style>"
            f"<h1>RecSAE on SASRec (MovieLens-100k)</h1>{''.join(body)}<h2>Charts</h2>{'<br>'.join(charts)}")
