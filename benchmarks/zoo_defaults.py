"""SAE zoo defaults across a family of planted dictionaries: do the defaults hold beyond one generator?

    python benchmarks/zoo_defaults.py                                   # every generator, then the held-out ones
    python benchmarks/zoo_defaults.py --generators issue17 --arch topk batchtopk --json zoo.json
    python benchmarks/zoo_defaults.py --generators small base --encoder-floor 12e6   # SAEs started at the atoms
    python benchmarks/zoo_defaults.py --generators base --arch gba --lr 4.8e-3        # a learning rate of your own

Each variant gets d_sae=1024, k = the generator's true L0 plus its offset (within +-2; JumpReLU, and ReLU and Gated
when named with --arch: target_l0 = k; GBA: its own default sparsity) and otherwise its defaults. Per variant and
generator it reports the share of true atoms matched at cosine >= 0.9 (recovery), FVU and L0 of `sae(x)` in eval
mode on 32,768 fresh samples,
the oracle FVU (the planted atoms' own FVU under the same budget: each sample's k largest coefficients, or the
set's k * n largest for variants whose L0 varies per token; the floor where k is below the true L0), and
tokens-to-0.9-recovery (recovery checked every `--probe-every` tokens during training; "-" when never
reached); recovery within bands of the atoms' firing rates (`recovery_by_rate`: rare atoms missed, or common ones);
on hierarchical data also parents and children recovered apart (`synthetic.hierarchy_recovery`); for nested
dictionaries (matryoshka) the FVU of each prefix alone, its latents' share of the same eval-mode codes.
The generators are `sae_guard.synthetic.GENERATORS`; the held-out settings (`HELD_OUT`, never used to choose
defaults) come last. Single-threaded (torch.set_num_threads(1)), as the shared CPU needs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import sae_guard
from sae_guard.sae.metrics import evaluate, fvu
from sae_guard.synthetic import (GENERATORS, HELD_OUT, Generator, best_cosines, hierarchy_recovery, oracle_fvu,
                                 recovery)
from sae_guard.train.data import make_stream

VARIANTS = ["topk", "batchtopk", "abstopk", "matryoshka", "mutual_choice", "feature_choice", "jumprelu", "gba"]
# the targets: recovery >= 0.90 and FVU < 0.15 in this many tokens; eval-mode L0 <= 1.5 x target
BUDGET = {"jumprelu": 6e6, "gba": 6e6}
DEFAULT_BUDGET = 3e6


def sparsity_args(arch: str, k: int) -> dict:
    if arch in ("jumprelu", "relu", "gated"):  # penalty variants: the L0 their penalty steers to
        return {"target_l0": k}
    if arch == "gba":
        return {}
    return {"k": k}


class RecoveryProbe:
    """A resumable stream that measures recovery of the SAE being trained every `every` batches.

    The trainer pulls batch i just before step i, so the figure logged at batch i is the recovery after
    i steps, i.e. i * batch_size tokens; the first crossing of 0.9 is tokens-to-0.9-recovery.
    """

    def __init__(self, data, sae, atoms: torch.Tensor, batch_size: int, seed: int, every: int) -> None:
        self.inner, self.sae, self.atoms = make_stream(data, batch_size, seed), sae, atoms
        self.batch_size, self.every = batch_size, every
        self.reached: int | None = None

    def iterate(self, start_step: int):
        for step, batch in enumerate(self.inner.iterate(start_step), start_step):
            if self.reached is None and step and step % self.every == 0:
                if recovery(self.sae.W_dec.detach(), self.atoms, signed=self.sae.signed) >= 0.9:
                    self.reached = step * self.batch_size
            yield batch


def evaluation_sample(gen: Generator, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """The 32,768 fresh samples (and their true coefficients) every figure of `gen` is measured on."""
    return ds.sample(32768, torch.Generator().manual_seed(10_000 + gen.seed))


def run(arch: str, gen: Generator, tokens: int, d_sae: int, probe_tokens: int, seed: int = 0,
        overrides: dict | None = None, lr: float | None = None) -> dict:
    ds = gen.dataset()
    k = gen.k(ds)
    torch.manual_seed(seed)
    sae = sae_guard.SAE.create(arch, d_in=ds.d, d_sae=d_sae, **{**sparsity_args(arch, k), **(overrides or {})})
    batch_size = 4096
    probe = RecoveryProbe(gen.training_data(ds), sae, ds.atoms, batch_size, seed, max(1, probe_tokens // batch_size))
    start = time.perf_counter()
    sae, _ = sae_guard.train(sae, probe, tokens=tokens, batch_size=batch_size, progress=False, seed=seed, lr=lr)
    seconds = time.perf_counter() - start
    sae.eval()
    held_out, coeffs = evaluation_sample(gen, ds)
    figures = evaluate(sae, held_out)
    per_token = arch == "topk" or not getattr(sae, "batch_level", True)  # jumprelu, gba: L0 varies per token
    rec = recovery(sae.W_dec, ds.atoms, signed=sae.signed)
    target_l0 = k if arch != "gba" else None
    row = {"arch": arch, "generator": gen.name, "true_l0": round(ds.expected_l0(), 2), "k": k, "tokens": tokens,
           "recovered": rec, "fvu": figures["fvu"], "l0": figures["l0"],
           "oracle_fvu": oracle_fvu(held_out, coeffs, ds.atoms, k, per_token),
           "dead_fraction": figures["dead_fraction"],
           "tokens_to_0.9": probe.reached if probe.reached is not None else (tokens if rec >= 0.9 else None),
           "seconds": round(seconds, 1)}
    row["recovered_by_rate"] = recovery_by_rate(sae.W_dec.detach(), ds.atoms, coeffs, sae.signed)
    if ds.parents is not None:
        row.update(hierarchy_recovery(sae.W_dec.detach(), ds, signed=sae.signed))
    if hasattr(sae, "prefix_ends"):
        row["prefix_fvu"] = prefix_fvus(sae, held_out)
    row["met"] = rec >= 0.9 and figures["fvu"] < 0.15 and (target_l0 is None or figures["l0"] <= 1.5 * target_l0)
    return row


@torch.no_grad()
def prefix_fvus(sae, x: torch.Tensor) -> dict[int, float]:
    """FVU of each nested prefix alone (a Matryoshka SAE's promise): the eval-mode codes cut to its latents."""
    recons = sae.prefix_reconstructions(sae.encode(x))
    return {end: round(fvu(x, recon), 4) for end, recon in zip(sae.prefix_ends, recons)}


RATE_BANDS = (0.0, 0.003, 0.006, 0.012, 0.025, 1.0)  # atom firing rates, for recovery per band


def recovery_by_rate(W_dec: torch.Tensor, atoms: torch.Tensor, coeffs: torch.Tensor, signed: bool) -> dict[str, list]:
    """Recovery within bands of the atoms' firing rates on the evaluation sample: which atoms a variant misses,
    the rare ones or the common ones."""
    rate = (coeffs != 0).float().mean(0)
    found = best_cosines(W_dec, atoms, signed) >= 0.9
    bands = {}
    for lo, hi in zip(RATE_BANDS, RATE_BANDS[1:]):
        inside = (rate >= lo) & (rate < hi)
        if inside.any():
            bands[f"{lo}-{hi}"] = [int(inside.sum()), round(found[inside].float().mean().item(), 3)]
    return bands


def print_oracles(generators: list[Generator]) -> None:
    """The FVU floor each budget leaves, before any SAE is trained."""
    print(f"{'generator':24} {'true':>5}  oracle FVU per token / whole set at k = true L0 -2, -1, 0, +1, +2")
    for gen in generators:
        ds = gen.dataset()
        x, coeffs = evaluation_sample(gen, ds)
        true = round(ds.expected_l0())
        cells = [f"{oracle_fvu(x, coeffs, ds.atoms, k):.3f} / {oracle_fvu(x, coeffs, ds.atoms, k, False):.3f}"
                 for k in range(max(1, true - 2), true + 3)]
        print(f"{gen.name:24} {ds.expected_l0():5.2f}  " + "   ".join(cells))


FLOOR_ARCHS = ("topk", "batchtopk")  # a per-token and a batch-level budget


def encoder_floor(gen: Generator, tokens: int, arch: str = "topk",
                  overrides: dict | None = None) -> tuple[float, float]:
    """FVU and recovery of an SAE that starts at the answer: one latent per planted atom, encoder and decoder rows the
    atoms, then trained for `tokens` with the generator's k. The oracle FVU keeps the true coefficients, which no
    encoder reads off exactly where atoms overlap; this is what an encoder with the same budget reaches from the best
    start, and whether the variant's own objective keeps the atoms (recovery) once it has them."""
    ds = gen.dataset()
    torch.manual_seed(0)
    config = {**sparsity_args(arch, gen.k(ds)), **(overrides or {})}
    sae = sae_guard.SAE.create(arch, d_in=ds.d, d_sae=ds.n_atoms, **config)
    with torch.no_grad():
        sae.W_dec.copy_(ds.atoms)
        sae.W_enc.copy_(ds.atoms)
        sae.b_enc.zero_()
    sae, _ = sae_guard.train(sae, gen.training_data(ds), tokens=tokens, batch_size=4096, progress=False)
    fvu_from_atoms = evaluate(sae.eval(), evaluation_sample(gen, ds)[0])["fvu"]
    return fvu_from_atoms, recovery(sae.W_dec.detach(), ds.atoms, signed=sae.signed)


def parse_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    """`--set FIELD=VALUE ...` as config fields, each value read as JSON; a malformed one is a usage error."""
    overrides = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes FIELD=VALUE, got {item!r}")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {field}: {value!r} is not a JSON value (strings need quotes: {field}='\"...\"')")
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [g.name for g in GENERATORS + HELD_OUT]
    parser.add_argument("--arch", nargs="*", default=None,
                        help=f"variants to train (default: {' '.join(VARIANTS)}; with --encoder-floor: "
                             f"{' '.join(FLOOR_ARCHS)})")
    parser.add_argument("--generators", nargs="*", default=names, choices=names)
    parser.add_argument("--tokens", type=float, default=None,
                        help="override every variant's budget (3M; 6M for jumprelu, gba)")
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: each variant's default_lr)")
    parser.add_argument("--probe-every", type=float, default=2.5e5, help="tokens between recovery checks")
    parser.add_argument("--seed", type=int, default=0, help="the SAE's initialisation and the data stream's order")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", dest="overrides",
                        help="config fields to change from the defaults, values as JSON (e.g. topk_warmup=1.0 "
                             'selection=\"batch\"): how the card\'s trials of other settings were run')
    parser.add_argument("--oracle-only", action="store_true",
                        help="print each generator's oracle FVU at k = true L0 -2..+2 (per token / set), then stop")
    parser.add_argument("--encoder-floor", type=float, metavar="TOKENS",
                        help="print each generator's oracle FVU beside the FVU and recovery of SAEs (--arch; TopK and "
                             "BatchTopK by default) started at the planted atoms and trained this many tokens "
                             "(`encoder_floor`), then stop")
    args = parser.parse_args()
    args.arch = args.arch or list(FLOOR_ARCHS if args.encoder_floor else VARIANTS)
    torch.set_num_threads(1)
    order = [g for g in GENERATORS + HELD_OUT if g.name in args.generators]
    overrides = parse_overrides(parser, args.overrides)
    if args.oracle_only:
        print_oracles(order)
        return
    if args.encoder_floor:
        print(f"{'generator':24} {'k':>3} {'oracle':>7}  FVU / recovered from the atoms: " + ", ".join(args.arch))
        for gen in order:
            ds = gen.dataset()
            x, coeffs = evaluation_sample(gen, ds)
            floors = [encoder_floor(gen, int(args.encoder_floor), arch, overrides) for arch in args.arch]
            print(f"{gen.name:24} {gen.k(ds):3d} {oracle_fvu(x, coeffs, ds.atoms, gen.k(ds)):7.4f}  "
                  + "  ".join(f"{f:.4f} / {r:.3f}" for f, r in floors), flush=True)
        return
    rows = []
    print(f"{'generator':24} {'arch':15} {'k':>3} {'true':>5} {'recovered':>9} {'fvu':>7} {'oracle':>7} {'l0':>6} "
          f"{'tok->0.9':>9} {'sec':>6}  target")
    for gen in order:
        held = " (held out)" if gen in HELD_OUT else ""
        for arch in args.arch:
            tokens = int(args.tokens or BUDGET.get(arch, DEFAULT_BUDGET))
            row = run(arch, gen, tokens, args.d_sae, int(args.probe_every), seed=args.seed, overrides=overrides,
                      lr=args.lr)
            row["held_out"], row["overrides"], row["lr"] = bool(held), overrides, args.lr
            rows.append(row)
            reached = f"{row['tokens_to_0.9'] / 1e6:.2f}M" if row["tokens_to_0.9"] else "-"
            print(f"{gen.name + held:24} {arch:15} {row['k']:3d} {row['true_l0']:5.2f} {row['recovered']:9.3f} "
                  f"{row['fvu']:7.4f} {row['oracle_fvu']:7.4f} {row['l0']:6.2f} {reached:>9} {row['seconds']:6.1f}  "
                  f"{'met' if row['met'] else 'MISSED'}", flush=True)
            print(f"{'':24} recovered by atom firing rate: " + ", ".join(
                f"{band} ({n} atoms) {share:.3f}" for band, (n, share) in row["recovered_by_rate"].items()))
            if "parents_recovered" in row:
                print(f"{'':24} parents recovered {row['parents_recovered']:.3f}, children "
                      f"{row['children_recovered']:.3f}; parents' best rows: median cosine {row['parent_cosine']:.3f} "
                      f"with the parent, {row['parent_with_children_cosine']:.3f} with parent + p * children")
            if "prefix_fvu" in row:
                print(f"{'':24} FVU of each prefix alone: " + ", ".join(
                    f"{end} latents {value:.4f}" for end, value in row["prefix_fvu"].items()))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
