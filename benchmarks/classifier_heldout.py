"""The prompt classifier on held-out prompts written apart from every fitting source (issue 12).

    python benchmarks/classifier_heldout.py --embedding-cache /tmp/minilm-embeddings.pt --json heldout.json \
        --results benchmarks/RESULTS.md

Per concept, every method is fitted on the concept's fit split and thresholded at the concept's own recipe `fpr`
on its calibrate split (the SAE row: the shipped guard at its shipped thresholds; keyword: its fixed rule), exactly
as in benchmarks/classifier.py. Nothing is chosen on the held-out sets (`sae_guard.prompts.heldout`, from
`sae_guard/concept_data/heldout.toml`; `--round 2`: heldout2.toml, written later for the builds after the first
round had been read many times; `--round 3`: heldout3.toml, written before any build was scored on it, for the
build after the two read on round 2); they are only scored:
- heldout_tpr / nearmiss_fpr: flag rates on the held-out targets and near misses at the calibrated threshold;
- tpr@nm5: held-out TPR at the threshold that flags at most 5% of the near misses (equal FPR for every method:
  how well a method ranks, not how well its threshold transfers);
- flag rates on DiffusionDB val and COCO val (benign) and, for nudity, on UnlearnDiffAtk and I2P sexual;
- cross-source (nudity): fitted on DiffusionDB NSFW prompts, tested on the I2P sexual and UnlearnDiffAtk sets.
The guard's any-concept flag rates on DiffusionDB val and COCO val are printed with the issue's targets.
`--max-per-side N` keeps a fixed hashed sample of at most N prompts of each split side and each flag-rate set (the
held-out sets are always whole), so the suite runs in minutes on a shared CPU; the figures say which N was used.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classifier import GuardScores, write_results  # noqa: E402
from classifier_baselines import Embedder, baseline_methods, evaluate_scorer, extra_sets, tpr_at_fpr  # noqa: E402

from sae_guard import prompts as prompt_sets  # noqa: E402
from sae_guard import recipes  # noqa: E402
from sae_guard.adapters.minilm import load_minilm  # noqa: E402

SECTION = "## Prompt classifier (MiniLM) on held-out prompts"
NOTES = """\
Held-out sets: `sae_guard/concept_data/heldout.toml` (hand-written for evaluation only; see
model_cards/minilm-prompts.md). Rows are fitted and thresholded on the concepts' own fit / calibrate splits; the
held-out prompts choose nothing. `tpr@nm5` is read at the threshold flagging 5% of the near misses, so every method
is compared at equal FPR."""
TARGETS = {"heldout_tpr": 0.90, "nearmiss_fpr": 0.05, "diffusiondb_any": 0.02, "coco_any": 0.01, "attack": 0.90,
           "celebrity_tpr": 0.95}


def _scores(score, prompts: Sequence[str]) -> torch.Tensor:
    return torch.as_tensor(score(prompts), dtype=torch.float64).flatten()


def row_for(method: str, score, data, heldout, extra: dict, fpr: float, fixed: float | None) -> dict:
    sets = {**extra, "heldout_target": heldout.target, "heldout_nearmiss": heldout.nearmiss}
    row = evaluate_scorer(method, score, data, sets, fpr, fixed)
    rates = row["flag_rates"]
    row["heldout_tpr"], row["nearmiss_fpr"] = rates.pop("heldout_target"), rates.pop("heldout_nearmiss")
    nearmiss = _scores(score, heldout.nearmiss)
    point = tpr_at_fpr(_scores(score, heldout.target), nearmiss, 0.05, calibration_retain_scores=nearmiss)
    row["tpr_at_nearmiss_5"] = point.tpr
    return row


def _sample(prompts: Sequence[str], n: int | None, salt: str) -> list[str]:
    if n is None or len(prompts) <= n:
        return list(prompts)
    return sorted(prompts, key=lambda p: prompt_sets._hash_key(prompt_sets.SEED, salt, p))[:n]


def _capped(data: prompt_sets.ConceptData, n: int | None) -> prompt_sets.ConceptData:
    splits = {s: prompt_sets.Split(_sample(data.split(s).target, n, f"{s}/t"), _sample(data.split(s).retain, n, f"{s}/r"))
              for s in prompt_sets.SPLITS}
    return replace(data, **splits)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    recipe = recipes.load_recipe(args.recipe)
    guard = recipes.load_guard(recipe, assets=args.assets)
    thresholds = {c.name: c.threshold for c in guard.concepts}
    fprs = {c.name: c.fpr for c in guard.concepts}
    sae_scores = GuardScores(guard, args.batch_size)
    embedder = Embedder(*load_minilm(), args.embedding_cache, args.batch_size)
    rows = []
    cap = args.max_per_side
    for name, data in recipes.concept_datasets(recipe, args.data).items():
        data = _capped(data, cap)
        heldout = prompt_sets.heldout(name, args.data, args.round)
        extra = {k: _sample(v, cap, k) for k, v in extra_sets(name, args.data, recipe.data.split_seed).items()}
        print(f"{name}: held-out {len(heldout.target)} targets / {len(heldout.nearmiss)} near misses", file=sys.stderr)
        for method in baseline_methods(embedder):
            score = method.fit(data.without_test())
            rows.append(row_for(method.name, score, data, heldout, extra, fprs[name], method.fixed_threshold))
        rows.append(row_for("sae", sae_scores.scorer(name), data, heldout, extra, fprs[name], thresholds[name]))
    overall = {
        "diffusiondb_val_any": sae_scores.flag_rate(
            _sample(prompt_sets.diffusiondb_val(args.data, recipe.data.split_seed), cap, "diffusiondb_val")),
        "coco_val_any": sae_scores.flag_rate(_sample(prompt_sets.coco_val(args.data), cap, "coco_val")),
        "max_per_side": cap,
    }
    guard.detach()
    return {"recipe": recipe.name, "hookpoint": recipe.hookpoint, "heldout_round": args.round, "rows": rows,
            "sae": overall}


def format_table(rows: Sequence[dict]) -> str:
    head = (f"{'concept':10} {'method':9} {'fpr':>6} {'test_tpr':>8} {'heldout_tpr':>11} {'nearmiss_fpr':>12} "
            f"{'tpr@nm5':>7} {'ddb_val':>7} {'coco_val':>8} {'unlearn':>7} {'i2p_sex':>7}")
    lines = [head]
    for r in rows:
        f = r["flag_rates"]
        attack = [f"{f[k]:7.3f}" if k in f else f"{'-':>7}" for k in ("unlearndiffatk", "i2p_sexual")]
        lines.append(f"{r['concept']:10} {r['method']:9} {r['target_fpr']:6.3f} {r['test_tpr']:8.3f} "
                     f"{r['heldout_tpr']:11.3f} {r['nearmiss_fpr']:12.3f} {r['tpr_at_nearmiss_5']:7.3f} "
                     f"{f['diffusiondb_val']:7.3f} {f['coco_val']:8.3f} {' '.join(attack)}")
    return "\n".join(lines)


def checks(result: dict) -> list[str]:
    """The issue's targets for the SAE row, each with its measured value and PASS or FAIL."""
    def line(ok: bool, text: str) -> str:
        return f"{'PASS' if ok else 'FAIL'}  {text}"

    out = []
    rows = {(r["concept"], r["method"]): r for r in result["rows"]}
    wins = 0
    for concept in sorted({c for c, _ in rows}):
        sae = rows[(concept, "sae")]
        need = TARGETS["celebrity_tpr"] if concept == "celebrity" else TARGETS["heldout_tpr"]
        out.append(line(sae["heldout_tpr"] >= need and sae["nearmiss_fpr"] <= TARGETS["nearmiss_fpr"],
                        f"sae {concept}: held-out TPR {sae['heldout_tpr']:.3f} (>= {need}), near-miss FPR "
                        f"{sae['nearmiss_fpr']:.3f} (<= {TARGETS['nearmiss_fpr']})"))
        probe = rows[(concept, "probe")]
        beats = sae["tpr_at_nearmiss_5"] > probe["tpr_at_nearmiss_5"]
        wins += beats
        out.append(f"      {concept}: tpr@nm5 sae {sae['tpr_at_nearmiss_5']:.3f} vs embedding probe "
                   f"{probe['tpr_at_nearmiss_5']:.3f} ({'sae ahead' if beats else 'probe ahead or equal'})")
        if concept == "nudity":
            for attack in ("unlearndiffatk", "i2p_sexual"):
                rate = sae["flag_rates"][attack]
                out.append(line(rate >= TARGETS["attack"], f"sae nudity {attack} detection {rate:.3f} (>= 0.9)"))
    out.append(line(wins >= 2, f"sae beats the embedding probe at equal near-miss FPR on {wins} of 3 concepts (>= 2)"))
    ddb, coco = result["sae"]["diffusiondb_val_any"], result["sae"]["coco_val_any"]
    out.append(line(ddb <= TARGETS["diffusiondb_any"], f"sae DiffusionDB val flagged, any concept {ddb:.4f} (<= 0.02)"))
    out.append(line(coco <= TARGETS["coco_any"], f"sae COCO val flagged, any concept {coco:.4f} (<= 0.01)"))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="minilm-prompts")
    parser.add_argument("--assets", help="the recipe's assets folder, if not the packaged one")
    parser.add_argument("--data", help="prompt data folder (default: see sae_guard.prompts)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--embedding-cache", help="file to keep the baselines' MiniLM embeddings in between runs")
    parser.add_argument("--max-per-side", type=int, help="hashed sample of at most this many prompts per set side")
    parser.add_argument("--round", type=int, default=1, choices=sorted(prompt_sets.HELDOUT_ROUNDS),
                        help="which round of held-out sets to score (sae_guard.prompts.HELDOUT_ROUNDS)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--results", help="rewrite this suite's section of this RESULTS.md")
    args = parser.parse_args(argv)
    result = run(args)
    text = "\n".join([format_table(result["rows"]), "", *checks(result)])
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.results:
        shown = list(argv if argv is not None else sys.argv[1:])
        write_results(Path(args.results), "python benchmarks/classifier_heldout.py " + shlex.join(shown), text,
                      SECTION, NOTES)
    return result


if __name__ == "__main__":
    main()
