"""Bipolar features: does an SAE hold a feature that takes both signs in one latent, or split it in two?

    OMP_NUM_THREADS=1 python benchmarks/bipolar.py --arch abstopk topk
    OMP_NUM_THREADS=1 python benchmarks/bipolar.py --arch abstopk --set sign_warmup=0

The data is the zoo's `base` setting (128-d, 512 atoms, about 6 active, k 6) with half its atoms bipolar: each
occurrence of one takes either sign, evenly (`sae_guard.synthetic.planted(bipolar=0.5)`). AbsTopK is built to keep
such a feature in one latent, firing with either sign; a non-negative SAE needs a latent for each pole. Per run,
on 32,768 fresh samples after 3M training tokens (batch 4096, d_sae 1024): atoms recovered (|cosine| >= 0.9 for a
signed SAE, cosine for others, as in the zoo), and for the bipolar atoms the share held by exactly one latent
and the share split into a latent for each pole (one at cosine >= 0.9, another at <= -0.9, or, for a
non-negative SAE, the share of their negative poles it also recovers).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from zoo_defaults import parse_overrides

import sae_guard
from sae_guard.sae.metrics import evaluate
from sae_guard.synthetic import Generator, recovery

BIPOLAR = Generator("bipolar_base", bipolar=0.5, seed=29)


def run(arch: str, tokens: int, d_sae: int, overrides: dict, seed: int = 0) -> dict:
    ds = BIPOLAR.dataset()
    k = BIPOLAR.k(ds)
    torch.manual_seed(seed)
    sae = sae_guard.SAE.create(arch, d_in=ds.d, d_sae=d_sae, k=k, **overrides)
    sae, _ = sae_guard.train(sae, ds, tokens=tokens, batch_size=4096, progress=False, seed=seed)
    sae.eval()
    held_out = ds.sample(32768, torch.Generator().manual_seed(10_000 + seed))[0]
    figures = evaluate(sae, held_out)
    cosines = ds.atoms @ F.normalize(sae.W_dec.detach(), dim=-1).T  # (atoms, latents)
    positive, negative = (cosines >= 0.9).sum(1), (cosines <= -0.9).sum(1)
    bipolar = ds.bipolar
    return {"arch": arch, "overrides": overrides, "tokens": tokens,
            "recovered": recovery(sae.W_dec, ds.atoms, signed=sae.signed),
            "bipolar_in_one_latent": ((positive + negative) == 1)[bipolar].float().mean().item(),
            "bipolar_split": ((positive >= 1) & (negative >= 1))[bipolar].float().mean().item(),
            "fvu": figures["fvu"], "l0": figures["l0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["abstopk", "topk"])
    parser.add_argument("--tokens", type=float, default=3e6)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", dest="overrides",
                        help="config fields for every run, as JSON values (sign_warmup=0)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    overrides = parse_overrides(parser, args.overrides)
    rows = []
    print(f"{'arch':10} {'recovered':>9} {'bipolar: one latent':>19} {'split':>6} {'fvu':>7} {'l0':>5}  overrides")
    for arch in args.arch:
        row = run(arch, int(args.tokens), args.d_sae, overrides)
        rows.append(row)
        print(f"{arch:10} {row['recovered']:9.3f} {row['bipolar_in_one_latent']:19.3f} {row['bipolar_split']:6.3f} "
              f"{row['fvu']:7.4f} {row['l0']:5.2f}  {overrides or ''}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
