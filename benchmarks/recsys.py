"""RecSAE on a SASRec trained on MovieLens-100k: ranking quality, splice fidelity, concept dictionaries, control.

    SAE_GUARD_CACHE=... python benchmarks/recsys.py [--epochs 10] [--out DIR]

Leave-one-out: each user's last item is the test target, the one before is held back from training (validation,
unused), training sees the rest. HR@10 / NDCG@10 by FULL ranking over the 1,682 movies, the history's items
excluded. Users are split by id parity: even ids fit the concept dictionaries, odd ids are held out for every
concept and control figure. One thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sae_guard.adapters.recsys import (RecAdapter, SASRec, fit_sasrec, pad_histories, rank_metrics, load_sasrec,
                                       save_sasrec,
                                       training_windows)
from sae_guard.hooks.gate import Edit, Gate
from sae_guard.hooks.hookpoints import find_hookpoint
from sae_guard.analysis.rec_concepts import attributes, concept_dictionary
from sae_guard.recsys_data import GENRES, load_movielens
from sae_guard.sae import SAE
from sae_guard.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steer", type=float, default=4.0, help="steering strength (the user state has norm ~8)")
    ap.add_argument("--sae-tokens", type=int, default=2_000_000)
    ap.add_argument("--genre", default=None, help="default: the genre with most confident latents")
    ap.add_argument("--out", default="recsys-report")
    ap.add_argument("--from", dest="source", default=None,
                    help="a folder this script wrote (sasrec/, sae/): reuse its model and SAE instead of training")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    data = load_movielens()
    seqs = data.sequences
    histories = [s[:-1] for s in seqs]
    targets = torch.tensor([s[-1] for s in seqs])
    t0 = time.time()
    if args.source:
        model = load_sasrec(Path(args.source) / "sasrec")
    else:
        model = fit_sasrec(SASRec(data.n_items), [s[:-2] for s in seqs], epochs=args.epochs)
    train_s = time.time() - t0
    ids = pad_histories(histories, data.n_items, model.max_len)

    def evaluate(rows=slice(None)):
        with torch.no_grad():
            return rank_metrics(model.scores(ids[rows]), histories[rows] if isinstance(rows, slice) else
                                [histories[i] for i in rows], targets[rows])

    base = evaluate()
    popularity = torch.bincount(torch.tensor([i for s in seqs for i in s[:-2]]), minlength=data.n_items + 1).float()
    pop = rank_metrics(popularity.expand(len(seqs), -1), histories, targets)
    figures = {"train_seconds": round(train_s, 1), "epochs": args.epochs,
               "sasrec": {"HR@10": base["hit"].mean().item(), "NDCG@10": base["ndcg"].mean().item()},
               "popularity": {"HR@10": pop["hit"].mean().item(), "NDCG@10": pop["ndcg"].mean().item()}}
    print(json.dumps(figures))

    # RecSAE: TopK k=32, 2048 latents, every valid position of the training windows
    x, _ = training_windows([s[:-2] for s in seqs], model.max_len)
    with torch.no_grad():
        states = model(x)[x != 0]
    t0 = time.time()
    if args.source:
        sae = SAE.load(Path(args.source) / "sae")
    else:
        sae = SAE.create("topk", d_in=states.shape[1], d_sae=2048, k=32)
        train(sae, states, tokens=args.sae_tokens, batch_size=1024, progress=False)
    sae.eval()
    figures["sae"] = {"states": len(states), "train_seconds": round(time.time() - t0, 1)}
    handle = model.final_norm.register_forward_hook(lambda m, i, o: sae(o.flatten(0, 1)).view_as(o))
    try:
        spliced = evaluate()
    finally:
        handle.remove()
    figures["spliced"] = {"HR@10": spliced["hit"].mean().item(), "NDCG@10": spliced["ndcg"].mean().item()}
    figures["spliced"]["HR_ratio"] = figures["spliced"]["HR@10"] / figures["sasrec"]["HR@10"]
    figures["spliced"]["NDCG_ratio"] = figures["spliced"]["NDCG@10"] / figures["sasrec"]["NDCG@10"]
    print(json.dumps(figures["spliced"]))

    # concept dictionaries, fitted on even user ids, measured on odd ones
    fit = [u for u in range(len(seqs)) if u % 2 == 0]
    held = [u for u in range(len(seqs)) if u % 2 == 1]
    with torch.no_grad():
        codes = sae.encode(model(ids)[:, -1])
    fires = codes > 0
    last = [h[-1] for h in histories]
    attrs, names = attributes(data, range(len(seqs)), last)
    best, precision, recall, f1, lift = concept_dictionary(fires[fit], attrs[fit], fires[held], attrs[held])
    alive = fires[fit].any(0) & fires[held].any(0)
    confident = alive & (f1 >= 0.3) & (lift >= 2)
    figures["concepts"] = {"alive_latents": int(alive.sum()), "confident": int(confident.sum()),
                           "confident_share_of_alive": confident.sum().item() / max(1, int(alive.sum())),
                           "rule": "held-out F1 >= 0.3 and precision >= 2x the attribute's base rate"}
    table = sorted(((f1[i].item(), i) for i in range(2048) if confident[i]), reverse=True)
    with open(out / "concepts.tsv", "w") as fh:
        fh.write("latent\tconcept\tprecision\trecall\tf1\tlift\n")
        for score, i in table:
            fh.write(f"{i}\t{names[best[i]]}\t{precision[i]:.3f}\t{recall[i]:.3f}\t{score:.3f}\t{lift[i]:.2f}\n")
    print(json.dumps(figures["concepts"]))

    # control: deactivate the latents of one genre through the Gate
    # a genre's latents: those firing for >= 5 fit users with precision >= 2x the genre's base rate there (the last
    # item's genre); chosen on fit users only, measured on held-out ones
    ffit, gfit = fires[fit].float(), attrs[fit][:, :len(GENRES)].float()
    support = ffit.sum(0)
    genre_lift = (ffit.T @ gfit) / support[:, None].clamp_min(1) / gfit.mean(0).clamp_min(1e-9)
    associated = (genre_lift >= 2) & (support[:, None] >= 5)
    g = GENRES.index(args.genre) if args.genre else int(associated.sum(0).argmax())
    args.genre = GENRES[g]
    latents = associated[:, g]
    chosen = latents.nonzero().flatten()
    direction = sae.W_dec.detach()[chosen].mean(0)
    direction = direction / direction.norm().clamp_min(1e-12)
    point = find_hookpoint(model, RecAdapter(model).default_hookpoint(model))
    adapter = RecAdapter(model)
    held_t = torch.tensor(held)
    other = [u for u in held if not data.item_genres[targets[u], g]]

    def share(top):
        return data.item_genres[top][..., g].float().mean().item()

    def controlled(edit, every_row=False):
        decide = ((lambda call: torch.ones_like(call.codes.values, dtype=torch.bool)) if every_row
                  else (lambda call: latents[call.codes.indices]))
        gate = Gate(point, sae, decide, edit, mask_fn=adapter.positions(model))
        gate.attach()
        try:
            return evaluate(held), evaluate(other)
        finally:
            gate.detach()

    before_all, before_other = evaluate(held), evaluate(other)
    off_all, off_other = controlled(Edit("deactivate", 0.0))
    steer_all, _ = controlled(Edit("steer", args.steer, direction=direction), every_row=True)
    figures["control"] = {
        "genre": args.genre, "latents": len(chosen),
        "share_top10_before": share(before_all["top"]), "share_top10_deactivated": share(off_all["top"]),
        "share_top10_steered": share(steer_all["top"]),
        "HR@10_other_genre_users_before": before_other["hit"].mean().item(),
        "HR@10_other_genre_users_deactivated": off_other["hit"].mean().item(), "n_other_users": len(other)}
    print(json.dumps(figures["control"]))
    save_sasrec(model, out / "sasrec")
    sae.save(out / "sae")
    (out / "figures.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
