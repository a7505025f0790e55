"""Gate overhead at real model sizes: guarded / plain forward time of a CLIP ViT-L/14 text encoder.

    python benchmarks/gate_speed.py              # both parts below
    python benchmarks/gate_speed.py --skip-itd

1. CLIP ViT-L/14 text tower (768 wide, 12 layers, 77 tokens; random weights: timing does not depend
   on them) guarded by a TopK SAE with 24,576 latents, k=64, at layer 8, on real COCO captions with the
   real CLIP tokenizer, padded to 77 as Stable Diffusion does. Reports median guarded / plain time.
2. The ItD size: 524,288 latents, k=64. Reports the gate's time and peak memory per prompt; the TopK
   encode runs in latent chunks, so no dense 77 x 524,288 matrix is formed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sae_guard import SAE, Concept, guard
from sae_guard.adapters.clip_vocab import clip_tokenizer
from sae_guard.prompts import coco

HOOK = "text_model.encoder.layers.8"


def clip_large() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768)
    return CLIPTextModel(config).eval()


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def peak_rss_during(fn) -> tuple[float, int]:
    """Seconds and the rise of peak resident memory (bytes) while fn runs (Linux VmHWM, reset first)."""
    def hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = rss()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, hwm() - base


def dog_concept(prompts: list[str]) -> Concept:
    target = [p for p in prompts if " dog" in p][:40]
    retain = [p for p in prompts if " dog" not in p][:120]
    return Concept("dog", target=target, retain=retain, n_features=16)


def part_clip_l(prompts: list[str], repeats: int, batches: list[int]) -> dict:
    model, tok = clip_large(), clip_tokenizer()
    torch.manual_seed(1)
    sae = SAE.create("topk", d_in=768, d_sae=24576, k=64).eval()
    results = {}
    g = guard(model, sae=sae, concepts=[dog_concept(prompts)], hookpoint=HOOK, tokenizer=tok)
    g.detach()
    for batch in batches:
        texts = prompts[200 : 200 + batch]
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        plain_times, guarded_times = [], []
        with torch.no_grad():
            model(input_ids=ids)
            for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
                plain_times += timed(lambda: model(input_ids=ids), 1)
                with guard(model, sae=sae, concepts=g.concepts, hookpoint=HOOK, tokenizer=tok):
                    guarded_times += timed(lambda: model(input_ids=ids), 1)
        plain, guarded = statistics.median(plain_times), statistics.median(guarded_times)
        real = int((ids != tok.pad_token_id).sum()) + batch  # + the EOS each prompt ends with
        results[f"batch_{batch}"] = {"plain_s": plain, "guarded_s": guarded, "ratio": guarded / plain,
                                     "real_tokens": real}
        print(f"CLIP-L text, batch {batch:2d} ({real} real tokens of {batch * 77}): plain {plain * 1e3:7.1f} ms, "
              f"guarded {guarded * 1e3:7.1f} ms, ratio {guarded / plain:.3f}")
    return results


def part_itd(prompts: list[str]) -> dict:
    model, tok = clip_large(), clip_tokenizer()
    torch.manual_seed(2)
    sae = SAE.create("topk", d_in=768, d_sae=524_288, k=64).eval()
    concept = Concept("dog", n_features=64)
    concept.features, concept.threshold = torch.arange(0, 524_288, 8192), 0.0  # timing only: any firing flags
    rows = []
    with guard(model, sae=sae, concepts=[concept], hookpoint=HOOK, tokenizer=tok) as g:
        gate = g.gates[0]
        for text in prompts[300:305]:
            ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[9]
            mask = ids != -1
            mask[:, int((ids == tok.eos_token_id).int().argmax()) + 1 :] = False
            seconds, peak = peak_rss_during(lambda: gate.apply(hidden, mask))
            rows.append({"real_tokens": int(mask.sum()), "gate_s": seconds, "peak_bytes": peak})
    dense_bytes = 77 * 524_288 * 4
    med_t = statistics.median(r["gate_s"] for r in rows)
    med_m = statistics.median(r["peak_bytes"] for r in rows)
    print(f"ItD size (524,288 latents, k=64): gate {med_t * 1e3:.0f} ms per prompt, peak memory +{med_m / 2**20:.0f} MiB "
          f"(a dense 77 x 524,288 fp32 code matrix alone is {dense_bytes / 2**20:.0f} MiB)")
    return {"per_prompt": rows, "median_gate_s": med_t, "median_peak_bytes": med_m, "dense_codes_bytes": dense_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--skip-itd", action="store_true")
    parser.add_argument("--itd-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    prompts = coco()
    if args.itd_only:
        Path(args.json).write_text(json.dumps(part_itd(prompts)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    result = {"clip_l": part_clip_l(prompts, args.repeats, args.batches)}
    if not args.skip_itd:
        # a process of its own, with large allocations served by fresh pages, so peak RSS counts them
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "itd.json"
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            subprocess.run([sys.executable, __file__, "--itd-only", "--json", str(out)], env=env, check=True)
            result["itd"] = json.loads(out.read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
