"""FAST (sequential, one conversation per row) against block harvesting, at equal tokens, on SmolLM2 chats.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/fast.py [--layer 12] [--tokens 60000]

Chats: user turns are requests built from COCO captions (/work/shared/data/prompts/coco_30k.csv),
assistant turns the model's own greedy replies (--reply-tokens). Both SAEs (TopK, same seed, size and
token budget) learn from the same training chats rendered with the chat template; only the layout
differs (sae_guard.train.harvest modes "sequential" vs "block"). Both are scored on held-out chats
harvested the way the model sees them at inference (each chat alone): FVU on all tokens, on the
special tokens (<|im_start|>, <|im_end|>, ...) apart, and on the other tokens.

Steering through special-token latents (the FAST paper's z' = z + alpha d_k on special-token features): the
FAST SAE's latent most specific to special tokens (mean activation on them over the rest, on training chats)
is added, alpha times its unit decoder row, at the generation prompt (`<|im_start|>assistant\n`, the last 3
prompt tokens) during prefill, for the held-out user turns. Alpha is a share of the median residual norm there.
Measured per alpha, beside a random unit direction at the same alpha: the reply's perplexity under the
unsteered model (fluency) and its relevance (the share of the caption's content words the reply uses).
"""

from __future__ import annotations

import argparse
import csv
import time

import torch

from sae_guard import SAE, harvest, train
from sae_guard.adapters.smollm2 import load_smollm2
from sae_guard.analysis.detox import continuation_perplexity, random_direction
from sae_guard.hooks.hookpoints import find_hookpoint, hook_site

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


def steered_replies(model, tok, point, users, vector, reply_tokens, last=3):
    """Greedy replies with `vector` added at the last `last` prompt positions during prefill only."""
    def add(hidden):
        if hidden.shape[1] <= 1:  # a decode step: leave it alone
            return None
        hidden = hidden.clone()
        hidden[:, -last:] += vector.to(hidden)
        return hidden

    handle = hook_site(find_hookpoint(model, point), add)
    try:
        texts = [tok.apply_chat_template([{"role": "user", "content": u}], tokenize=False, add_generation_prompt=True)
                 for u in users]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=reply_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return texts, tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        handle.remove()


def relevance(caption: str, reply: str) -> float:
    words = {w.strip(".,!?").lower() for w in caption.split() if len(w.strip(".,!?")) > 3}
    said = {w.strip(".,!?").lower() for w in reply.split()}
    return len(words & said) / max(1, len(words))


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
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0],
                    help="steering strengths, as shares of the residual norm at special tokens")
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
        if mode == "sequential":
            fast_sae, train_pieces = sae, list(data.with_tokens())
        print(f"{mode}: {results[mode]}; {time.time() - t0:.0f}s", flush=True)
    print(f"\nlayer {args.layer}, TopK d_sae={args.d_sae} k={args.k}, {args.tokens} training tokens each; "
          f"held-out: {len(test_acts)} tokens, {int(special.sum())} special\n")
    print("| harvesting | harvested tokens | FVU all | FVU special | FVU other |\n|---|---|---|---|---|")
    for mode, (n, a, s, o) in results.items():
        print(f"| {mode} | {n} | {a:.4f} | {s:.4f} | {o:.4f} |")
    steering(args, model, tok, point, fast_sae, train_pieces, test_chats)
    print(f"total {time.time() - t0:.0f}s")


def steering(args, model, tok, point, sae, pieces, test_chats) -> None:
    acts = torch.cat([a for a, _ in pieces])
    special = torch.isin(torch.cat([i for _, i in pieces]), torch.tensor(tok.all_special_ids))
    with torch.no_grad():
        codes = sae.encode(acts)
    specificity = codes[special].mean(0) / codes[~special].mean(0).clamp_min(1e-3)
    latent = int(specificity.argmax())
    direction = sae.W_dec.detach()[latent]
    direction = direction / direction.norm()
    scale = float(acts[special].norm(dim=-1).median())
    users = [c[0]["content"] for c in test_chats]
    captions = [u.split(": ", 1)[-1].split("? ", 1)[-1] for u in users]
    print(f"\nspecial-token latent {latent} (mean on special tokens {float(codes[special, latent].mean()):.2f}, "
          f"elsewhere {float(codes[~special, latent].mean()):.3f}); residual norm there {scale:.1f}\n")
    print("| alpha (share of norm) | direction | reply ppl (median) | relevance | example |\n|---|---|---|---|---|")
    for share in args.alphas:
        for name, unit in (("special-token latent", direction), ("random", random_direction(len(direction)))):
            if share == 0 and name == "random":
                continue
            prompts, replies = steered_replies(model, tok, point, users, share * scale * unit, args.reply_tokens)
            ppl = float(continuation_perplexity(model, tok, prompts, replies).nanmedian())
            rel = sum(relevance(c, r) for c, r in zip(captions, replies)) / len(replies)
            print(f"| {share:g} | {name} | {ppl:.2f} | {rel:.3f} | {replies[0][:60]!r} |", flush=True)


if __name__ == "__main__":
    main()
