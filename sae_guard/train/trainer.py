"""The training loop: one code path for one CPU, one GPU, or several processes under accelerate.

    sae, figures = train(sae, activations, tokens=3_000_000, batch_size=4096)

Adam (fused where available), linear LR warm-up and a linear decay over the last fifth, dead-latent
tracking in tokens, each variant's own loss terms and dictionary constraints, optional bf16
autocast, checkpoints every N tokens with exact resume, and a progress bar with loss, FVU, L0 and
the dead fraction. Under torch.distributed (e.g. `accelerate launch`), every process takes its slice
of each global batch and gradients and firing statistics are averaged across processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..sae.base import SAE
from . import checkpoint
from .data import make_stream


DIVERGENCE_FACTOR = 1e3  # a loss this many times the largest of the first steps' means the run has blown up
REFERENCE_STEPS = 10  # steps whose losses set that reference
DIVERGED_FVU = 100.0  # past the first steps, a running FVU this high (100 times worse than the data's mean) too
CHECKPOINTS_PER_RUN = 10  # with a checkpoint_dir and no checkpoint_every, a checkpoint every tenth of the run


class TrainingDiverged(FloatingPointError):
    """The loss went non-finite or exploded: the learning rate is too high for this SAE and data."""


class TrainResult(NamedTuple):
    sae: SAE
    metrics: dict[str, Any]


@dataclass
class _Window:
    """Exponential moving averages of the per-step figures shown on the progress bar."""

    decay: float = 0.95
    values: dict[str, float] = field(default_factory=dict)

    def update(self, **figures: float) -> None:
        for name, value in figures.items():
            old = self.values.get(name)
            self.values[name] = value if old is None else self.decay * old + (1 - self.decay) * value


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_start: float) -> float:
    """Linear warm-up, constant, then linear decay to zero from `decay_start` of the run."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_from = int(decay_start * total_steps)
    if decay_start < 1.0 and step >= decay_from:
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_from))
    return 1.0


def default_dead_tokens(tokens: int, batch_size: int) -> int:
    """Tokens without firing after which a latent counts as dead (and AuxK starts training it).

    A hundredth of the run, at least 10 batches, at most 10M tokens (Gao et al.'s figure for long runs). The
    former tenth of the run left rare features' latents starved for most of a short run: planted data, batchtopk,
    1.5M tokens at lr 8e-3, atoms recovered 0.850 with a 150k-token window against 0.941 with 40k.
    """
    return min(10_000_000, max(tokens // 100, 10 * batch_size))


def tenth_of_run_dead_tokens(tokens: int, batch_size: int) -> int:
    """The dead-latent window before `default_dead_tokens`: a tenth of the run, at least one batch, at most 10M
    tokens. SAEs trained and recorded under it pin it, so their builds still reproduce them."""
    return min(10_000_000, max(tokens // 10, batch_size))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    sae: SAE,
    data,
    *,
    tokens: int,
    batch_size: int = 4096,
    lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_tokens: int | None = None,
    decay_start: float = 0.8,
    max_grad_norm: float | None = None,
    seed: int = 0,
    autocast: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train `sae` in place on `data` for `tokens` activation vectors; return it with its figures.

    data: an (N, d_in) tensor, an iterable of (n, d_in) chunks, or a `harvest(...)` of a model.
    lr: None picks the variant's default (`SAE.default_lr`: 2e-4 / sqrt(d_sae / 2**14), raised for d_in < 768,
        unless the variant says otherwise).
    checkpoint_dir: where checkpoints go (every `checkpoint_every` tokens, by default every tenth of the run, and
        at the end); a run started with the same directory resumes from it and finishes with the same weights as an
        uninterrupted run. The checkpoint keeps a fingerprint of the data (its first batch), the SAE's config and
        the budget (tokens, batch size, lr, seed, schedule); a run that differs in any of them refuses to resume.
    Raises `TrainingDiverged` when the loss turns non-finite, grows past `DIVERGENCE_FACTOR` times the largest of its
    first `REFERENCE_STEPS` values, or the running FVU passes `DIVERGED_FVU`: a learning rate too high, said at once
    rather than returned as weights.
    """
    if tokens <= 0 or batch_size <= 0:
        raise ValueError(f"tokens and batch_size must be positive, got tokens={tokens}, batch_size={batch_size}")
    rank, world = _world()
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world})")
    device = torch.device(device) if device is not None else sae.W_enc.device
    sae.to(device).train()
    total_steps = math.ceil(tokens / batch_size)
    warmup_steps = max(1, min(total_steps // 20, 1000)) if warmup_tokens is None else max(1, warmup_tokens // batch_size)
    dead_tokens = sae.cfg.dead_tokens or default_dead_tokens(tokens, batch_size)
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir to write to")
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint_dir is not None and not checkpoint_every:
        checkpoint_every = max(tokens // CHECKPOINTS_PER_RUN, batch_size)
    checkpoint_steps = max(1, checkpoint_every // batch_size) if checkpoint_every else None

    stream = make_stream(data, batch_size, seed)
    base_lr = lr if lr is not None else sae.default_lr()
    params = [p for p in sae.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.Adam(params, lr=base_lr, betas=betas, **fused)
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    start_step, window = 0, _Window()
    first = next(stream.iterate(0)).to(device, torch.float32)
    _check_batch(first, sae, 0)
    run_key = {"architecture": sae.architecture, "tokens": tokens, "batch_size": batch_size, "seed": seed,
               "world": world, "lr": base_lr, "betas": list(betas), "warmup_steps": warmup_steps,
               "decay_start": decay_start, "config": _config_fingerprint(sae), "data": _data_fingerprint(first)}

    if checkpoint.exists(checkpoint_dir):
        tensors, state = checkpoint.read(checkpoint_dir, sae, optimizer)
        if state["run"] != run_key:
            differ = sorted(k for k in set(run_key) | set(state["run"]) if state["run"].get(k) != run_key.get(k))
            raise ValueError(f"the checkpoint in {checkpoint_dir} is from another run (it differs in {', '.join(differ)}): "
                             "resuming would continue other weights on this run. Use another checkpoint_dir, or "
                             "delete that one to start over")
        start_step, since_fired = state["step"], tensors["since_fired"].to(device)
        window.values = state["window"]
        reference = state.get("reference_loss", 0.0)  # the divergence check's yardstick, set in the first steps
        torch.set_rng_state(tensors["rng"])
    else:
        reference = 0.0
        sae.init_from_data(first)
        _broadcast(sae, world)
    del first

    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    bar = tqdm(total=total_steps, initial=start_step, disable=not progress or rank != 0, unit="step",
               desc=f"train {sae.architecture}")
    t0, step, step_seconds = time.perf_counter(), start_step, []
    saved_step = start_step if start_step else None
    batches = stream.iterate(start_step)
    try:
        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            x = next(batches).to(device, torch.float32, non_blocking=True)
            _check_batch(x, sae, step)
            x = x[rank::world]
            for group in optimizer.param_groups:
                group["lr"] = base_lr * lr_factor(step, total_steps, warmup_steps, decay_start)

            dead = since_fired >= dead_tokens
            sae.training_progress, sae.training_steps = step / total_steps, total_steps
            with amp:
                out = sae.training_forward(x, dead)
                terms = {name: coef * fn(out) for name, (coef, fn) in sae.loss_terms().items() if coef}
            loss = sum(terms.values())
            if not _finite_everywhere(loss, world):
                raise TrainingDiverged(f"the loss became non-finite at step {step} (on some process) with lr={base_lr:g}; "
                                       "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _all_reduce_grads(params, world)
            sae.before_optimizer_step()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            sae.after_optimizer_step(out)

            with torch.no_grad():
                loss_value = loss.item()
                if step < REFERENCE_STEPS:
                    reference = max(reference, loss_value)
                elif loss_value > DIVERGENCE_FACTOR * reference:
                    raise TrainingDiverged(
                        f"the loss exploded at step {step}: {loss_value:.3g}, over {DIVERGENCE_FACTOR:g} times the "
                        f"{reference:.3g} of the first steps, with lr={base_lr:g}; lower the learning rate")
                fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
                fired[out.codes.indices[out.codes.values != 0]] = True
                if world > 1:
                    fired_i = fired.int()
                    dist.all_reduce(fired_i, op=dist.ReduceOp.MAX)
                    fired = fired_i.bool()
                since_fired += batch_size
                since_fired[fired] = 0
                window.update(
                    loss=loss_value,
                    fvu=terms["fvu"].item() if "fvu" in terms else float("nan"),
                    l0=(out.codes.values != 0).sum(-1).float().mean().item(),
                    dead=(since_fired >= dead_tokens).float().mean().item(),
                )
                if step >= REFERENCE_STEPS and window.values["fvu"] > DIVERGED_FVU:
                    raise TrainingDiverged(
                        f"the reconstruction diverged by step {step}: running FVU {window.values['fvu']:.3g} (1 is "
                        f"the error of predicting the mean) with lr={base_lr:g}; lower the learning rate")
            step_seconds.append(time.perf_counter() - step_start)
            bar.update(1)
            if step % 10 == 0 or step == total_steps - 1:
                bar.set_postfix({k: f"{v:.4g}" for k, v in window.values.items()}, refresh=False)
            if checkpoint_steps and ((step + 1) % checkpoint_steps == 0 or step + 1 == total_steps):
                _save(checkpoint_dir, sae, optimizer, since_fired, step + 1, window, run_key, rank, reference)
                saved_step = step + 1
    except KeyboardInterrupt:
        if checkpoint_dir is not None:
            # the interrupted step may be half-applied; the last periodic checkpoint stays the resume point
            if saved_step:
                bar.write(f"interrupted at step {step}; rerun with checkpoint_dir={checkpoint_dir} to resume from "
                          f"step {saved_step}")
            else:
                bar.write(f"interrupted at step {step}, before the first checkpoint (due at step {checkpoint_steps}); "
                          "a rerun starts over")
        raise
    finally:
        bar.close()
        sae.training_progress = sae.training_steps = None
    elapsed = time.perf_counter() - t0
    sae.eval()
    figures = {
        **window.values,
        "steps": total_steps,
        "tokens": total_steps * batch_size,
        "lr": base_lr,
        "dead_fraction": (since_fired >= dead_tokens).float().mean().item(),
        "tokens_per_second": (total_steps - start_step) * batch_size / max(elapsed, 1e-9),
        "step_seconds_median": float(torch.tensor(step_seconds).median()) if step_seconds else float("nan"),
    }
    figures.pop("dead", None)
    sae.cfg.metadata.setdefault("training", {}).update(
        {"tokens": total_steps * batch_size, "batch_size": batch_size, "lr": base_lr, "seed": seed}
    )
    return TrainResult(sae, figures)


def _data_fingerprint(first: torch.Tensor) -> str:
    """The data, as far as a checkpoint can tell cheaply: its first batch (drawn the same on every rerun)."""
    return hashlib.sha256(first.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def _config_fingerprint(sae: SAE) -> str:
    config = {k: v for k, v in sae.cfg.to_dict().items() if k != "metadata"}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_batch(x: torch.Tensor, sae: SAE, step: int) -> None:
    if x.ndim != 2 or x.shape[-1] != sae.d_in:
        raise ValueError(f"batch {step} has shape {tuple(x.shape)}; the SAE expects (batch, {sae.d_in})")
    if not torch.isfinite(x).all():
        raise ValueError(f"batch {step} contains NaN or inf activations; clean the data before training")


def _save(directory, sae, optimizer, since_fired, step, window, run_key, rank, reference) -> None:
    if rank == 0:
        checkpoint.write(directory, sae, optimizer, {"since_fired": since_fired, "rng": torch.get_rng_state()},
                         {"step": step, "window": window.values, "run": run_key, "reference_loss": reference})
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(sae: SAE, world: int) -> None:
    if world > 1:
        for tensor in list(sae.parameters()) + list(sae.buffers()):
            dist.broadcast(tensor.data, src=0)


def _all_reduce_grads(params, world: int) -> None:
    """Average gradients over processes; a parameter without gradient on one rank joins with zeros."""
    if world > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def _finite_everywhere(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every process (all ranks then stop together, none hangs)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
