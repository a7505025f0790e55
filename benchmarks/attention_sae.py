"""An attention-output SAE (hook_z: heads concatenated before o_proj) on SmolLM2-135M-Instruct, with head report.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/attention_sae.py [--layers 6 12] [--tokens 60000]

Per layer: a TopK SAE trained on COCO captions (rows 0..--train-texts); on held-out captions (rows
20000..) the CE loss with the SAE's reconstruction spliced in, against the clean model and against
zero-ablating the attention output: recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean).
Then sae_guard.analysis.attention_heads: each feature's decoder-norm share per head, per-head top
features with their top-activating contexts, and the share of heads with two or more co-firing families.
"""

from __future__ import annotations

import argparse
import csv
import time

import torch

from sae_guard import SAE, harvest, train
from sae_guard.adapters.lm import attn_z, n_heads
from sae_guard.adapters.smollm2 import load_smollm2
from sae_guard.analysis.attention_heads import head_report, head_shares, share_multi_family
from sae_guard.hooks.hookpoints import find_hookpoint, hook_site

COCO = "/work/shared/data/prompts/coco_30k.csv"


def captions(start: int, n: int) -> list[str]:
    with open(COCO, newline="") as f:
        return [r["prompt"] for r in list(csv.DictReader(f))[start:start + n]]


@torch.no_grad()
def mean_ce(model, tok, texts, point=None, fn=None) -> float:
    handle = hook_site(find_hookpoint(model, point), fn) if fn else None
    try:
        total, count = 0.0, 0
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
        return total / count
    finally:
        if handle:
            handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[6])
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--train-texts", type=int, default=600)
    ap.add_argument("--test-texts", type=int, default=60)
    ap.add_argument("--min-share", type=float, default=0.5,
                    help="a feature belongs to its dominant head when that head holds this share of its decoder norm")
    ap.add_argument("--out", help="write the head report (markdown, top-activating contexts) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, tok = load_smollm2()
    heads = n_heads(model)
    train_texts, test_texts = captions(0, args.train_texts), captions(20000, args.test_texts)
    ce_clean = mean_ce(model, tok, test_texts)
    for layer in args.layers:
        point = attn_z(model, layer)
        pieces = list(harvest(model, point, train_texts, tokenizer=tok, mode="sequential", context_size=64).with_tokens())
        acts = torch.cat([a for a, _ in pieces])
        sae = train(SAE.create("topk", d_in=acts.shape[1], d_sae=args.d_sae, k=args.k), acts,
                    tokens=args.tokens, batch_size=512, seed=0).sae.eval()
        ce_sae = mean_ce(model, tok, test_texts, point, lambda h: sae(h))
        ce_zero = mean_ce(model, tok, test_texts, point, lambda h: torch.zeros_like(h))
        recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)
        print(f"\nlayer {layer} ({point}), {len(acts)} harvested tokens, TopK d_sae={args.d_sae} k={args.k}, "
              f"{args.tokens} training tokens; held-out {len(test_texts)} captions")
        print(f"CE clean {ce_clean:.4f} | with SAE {ce_sae:.4f} | zero-ablated {ce_zero:.4f} | "
              f"recovered {recovered:.3f} (target >= 0.90); {time.time() - t0:.0f}s")
        # head report on held-out tokens, each shown with the 6 tokens up to it
        test = list(harvest(model, point, test_texts, tokenizer=tok, mode="sequential", context_size=64).with_tokens())
        test_acts = torch.cat([a for a, _ in test])
        contexts = []
        for text in test_texts:
            ids = tok(text).input_ids[:64]
            contexts += [tok.decode(ids[max(0, i - 5):i + 1]) for i in range(len(ids))]
        with torch.no_grad():
            codes = sae.encode(test_acts)
        report = head_report(sae.W_dec, heads, codes, contexts[:len(codes)] if len(contexts) == len(codes) else None,
                             min_share=args.min_share)
        alive = (codes > 0).any(0)
        owned = sum(len(h.features) for h in report)
        best = head_shares(sae.W_dec, heads).amax(-1)[alive]
        print(f"largest head share per live feature: median {float(best.median()):.2f}, "
              f">= 0.5 for {float((best >= 0.5).float().mean()):.0%}, >= 0.8 for {float((best >= 0.8).float().mean()):.0%}")
        print(f"heads {heads}; features owned by one head (share >= {args.min_share}, top 8 per head): {owned}; "
              f"live features on held-out: {int(alive.sum())}/{args.d_sae}; "
              f"heads with >= 2 families: {share_multi_family(report):.0%}")
        shares = head_shares(sae.W_dec, heads)
        lines = [f"# Attention-output SAE, layer {layer} ({point})\n",
                 f"TopK d_sae={args.d_sae} k={args.k}, {args.tokens} training tokens on {len(acts)} harvested; "
                 f"CE recovered {recovered:.3f}. A head's features: those with >= {args.min_share:.0%} of their "
                 f"decoder norm in it, most often firing first; contexts are the 6 tokens up to the top activations.\n"]
        for h in report:
            shown = "; ".join(f"{f}: {h.examples.get(f, [])[:2]}" for f in h.features[:3])
            print(f"  head {h.head}: features {h.features} families {len(h.families)} | {shown}")
            lines.append(f"## head {h.head}: {len(h.features)} features, {len(h.families)} families\n")
            for f in h.features:
                examples = " / ".join(repr(c) for c in h.examples.get(f, []))
                lines.append(f"- feature {f} (share {shares[f, h.head]:.2f}): {examples}")
            lines.append("")
        if args.out:
            with open(args.out, "a") as fh:
                fh.write("\n".join(lines) + "\n")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
