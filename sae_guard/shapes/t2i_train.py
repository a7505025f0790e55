"""Training the ShapesWorld text-to-image model from scratch: data, frozen text embeddings, VAE, UNet.

    train_t2i("sae_guard/assets/shapes-t2i")     # what `python -m sae_guard.shapes.t2i --out DIR` runs

1. Render `images` one-shape ShapesWorld images with their "train" captions.
2. Embed every distinct caption (and "" for classifier-free guidance) once, with the pipeline's own
   `encode_prompt`, so the UNet is trained on exactly the token states the pipeline computes at sampling time.
3. Train the AutoencoderKL (MSE + a small KL term), then fine-tune its decoder alone with shape pixels weighted
   up (a plain MSE leaves small shapes' hues off); encode every image to its latent mean and set the VAE's
   `scaling_factor` to 1 / std of those latents.
4. Train the UNet (v-prediction on the scheduler's noise schedule, captions dropped to "" with probability
   `drop_caption`), keeping an exponential moving average of its weights, which is what ships.

Every phase checkpoints into `<out>.work/` (tensors only, loaded with `weights_only=True`) and a rerun resumes
where it stopped. The result is written to a temporary folder and renamed to `out`: the pipeline without the
MiniLM weights, i.e. the contents of `sae_guard/assets/shapes-t2i/`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .t2i import UNET_SIZES, VAE_SIZES, build_pipeline
from .world import ShapesWorld, to_tensor


@dataclass
class T2IConfig:
    """Everything that decides the trained weights; saved beside them as `training.json`."""

    images: int = 20_000
    two_shape_prob: float = 0.0
    image_size: int = 32
    vae: dict = field(default_factory=lambda: dict(VAE_SIZES))
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 600
    foreground_weight: float = 10.0
    unet: dict = field(default_factory=lambda: dict(UNET_SIZES))
    unet_steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    drop_caption: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 100
    seed: int = 0


@torch.no_grad()
def caption_embeddings(pipe, captions: list[str], batch_size: int = 64) -> tuple[Tensor, Tensor, int]:
    """Embed the distinct captions and "" with `pipe.encode_prompt`: (table, index of each caption, index of "")."""
    distinct = sorted(set(captions) | {""})
    table = torch.cat([pipe.encode_prompt(distinct[i:i + batch_size], "cpu", 1, False)[0]
                       for i in tqdm(range(0, len(distinct), batch_size), desc="text embeddings")])
    position = {text: i for i, text in enumerate(distinct)}
    return table, torch.tensor([position[c] for c in captions]), position[""]


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _resume(path: Path, module, optimizer, generator: torch.Generator, **extra_modules) -> list[float]:
    """Restore a phase from its checkpoint, if there is one; returns the losses of the steps already taken."""
    if not path.is_file():
        return []
    state = torch.load(path, weights_only=True)
    module.load_state_dict(state["model"])
    for name, extra in extra_modules.items():
        extra.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["losses"].tolist()


def _save_phase(path: Path, module, optimizer, generator: torch.Generator, losses: list[float],
                **extra_modules) -> None:
    """Write a phase's checkpoint atomically (tensors only, so `_resume` loads it with `weights_only=True`)."""
    state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
             "losses": torch.tensor(losses), **{name: extra.state_dict() for name, extra in extra_modules.items()}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_vae(vae, images: Tensor, cfg: T2IConfig, checkpoint: Path) -> list[float]:
    """Fit the VAE to `images` ((n, 3, S, S) in [-1, 1]); returns the loss of every step."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = _resume(checkpoint, vae, optimizer, generator)
    vae.train()
    bar = tqdm(range(len(losses), cfg.vae_steps), initial=len(losses), total=cfg.vae_steps, desc="vae")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * _warmup_cosine(step, cfg.vae_steps, cfg.warmup_steps // 4)
        batch = images[torch.randint(len(images), (cfg.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            _save_phase(checkpoint, vae, optimizer, generator, losses)
    return losses


def foreground(images: Tensor, threshold: float = 0.1) -> Tensor:
    """(n, 1, S, S) 1.0 where a pixel differs from its image's background (per-channel median), else 0.0."""
    background = images.flatten(2).median(dim=2).values[:, :, None, None]
    return ((images - background).abs().amax(dim=1, keepdim=True) > threshold).float()


def train_decoder(vae, images: Tensor, cfg: T2IConfig, checkpoint: Path) -> list[float]:
    """Fine-tune the decoder alone on the frozen encoder's latent means, shape pixels weighted up.

    The shapes cover a few percent of an image, so a plain MSE leaves their hue off (red drawn orange); weighting
    them `1 + foreground_weight` fixes that, and a frozen encoder keeps the latents the UNet learns unchanged.
    """
    optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.vae_lr)
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    losses = _resume(checkpoint, vae.decoder, optimizer, generator)
    vae.train()
    bar = tqdm(range(len(losses), cfg.decoder_steps), initial=len(losses), total=cfg.decoder_steps, desc="decoder")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * _warmup_cosine(step, cfg.decoder_steps, cfg.warmup_steps // 4)
        batch = images[torch.randint(len(images), (cfg.vae_batch_size,), generator=generator)]
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.mean
        weight = 1.0 + cfg.foreground_weight * foreground(batch)
        loss = (weight * (vae.decode(latents).sample - batch).pow(2)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.decoder_steps:
            _save_phase(checkpoint, vae.decoder, optimizer, generator, losses)
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, images: Tensor, batch_size: int = 256) -> Tensor:
    """Latent means of `images`, scaled by 1 / their std, which is written into the VAE's `scaling_factor`."""
    vae.eval()
    latents = torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean
                         for i in range(0, len(images), batch_size)])
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    return latents * scale


def train_unet(unet, scheduler, latents: Tensor, table: Tensor, caption_index: Tensor, empty_index: int,
               cfg: T2IConfig, checkpoint: Path) -> tuple[torch.nn.Module, list[float]]:
    """v-prediction training with caption dropout; returns the EMA copy of the UNet and every step's loss.

    Noise is added by a DDPM scheduler built from `scheduler`'s config: the same betas whichever sampler ships.
    """
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(scheduler.config)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    losses = _resume(checkpoint, unet, optimizer, generator, ema=ema)
    unet.train()
    bar = tqdm(range(len(losses), cfg.unet_steps), initial=len(losses), total=cfg.unet_steps, desc="unet")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _warmup_cosine(step, cfg.unet_steps, cfg.warmup_steps)
        index = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(noise_schedule.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.drop_caption
        context = table[torch.where(dropped, empty_index, caption_index[index])]
        prediction = unet(noise_schedule.add_noise(clean, noise, timesteps), timesteps, context).sample
        loss = F.mse_loss(prediction, noise_schedule.get_velocity(clean, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, live in zip(ema.parameters(), unet.parameters()):
                average.lerp_(live, 1.0 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            _save_phase(checkpoint, unet, optimizer, generator, losses, ema=ema)
    return ema.eval(), losses


def train_t2i(out: str | Path, cfg: T2IConfig | None = None, threads: int | None = None) -> Path:
    """Train the whole pipeline from scratch (resuming from `<out>.work/`) and save it to `out` without the MiniLM
    weights. Returns `out`."""
    cfg = cfg or T2IConfig()
    out = Path(out)
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    pipe = build_pipeline(cfg.seed, cfg.image_size, unet=cfg.unet, vae=cfg.vae)
    world = ShapesWorld(image_size=cfg.image_size, two_shape_prob=cfg.two_shape_prob)
    pixels, _, captions = world.sample(cfg.images, cfg.seed)
    images = to_tensor(pixels)

    embeddings_file = work / "embeddings.safetensors"
    if embeddings_file.is_file():
        saved = load_file(str(embeddings_file))
        table, caption_index, empty_index = saved["table"], saved["caption_index"], int(saved["empty_index"])
    else:
        table, caption_index, empty_index = caption_embeddings(pipe, captions)
        save_file({"table": table.contiguous(), "caption_index": caption_index,
                   "empty_index": torch.tensor(empty_index)}, str(embeddings_file))

    vae_losses = train_vae(pipe.vae, images, cfg, work / "vae.pt")
    decoder_losses = train_decoder(pipe.vae, images, cfg, work / "decoder.pt")
    latents = encode_latents(pipe.vae, images)
    unet, unet_losses = train_unet(pipe.unet, pipe.scheduler, latents, table, caption_index, empty_index, cfg,
                                   work / "unet.pt")
    pipe.unet = unet
    seconds = time.perf_counter() - started

    training = {"config": dataclasses.asdict(cfg), "threads": torch.get_num_threads(),
                "seconds_this_run": round(seconds, 1), "distinct_captions": len(table),
                "vae_final_loss": sum(vae_losses[-50:]) / len(vae_losses[-50:]),
                "decoder_final_loss": sum(decoder_losses[-50:]) / len(decoder_losses[-50:]),
                "unet_final_loss": sum(unet_losses[-50:]) / len(unet_losses[-50:])}
    save_t2i(pipe, out, training)
    shutil.rmtree(work)
    return out


def save_t2i(pipe, out: Path, training: dict) -> None:
    """Write the pipeline to `out` atomically, UNet and VAE in fp16, without the MiniLM weights."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pipe.unet.half()
        pipe.vae.half()
        pipe.save_pretrained(staging)
        pipe.unet.float()
        pipe.vae.float()
        (staging / "text_encoder" / "model.safetensors").unlink()
        (staging / "training.json").write_text(json.dumps(training, indent=2) + "\n")
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
