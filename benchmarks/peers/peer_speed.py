"""TopK SAE *training* step throughput of the peer libraries, on identical data.

Run with the peer venv's python (bash benchmarks/peers/setup_peers.sh):

    .venv-peers/bin/python benchmarks/peers/peer_speed.py \
        --d-in 384 --d-sae 12288 --k 32 --batch 4096 --steps 5 --warmup 1 \
        --json out/peer_speed.json

For each peer one *training step* is the per-step work of that library's own
trainer, reproduced from its source (read the notes below before comparing):

EleutherAI sparsify (eai-sparsify, `sparsify/trainer.py`, one hookpoint,
TrainConfig(loss_fn="fvu", optimizer="adam"), other settings default:
grad_acc_steps=1, micro_acc_steps=1, auxk_alpha=0 -> no dead mask, k_decay_steps=0,
SparseCoderConfig(k, num_latents, normalize_decoder=True, multi_topk=False)):
    hook:   outputs[mask] selection + all_outputs clone (done by the hook)
            sae.set_decoder_norm_to_unit_norm()
            total_variance = (y - y.mean(0)).pow(2).sum()
            out = sae(x, y, dead_mask=None, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            avg_fvu += float(out.fvu)            (host sync, as in the trainer)
            (out.fvu + 0 * out.auxk_loss + out.multi_topk_fvu / 8).backward()
    step:   sae.remove_gradient_parallel_to_decoder_directions()
            Adam.step(); zero_grad(); linear-warmup LR scheduler.step()
            num_tokens_since_fired bookkeeping
  Adam is torch.optim.Adam with lr = 2e-4 / sqrt(num_latents / 2**14) (what the
  trainer uses when bitsandbytes is absent); on step 0 b_dec is set to the batch
  mean, as the trainer's hook does. sparsify's decoder uses Triton when it imports;
  Triton cannot run on CPU tensors, so SPARSIFY_DISABLE_TRITON=1 selects its eager
  `embedding_bag` decoder. The trainer's torch.set_float32_matmul_precision("high")
  is applied during the sparsify run only.
  Omitted: the transformer forward that produces the activations, the DataLoader,
  the token-exclusion mask (all tokens kept), wandb logging, checkpointing, DDP.

SAELens (sae-lens, `sae_lens/training/sae_trainer.py`): the real `SAETrainer`
with a `TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k))` (defaults:
rescale_acts_by_decoder_norm=True, aux_loss_coefficient=1.0,
use_sparse_activations=False, apply_b_dec_to_input=True, fp32, no autocast) and
SAETrainerConfig defaults (Adam(lr=3e-4, betas=(0.9, 0.999)), constant LR,
dead_feature_window=1000). One step is exactly what `SAETrainer.fit()` does per
iteration minus wandb/pbar: maybe_reset_sparsity(); step(batch) [training_forward_pass,
firing statistics, loss.backward(), clip_grad_norm_(1.0), Adam step, zero_grad,
LR + coefficient schedulers]; _checkpoint_if_needed(); n_training_steps += 1.
  Omitted: the activation store / LLM forward, wandb logging and evals.

Both: within the first 1000 steps no latent counts as dead in either library, so
neither computes its AuxK term (sparsify: auxk_alpha=0 by default; SAELens: the
dead mask is empty), i.e. both runs are the "no dead latents" regime.

Input: `--warmup + --steps` batches of torch.randn(batch, d_in) from one fixed
seed, fp32 on CPU, the same batches in the same order for every peer;
torch.set_num_threads(--threads, default 2). Step time is wall time of the whole
step (CPU: no device sync needed); tokens/s = batch / median step time.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402


def make_batches(n: int, batch: int, d_in: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d_in, generator=g, dtype=torch.float32) for _ in range(n)]


def _summarise(name: str, version: str, times: list[float], batch: int, losses: list[float], extra: dict) -> dict:
    med = statistics.median(times)
    return {
        "peer": name,
        "version": version,
        "median_step_s": med,
        "mean_step_s": statistics.fmean(times),
        "min_step_s": min(times),
        "step_s": times,
        "tokens_per_s": batch / med,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        **extra,
    }


def bench_sparsify(args, batches: list[torch.Tensor]) -> dict:
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import decoder_impl
    from transformers import get_linear_schedule_with_warmup

    prev_prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # Trainer.fit() does this
    try:
        torch.manual_seed(args.seed)  # Trainer: torch.manual_seed(init_seed) before SparseCoder()
        cfg = SparseCoderConfig(num_latents=args.d_sae, k=args.k)
        sae = SparseCoder(args.d_in, cfg, "cpu", dtype=torch.float32)
        lr = 2e-4 / (sae.num_latents / (2**14)) ** 0.5
        opt = torch.optim.Adam([dict(params=sae.parameters(), lr=lr)])
        n_steps = len(batches)
        sched = get_linear_schedule_with_warmup(opt, 1000, n_steps)  # lr_warmup_steps=1000

        num_tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
        did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
        acc_steps = 1  # grad_acc_steps * micro_acc_steps
        denom = acc_steps * 1  # * wandb_log_frequency
        auxk_alpha = 0.0

        times, losses = [], []
        for step, acts in enumerate(batches):
            t0 = time.perf_counter()
            # ---- hook body (loss_fn="fvu") ----
            mask = torch.ones(acts.shape[0], dtype=torch.bool)
            all_outputs = acts.detach().clone()  # noqa: F841  (kept for fidelity)
            outputs = acts[mask]
            inputs = outputs
            if step == 0:
                sae.b_dec.data = outputs.mean(0).to(sae.dtype)
            if sae.cfg.normalize_decoder and not sae.cfg.transcode:
                sae.set_decoder_norm_to_unit_norm()
            total_variance = (outputs - outputs.mean(0)).pow(2).sum()
            out = sae(x=inputs, y=outputs, dead_mask=None, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            avg_fvu = float(out.fvu.detach() / denom)
            loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            loss.div(acc_steps).backward()
            # ---- optimizer step ----
            if sae.cfg.normalize_decoder and not sae.cfg.transcode:
                sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sched.step()
            with torch.no_grad():
                num_tokens_since_fired += acts.shape[0]
                num_tokens_since_fired[did_fire] = 0
                did_fire.zero_()
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                times.append(dt)
            losses.append(avg_fvu)
            print(f"  sparsify step {step}: {dt:.3f}s fvu={avg_fvu:.4f}", flush=True)
        extra = {
            "decoder_impl": decoder_impl.__name__,
            "lr": lr,
            "loss_name": "fvu",
        }
    finally:
        torch.set_float32_matmul_precision(prev_prec)
    return _summarise("sparsify", md.version("eai-sparsify"), times, args.batch, losses, extra)


def bench_saelens(args, batches: list[torch.Tensor]) -> dict:
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(args.seed)
    sae_cfg = TopKTrainingSAEConfig(
        d_in=args.d_in, d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu"
    )
    sae = TopKTrainingSAE(sae_cfg)
    lr = 3e-4  # LanguageModelSAERunnerConfig default
    tcfg = SAETrainerConfig(
        total_training_samples=args.batch * len(batches),
        train_batch_size_samples=args.batch,
        lr=lr,
        lr_end=lr / 10,  # the runner config's default
        device="cpu",
        autocast=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(batches))
    trainer.sae.to(tcfg.device)  # as fit() does

    times, losses = [], []
    for step, acts in enumerate(batches):
        t0 = time.perf_counter()
        trainer.maybe_reset_sparsity()
        out = trainer.step(acts)
        trainer._checkpoint_if_needed()
        trainer.n_training_steps += 1
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
        mse = float(out.losses["mse_loss"].detach())
        losses.append(mse)
        print(f"  saelens  step {step}: {dt:.3f}s mse={mse:.4f}", flush=True)
    extra = {
        "lr": lr,
        "loss_name": "mse_loss",
        "rescale_acts_by_decoder_norm": sae_cfg.rescale_acts_by_decoder_norm,
        "use_sparse_activations": sae_cfg.use_sparse_activations,
    }
    return _summarise("saelens", md.version("sae-lens"), times, args.batch, losses, extra)


PEERS = {"sparsify": bench_sparsify, "saelens": bench_saelens}


def main() -> int:
    ap = argparse.ArgumentParser(description="TopK SAE training-step throughput of sparsify and SAELens")
    ap.add_argument("--d-in", type=int, default=384)
    ap.add_argument("--d-sae", type=int, default=12288)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="sparsify,saelens")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    torch.set_num_threads(args.threads)
    batches = make_batches(args.warmup + args.steps, args.batch, args.d_in, args.seed)

    results = {}
    for name in [p.strip() for p in args.peers.split(",") if p.strip()]:
        print(f"[{name}] d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} "
              f"warmup={args.warmup} steps={args.steps}", flush=True)
        results[name] = PEERS[name](args, batches)
        r = results[name]
        print(f"[{name}] median {r['median_step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s", flush=True)
        gc.collect()

    report = {
        "config": {
            "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch": args.batch,
            "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
            "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
        },
        "env": {
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "peers": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
