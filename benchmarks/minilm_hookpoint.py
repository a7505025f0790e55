"""Which MiniLM layer should the prompt classifier read? Measured, one small SAE per candidate layer.

    python benchmarks/minilm_hookpoint.py                                  # encoder.layer.0-5, default budget
    python benchmarks/minilm_hookpoint.py --layers 3 4 --d-sae 4096 --tokens 1000000 --json hookpoint.json

For each hookpoint `encoder.layer.L` of the packaged all-MiniLM-L6-v2: train a TopK SAE on the tokens of the SAE
training prompts (`prompts.sae_training_prompts`, which hold no calibrate or test prompt), fit every concept on its
FIT split with each feature strategy, set its threshold at 1% FPR on the CALIBRATE retain prompts, and report the
calibrate TPR there (the `Concept.fit` calibration figures). The test split is never read. FVU and dead fraction are
measured on the calibrate prompts' tokens, which no SAE was trained on.

All six layers come from one forward pass per prompt (real tokens only, truncated at 256 as the guard does),
cached as fp16 memory-mapped files under --cache, so a rerun reads them back instead of running MiniLM again.
`--export RECIPE` hands the chosen layer's cached activations to `sae-guard train RECIPE` (see `export`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import save_file

import sae_guard
from sae_guard import prompts as prompt_sets
from sae_guard import recipes
from sae_guard.adapters.minilm import load_minilm
from sae_guard.concepts import STRATEGIES, Concept
from sae_guard.hooks.capture import capture_hidden
from sae_guard.hooks.hookpoints import find_hookpoint
from sae_guard.sae.codes import SparseCodes
from sae_guard.sae.metrics import Accumulator

N_LAYERS = 6
MAX_LENGTH = 256  # the guard's truncation (sentence-transformers' max_seq_length)
WIDTH = 384


class Segment:
    """One harvest: prompts.json, offsets.json (token offsets of each prompt) and layer{L}.f16 memmaps."""

    def __init__(self, folder: Path) -> None:
        self.prompts = json.loads((folder / "prompts.json").read_text())
        self.offsets = np.asarray(json.loads((folder / "offsets.json").read_text()), dtype=np.int64)
        shape = (int(self.offsets[-1]), WIDTH)
        self.layers = [np.memmap(folder / f"layer{i}.f16", dtype=np.float16, mode="r", shape=shape)
                       for i in range(N_LAYERS)]

    @staticmethod
    def harvest(folder: Path, prompts: Sequence[str], batch_size: int = 64) -> None:
        """Run MiniLM once over `prompts` (in length order) and write every layer's real-token activations."""
        folder.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_minilm()
        lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=True, max_length=MAX_LENGTH)["input_ids"]]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        layers = [np.memmap(folder / f"layer{i}.f16", dtype=np.float16, mode="w+", shape=(int(offsets[-1]), WIDTH))
                  for i in range(N_LAYERS)]
        _check_hidden_states_are_hookpoints(model, tokenizer, prompts[:4])
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        start_time = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                batch = tokenizer([prompts[i] for i in index], padding=True, truncation=True, max_length=MAX_LENGTH,
                                  return_tensors="pt")
                hidden = model(**batch, output_hidden_states=True).hidden_states  # embeddings, layer 0, ..., 5
                for row, i in enumerate(index):
                    n = lengths[i]
                    for layer in range(N_LAYERS):
                        layers[layer][offsets[i] : offsets[i] + n] = hidden[layer + 1][row, :n].half().numpy()
                if start // batch_size % 100 == 0:
                    print(f"  harvested {start + len(index)}/{len(prompts)} prompts "
                          f"({time.perf_counter() - start_time:.0f} s)", file=sys.stderr)
        for layer in layers:
            layer.flush()
        (folder / "prompts.json").write_text(json.dumps(list(prompts)))
        (folder / "offsets.json").write_text(json.dumps(offsets.tolist()))  # written last: marks it complete


class LayerCache:
    """Per-token activations of every layer of MiniLM for a set of prompts, kept as fp16 memmaps under `root`.

    Prompts missing from the segments already there are harvested into a new segment, so changing the prompt
    sets costs only the new prompts.
    """

    def __init__(self, root: Path, prompts: Sequence[str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        segments = [Segment(f.parent) for f in sorted(root.glob("*/offsets.json"))]
        known = {p for segment in segments for p in segment.prompts}
        missing = list(dict.fromkeys(p for p in prompts if p not in known))
        if missing:
            print(f"  harvesting {len(missing)} prompts not cached in {root}", file=sys.stderr)
            folder = root / hashlib.sha256("\x1f".join(missing).encode()).hexdigest()[:16]
            Segment.harvest(folder, missing)
            segments.append(Segment(folder))
        self.segments = segments
        self.position = {p: (s, i) for s, segment in enumerate(segments) for i, p in enumerate(segment.prompts)}

    def rows(self, prompts: Sequence[str]) -> list[tuple[int, int, int]]:
        """(segment, first row, end row) of each prompt's tokens."""
        spans = []
        for prompt in prompts:
            s, i = self.position[prompt]
            offsets = self.segments[s].offsets
            spans.append((s, int(offsets[i]), int(offsets[i + 1])))
        return spans

    def n_tokens(self, prompts: Sequence[str]) -> int:
        return sum(end - first for _, first, end in self.rows(prompts))

    def activations(self, layer: int, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_tokens, 384) fp16 activations of `prompts`' tokens, in order, and the prompt number of each row."""
        spans = self.rows(prompts)
        out = np.empty((sum(end - first for _, first, end in spans), WIDTH), dtype=np.float16)
        owners = np.empty(out.shape[0], dtype=np.int64)
        row = 0
        for number, (s, first, end) in enumerate(spans):
            out[row : row + end - first] = self.segments[s].layers[layer][first:end]
            owners[row : row + end - first] = number
            row += end - first
        return torch.from_numpy(out), torch.from_numpy(owners)


def _check_hidden_states_are_hookpoints(model, tokenizer, prompts: Sequence[str]) -> None:
    """hidden_states[L + 1] must be what the hookpoint encoder.layer.L gives (what the guard reads)."""
    batch = tokenizer(list(prompts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS):
        hooked = capture_hidden(find_hookpoint(model, f"encoder.layer.{layer}"), **batch)
        if not torch.allclose(hooked, hidden[layer + 1], atol=1e-5):
            raise AssertionError(f"hidden_states[{layer + 1}] differs from hookpoint encoder.layer.{layer}")


class CodeBook:
    """SAE codes of every token of a set of prompts, encoded once; `__call__` is a `Concept.fit` encoder.

    `accumulator` holds the SAE's reconstruction figures over the tokens of the `measured` prompts.
    """

    def __init__(self, sae, cache: LayerCache, layer: int, prompts: Sequence[str], measured: set[str],
                 chunk: int = 8192) -> None:
        self.prompts = list(dict.fromkeys(prompts))
        acts, owners = cache.activations(layer, self.prompts)
        is_measured = torch.tensor([p in measured for p in self.prompts])[owners]
        self.accumulator = Accumulator(sae.d_sae)
        values, indices = [], []
        with torch.no_grad():
            for x, keep in zip(acts.split(chunk), is_measured.split(chunk)):
                x = x.float()
                codes = sae.encode_sparse(x)
                if keep.any():
                    kept = SparseCodes(codes.values[keep], codes.indices[keep])
                    self.accumulator.update(x[keep], sae.decode(kept), kept)
                values.append(codes.values)
                indices.append(codes.indices)
        self.values, self.indices, self.owners = torch.cat(values), torch.cat(indices), owners
        starts = torch.zeros(len(self.prompts) + 1, dtype=torch.long)
        starts[1:] = torch.bincount(owners, minlength=len(self.prompts)).cumsum(0)
        self.starts, self.position = starts, {p: i for i, p in enumerate(self.prompts)}

    def __call__(self, prompts: Sequence[str]) -> tuple[SparseCodes, torch.Tensor, int]:
        ids = [self.position[p] for p in prompts]
        spans = [torch.arange(int(self.starts[i]), int(self.starts[i + 1])) for i in ids]
        rows = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(s) for s in spans], dtype=torch.long))
        return SparseCodes(self.values[rows], self.indices[rows]), owner, len(prompts)


def measure_layer(layer: int, cache: LayerCache, train_prompts: Sequence[str], datasets, args) -> list[dict]:
    """Train one SAE at `layer`, then fit and calibrate every concept with every strategy."""
    start = time.perf_counter()
    data, _ = cache.activations(layer, train_prompts)
    torch.manual_seed(args.seed)
    sae = sae_guard.SAE.create("topk", d_in=data.shape[1], d_sae=args.d_sae, k=args.k)
    _, figures = sae_guard.train(sae, data, tokens=args.tokens, batch_size=args.batch_size, seed=args.seed,
                                 progress=False)
    del data
    train_seconds = time.perf_counter() - start
    needed = [p for d in datasets for s in (d.fit, d.calibrate) for p in (*s.target, *s.retain)]
    calibrate = {p for d in datasets for p in (*d.calibrate.target, *d.calibrate.retain)}
    codes = CodeBook(sae, cache, layer, needed, measured=calibrate)
    quality = codes.accumulator.result()
    rows = []
    for data_set in datasets:
        for strategy in args.strategies:
            for n_features in args.n_features:
                concept = Concept(data_set.name, target=data_set.fit.target, retain=data_set.fit.retain,
                                  calibrate_target=data_set.calibrate.target,
                                  calibrate_retain=data_set.calibrate.retain, strategy=strategy,
                                  n_features=n_features, fpr=args.fpr)
                fitted = concept.fit(codes, sae.d_sae, sae.W_dec.detach()).calibration  # no features: TPR 0
                rows.append({
                    "hookpoint": f"encoder.layer.{layer}", "concept": data_set.name, "strategy": strategy,
                    "n_features": n_features, "features": fitted["n_features"],
                    "calibrate_tpr": fitted["tpr"], "calibrate_fpr": fitted["fpr"],
                    "heldout_fvu": quality["fvu"], "heldout_dead_fraction": quality["dead_fraction"],
                    "train_fvu": figures["fvu"], "train_seconds": round(train_seconds, 1),
                })
    print(f"  encoder.layer.{layer}: held-out FVU {quality['fvu']:.3f}, trained in {train_seconds:.0f} s, "
          f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """One line per hookpoint x strategy x n_features: held-out FVU and each concept's calibrate TPR."""
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    keyed = {(r["hookpoint"], r["strategy"], r["n_features"], r["concept"]): r for r in rows}
    settings = list(dict.fromkeys((r["hookpoint"], r["strategy"], r["n_features"]) for r in rows))
    lines = [f"{'hookpoint':16} {'strategy':13} {'n_feat':>6} {'FVU':>6} {'dead':>6} "
             + " ".join(f"{c + ' TPR':>14}" for c in concepts) + f" {'min TPR':>8}"]
    for hookpoint, strategy, n_features in settings:
        cells = [keyed[(hookpoint, strategy, n_features, c)] for c in concepts]
        lines.append(f"{hookpoint:16} {strategy:13} {n_features:6d} {cells[0]['heldout_fvu']:6.3f} "
                     f"{cells[0]['heldout_dead_fraction']:6.3f} "
                     + " ".join(f"{c['calibrate_tpr']:14.3f}" for c in cells)
                     + f" {min(c['calibrate_tpr'] for c in cells):8.3f}")
    return "\n".join(lines)


def export(args) -> None:
    """Write the recipe's hookpoint activations where `sae-guard train` looks for them: its training prompts and
    its concepts' fit and calibrate prompts (`recipes.harvest_activations` files in the --work folder).

    The same real-token hidden states the library's harvest computes (checked on a few prompts here), so the
    build skips its own pass of MiniLM over the ~1M tokens this script has already harvested.
    """
    recipe = recipes.load_recipe(args.export)
    prefix = "encoder.layer."
    if not recipe.hookpoint.startswith(prefix):
        raise SystemExit(f"{recipe.name}: hookpoint {recipe.hookpoint!r} is not one of encoder.layer.0-5")
    layer = int(recipe.hookpoint[len(prefix):])
    model, tokenizer = load_minilm()
    work = Path(args.work) if args.work else recipes.default_work_dir(recipe)
    sets = {"training": recipes.training_prompts(recipe, args.data),
            "concepts": recipes.concept_prompts(recipes.concept_datasets(recipe, args.data))}
    for label, prompts in sets.items():
        ordered = recipes.harvest_order(prompts)
        cache = LayerCache(Path(args.cache), ordered)
        activations, _ = cache.activations(layer, ordered)
        sample = ordered[:: max(1, len(ordered) // 16)][:16]
        reference = recipes.harvest_activations(recipe, model, tokenizer, sample)
        ours, _ = cache.activations(layer, recipes.harvest_order(sample))
        difference = (ours.float() - reference.float()).abs().max().item()
        if difference > 0.05:
            raise AssertionError(f"cached activations differ from the library harvest by {difference}")
        target = recipes.activation_cache_file(recipe, prompts, work)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({"activations": activations.contiguous()}, str(target))
        print(f"{label}: {activations.shape[0]} tokens of {len(prompts)} prompts at {recipe.hookpoint} -> {target} "
              f"(max difference to the library harvest on {len(sample)} prompts: {difference:.2g})")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=list(range(N_LAYERS)), choices=range(N_LAYERS))
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per layer")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--n-features", type=int, nargs="*", default=[16, 128])
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="prompt data folder (default: see sae_guard.prompts)")
    parser.add_argument("--cache", default="/tmp/sae-guard-minilm-layers", help="activation cache folder")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--export", metavar="RECIPE", help="instead of measuring, write RECIPE's training "
                        "activations at its hookpoint into the activation cache of `sae-guard train`")
    parser.add_argument("--work", help="with --export: the train command's --work folder (default: its default)")
    args = parser.parse_args(argv)
    if args.export:
        export(args)
        return []

    torch.manual_seed(args.seed)
    datasets = [prompt_sets.concept(name, args.data, args.seed) for name in prompt_sets.CONCEPTS]
    train_prompts = prompt_sets.sae_training_prompts(args.data, args.seed)
    calibrate = [p for d in datasets for p in (*d.calibrate.target, *d.calibrate.retain)]
    leaked = set(train_prompts) & set().union(*(d.held_out() for d in datasets))
    if leaked:
        raise AssertionError(f"{len(leaked)} calibrate/test prompts are among the SAE training prompts")
    fit = [p for d in datasets for p in (*d.fit.target, *d.fit.retain)]
    everything = list(dict.fromkeys([*train_prompts, *fit, *calibrate]))
    cache = LayerCache(Path(args.cache), everything)
    n_tokens = cache.n_tokens(train_prompts)
    print(f"{len(train_prompts)} training prompts, {n_tokens} unique tokens; {args.tokens} tokens per SAE "
          f"(d_sae {args.d_sae}, k {args.k})", file=sys.stderr)
    rows = [row for layer in args.layers for row in measure_layer(layer, cache, train_prompts, datasets, args)]
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
