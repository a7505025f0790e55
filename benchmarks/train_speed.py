"""TopK training speed: sae_guard against its floor and against sparsify and SAELens, in one run.

    python benchmarks/train_speed.py                      # 384 -> 12288, k=32, batch 4096
    python benchmarks/train_speed.py --no-peers --steps 5
    python benchmarks/train_speed.py --no-peers --jumprelu-bandwidths 0.001 0.2   # JumpReLU's kernel width too

Figures, all medians over the timed steps:
- sae_guard step: one real step of `sae_guard.train` (data batch, forward, backward, decoder constraint,
  fused Adam, dead-latent tracking), read from the trainer's own per-step timings. Like the peers' timed
  steps it runs in the "no dead latents" regime: a latent counts as dead after 10M tokens without firing
  (sparsify's default), so a short run never computes AuxK;
- floor: one dense encoder matmul plus the top-k of that shape, the least any TopK step must do;
- peers: the same step in sparsify and SAELens (benchmarks/peers/peer_speed.py), run in their own
  venv (created by benchmarks/peers/setup_peers.sh) on the same shapes and threads;
- with --jumprelu-bandwidths: one JumpReLU step (target L0 = k) per straight-through kernel width, in the same run,
  since a wider kernel puts more latents (those within half the width below their threshold) in the sparse pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sae_guard

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"


def floor_seconds(d_in: int, d_sae: int, k: int, batch: int, repeats: int) -> float:
    x, w, b = torch.randn(batch, d_in), torch.randn(d_sae, d_in) / d_in**0.5, torch.zeros(d_sae)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        F.linear(x, w, b).topk(k, dim=-1, sorted=False)
        if i:
            times.append(time.perf_counter() - start)
    return float(torch.tensor(times).median())


def ours(d_in: int, d_sae: int, k: int, batch: int, steps: int, dtype_autocast: bool, arch: str = "topk",
         **options) -> dict:
    torch.manual_seed(0)
    data = torch.randn(batch * 4, d_in, generator=torch.Generator().manual_seed(0))
    sparsity = {"target_l0": k} if arch == "jumprelu" else {"k": k}
    # dead after 10M tokens, sparsify's default: like the peers' timed steps, no step here computes AuxK
    sae = sae_guard.SAE.create(arch, d_in=d_in, d_sae=d_sae, dead_tokens=10_000_000, **sparsity, **options)
    _, figures = sae_guard.train(sae, data, tokens=batch * (steps + 1), batch_size=batch, progress=False,
                                 autocast=dtype_autocast)
    return {"step_seconds": figures["step_seconds_median"], "tokens_per_second": batch / figures["step_seconds_median"]}


def peers(args, threads: int) -> dict:
    venv = Path(os.environ.get("PEERS_VENV", ROOT / ".venv-peers"))
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(["bash", str(PEERS / "setup_peers.sh")], check=True, cwd=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        subprocess.run([str(python), str(PEERS / "peer_speed.py"), "--d-in", str(args.d_in), "--d-sae",
                        str(args.d_sae), "--k", str(args.k), "--batch", str(args.batch), "--steps", str(args.steps),
                        "--warmup", "1", "--threads", str(threads), "--json", str(out)], check=True, cwd=ROOT)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--d-sae", type=int, default=12288)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--jumprelu-bandwidths", type=float, nargs="*", default=[],
                        help="also time a JumpReLU step at each of these kernel widths")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"TopK training step, d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch}, "
          f"{threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    result = {"shape": vars(args), "threads": threads}
    result["floor_seconds"] = floor = floor_seconds(args.d_in, args.d_sae, args.k, args.batch, args.steps)
    result["sae_guard"] = mine = ours(args.d_in, args.d_sae, args.k, args.batch, args.steps, False)
    print(f"{'floor (matmul + top-k)':28} {floor:8.3f} s")
    print(f"{'sae_guard':28} {mine['step_seconds']:8.3f} s  {mine['tokens_per_second']:9.0f} tok/s  "
          f"{mine['step_seconds'] / floor:5.2f}x floor")
    if not args.no_peers:
        result["peers"] = peer = peers(args, threads)
        for name in ("sparsify", "sae_lens"):
            if name in peer:
                row = peer[name]
                print(f"{name + ' ' + row.get('version', ''):28} {row['step_seconds']:8.3f} s  "
                      f"{row['tokens_per_second']:9.0f} tok/s  sae_guard is "
                      f"{mine['tokens_per_second'] / row['tokens_per_second']:.2f}x faster")
    for width in args.jumprelu_bandwidths:
        row = ours(args.d_in, args.d_sae, args.k, args.batch, args.steps, False, "jumprelu", bandwidth=width)
        result.setdefault("jumprelu", {})[str(width)] = row
        print(f"{'jumprelu bandwidth ' + format(width, 'g'):28} {row['step_seconds']:8.3f} s  "
              f"{row['tokens_per_second']:9.0f} tok/s  {row['step_seconds'] / floor:5.2f}x floor")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
