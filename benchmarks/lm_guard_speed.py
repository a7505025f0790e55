"""Guarded vs plain `generate()` on SmolLM2-135M-Instruct: the gate's cost at prefill and per decoded token.

One SAE of 16k latents (TopK, random: speed does not depend on training) at the residual stream after block 20,
one concept over 32 of its latents with a threshold nothing reaches, so every token is encoded and scored and
none is edited (the common case: an unflagged request). Plain and guarded runs alternate in this process;
each figure is the median of --repeats runs after one warm-up.

    PYTHONPATH=$PWD python benchmarks/lm_guard_speed.py [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_guard import SAE, Concept
from sae_guard.adapters import lm
from sae_guard.adapters.smollm2 import load_smollm2

PROMPTS = ["Write a short poem about the sea.", "How do I bake bread at home?", "Explain photosynthesis simply.",
           "What is the capital of Japan?", "Give me three tips for sleeping better.", "Who wrote Hamlet?",
           "Describe a zebra to a child.", "Why is the sky blue?"]


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--layer", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = load_smollm2(device)  # left-padded for batched generation
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=model.config.hidden_size, d_sae=args.d_sae, k=32).to(device)
    concept = Concept("probe", features=torch.arange(32), threshold=1e30)
    print(f"SmolLM2-135M-Instruct on {device}, SAE {args.d_sae} latents (TopK k=32) at {lm.residual(model, args.layer)}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'batch':>5} {'phase':>8} {'plain s':>9} {'guarded s':>10} {'ratio':>6}")
    for batch_size in (1, 8):
        chats = [[{"role": "user", "content": p}] for p in PROMPTS[:batch_size]]
        batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True, padding=True).to(device)
        results = {}
        for phase, new in (("prefill", 1), ("generate", args.new_tokens)):
            kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            times = {"plain": [], "guarded": []}
            for rep in range(args.repeats + 1):
                for which in ("plain", "guarded"):
                    g = lm.guard_lm(model, sae=sae, concepts=[concept], tokenizer=tokenizer,
                                    hookpoint=lm.residual(model, args.layer)) if which == "guarded" else None
                    with torch.no_grad():
                        t = timed(lambda: model.generate(**batch, **kwargs), device)
                    if g is not None:
                        g.detach()
                    if rep:
                        times[which].append(t)
            results[phase] = {k: statistics.median(v) for k, v in times.items()}
            plain, guarded = results[phase]["plain"], results[phase]["guarded"]
            print(f"{batch_size:>5} {phase:>8} {plain:>9.3f} {guarded:>10.3f} {guarded / plain:>6.3f}")
        steps = args.new_tokens - 1
        per_plain = (results["generate"]["plain"] - results["prefill"]["plain"]) / steps
        per_guarded = (results["generate"]["guarded"] - results["prefill"]["guarded"]) / steps
        print(f"{batch_size:>5} {'decode/token':>8} {per_plain * 1e3:>8.2f}ms {per_guarded * 1e3:>9.2f}ms "
              f"{per_guarded / per_plain:>6.3f}")


if __name__ == "__main__":
    main()
