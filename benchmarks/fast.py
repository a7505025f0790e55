"""FAST (sequential, one conversation per row) against block harvesting, at equal tokens, on SmolLM2 chats.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/fast.py [--layer 12] [--tokens 60000]

Chats: user turns are requests built from COCO captions (/work/shared/data/prompts/coco_30k.csv),
assistant turns the model's own greedy replies (--reply-tokens). Both SAEs (TopK, same seed, size and
token budget) learn from the same training chats rendered with the chat template; only the layout
differs (sae_guard.train.harvest modes "sequential" vs "block"). Both are scored on held-out chats
harvested the way the model sees them at inference (each chat alone): FVU on all tokens, on the
special tokens (<|im_start|>, <|im_end|>, ...) apart, and on the other tokens.
"""

from __future__ import annotations

import argparse
import csv
import time

import torch

from sae_guard import SAE, harvest, train
from sae_guard.adapters.smollm2 import load_smollm2

COCO = "/work/shared/data/prompts/coco_30k.csv"
ASKS = ("Describe this scene in one sentence: {}", "What might happen next here? {}", "Write a short title for: {}",
        "Is this scene indoors or outdoors? {}")


def chats(model, tok, n: int, start: int, reply_tokens: int) -> list[list[dict]]:
    with open(COCO, newline="") as f:
        captions = [r["prompt"] for r in list(csv.DictReader(f))[start:start + n]]
    users = [ASKS[i % len(ASKS)].format(c) for i, c in enumerate(captions)]
    out = []
    for s in range(0, n, 16):
        batch = [[{"role": "user", "content": u}] for u in users[s:s + 16]]
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=reply_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        replies = tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        out += [m + [{"role": "assistant", "content": r.strip()}] for m, r in zip(batch, replies)]
    return out


def fvu(sae, acts, mask):
    x = acts[mask]
    if not len(x):
        return float("nan")
    with torch.no_grad():
        return float(((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--train-chats", type=int, default=96)
    ap.add_argument("--test-chats", type=int, default=32)
    ap.add_argument("--reply-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, tok = load_smollm2()  # left-padded for batched generation
    point = f"model.layers.{args.layer}"
    train_chats = chats(model, tok, args.train_chats, 0, args.reply_tokens)
    test_chats = chats(model, tok, args.test_chats, 5000, args.reply_tokens)
    print(f"{len(train_chats)} + {len(test_chats)} chats generated in {time.time() - t0:.0f}s; e.g. {train_chats[0]}")

    pieces = list(harvest(model, point, test_chats, tokenizer=tok, mode="sequential", chat_template=True,
                          context_size=256).with_tokens())
    test_acts = torch.cat([a for a, _ in pieces])
    special = torch.isin(torch.cat([i for _, i in pieces]), torch.tensor(tok.all_special_ids))
    results = {}
    for mode in ("sequential", "block"):
        data = harvest(model, point, train_chats, tokenizer=tok, mode=mode, chat_template=True, context_size=256)
        acts = data.to_tensor()
        sae = SAE.create("topk", d_in=acts.shape[1], d_sae=args.d_sae, k=args.k)
        torch.manual_seed(0)
        sae = train(sae, acts, tokens=args.tokens, batch_size=512, seed=0).sae.eval()
        everything = torch.ones(len(test_acts), dtype=torch.bool)
        results[mode] = (len(acts), fvu(sae, test_acts, everything), fvu(sae, test_acts, special),
                         fvu(sae, test_acts, ~special))
        print(f"{mode}: {results[mode]}; {time.time() - t0:.0f}s", flush=True)
    print(f"\nlayer {args.layer}, TopK d_sae={args.d_sae} k={args.k}, {args.tokens} training tokens each; "
          f"held-out: {len(test_acts)} tokens, {int(special.sum())} special\n")
    print("| harvesting | harvested tokens | FVU all | FVU special | FVU other |\n|---|---|---|---|---|")
    for mode, (n, a, s, o) in results.items():
        print(f"| {mode} | {n} | {a:.4f} | {s:.4f} | {o:.4f} |")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
