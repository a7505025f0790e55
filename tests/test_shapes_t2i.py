"""The ShapesWorld text-to-image model: trains from scratch, saves a stock diffusers folder, resumes, draws colours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae_guard.shapes import COLOURS
from sae_guard.shapes.scorers import colours_present
from sae_guard.shapes.t2i import build_pipeline, build_scheduler, build_unet, build_vae, pipeline_dir
from sae_guard.shapes.t2i_eval import generate
from sae_guard.shapes.t2i_train import T2IConfig, caption_embeddings, train_decoder, train_t2i, train_unet
from sae_guard.shapes.world import ShapesWorld, to_tensor

TINY_UNET = {"block_out_channels": (8, 16), "attention_head_dim": 2}
TINY_VAE = {"block_out_channels": (8, 16), "latent_channels": 4}
TINY = T2IConfig(images=24, vae=TINY_VAE, vae_steps=2, vae_batch_size=4, decoder_steps=2, unet=TINY_UNET,
                 unet_steps=3, batch_size=4, warmup_steps=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pipeline trained for a few steps by the real training command."""
    return train_t2i(tmp_path_factory.mktemp("t2i") / "shapes-t2i", TINY)


def test_saved_folder_is_a_stock_pipeline_without_minilm_weights(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert not (trained / "text_encoder" / "model.safetensors").exists()
    assert not trained.with_name(trained.name + ".work").exists()
    unet_weights = load_file(str(trained / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(value.dtype == torch.float16 for value in unet_weights.values())
    folder = pipeline_dir(trained, cache=tmp_path)
    assert pipeline_dir(trained, cache=tmp_path) == folder  # made once
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.text_encoder.config.use_attention_mask
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.tokenizer.model_max_length == 32
    assert json.loads((trained / "training.json").read_text())["config"]["unet_steps"] == TINY.unet_steps

    images = generate(pipe, ["a red circle", "a blue star"], steps=2, guidance_scale=3.0, seed=5)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, generate(pipe, ["a red circle", "a blue star"], steps=2, seed=5))
    assert np.array_equal(images[1:], generate(pipe, ["a blue star"], steps=2, seed=6))  # seed + index, not batch
    assert not np.array_equal(images, generate(pipe, ["a red circle", "a blue star"], steps=2, seed=7))
    pil = pipe("a green square", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (32, 32)


def test_pipeline_dir_names_the_command_when_assets_are_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="sae_guard.shapes.t2i"):
        pipeline_dir(tmp_path / "nothing", cache=tmp_path)


def test_training_embeddings_are_what_the_pipeline_computes():
    pipe = build_pipeline(unet=TINY_UNET, vae=TINY_VAE)
    captions = ["a red star", "the square is blue", "a red star"]
    table, index, empty = caption_embeddings(pipe, captions)
    assert len(table) == 3 and index[0] == index[2]
    for caption, row in zip(captions + [""], [*index.tolist(), empty]):
        alone = pipe.encode_prompt(caption, "cpu", 1, False)[0][0]
        torch.testing.assert_close(table[row], alone, atol=1e-5, rtol=1e-5)


def test_decoder_finetune_keeps_the_latents(tmp_path):
    """Only the decoder moves, so latents the UNet was trained on stay valid."""
    torch.manual_seed(0)
    vae = build_vae(32, **TINY_VAE)
    images = to_tensor(ShapesWorld(two_shape_prob=0.0).sample(8, 0)[0])
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    losses = train_decoder(vae, images, T2IConfig(decoder_steps=2, vae_batch_size=4, warmup_steps=4), tmp_path / "d.pt")
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(torch.equal(encoder[k], v) for k, v in vae.encoder.state_dict().items())
    assert any(not torch.equal(decoder[k], v) for k, v in vae.decoder.state_dict().items())


def test_unet_training_resumes_from_its_checkpoint(tmp_path):
    """An interrupted run, rerun, ends with the weights of an uninterrupted one."""
    scheduler = build_scheduler()
    generator = torch.Generator().manual_seed(0)
    latents, table = torch.randn(16, 4, 8, 8, generator=generator), torch.randn(3, 32, 384, generator=generator)
    caption_index = torch.randint(1, 3, (16,), generator=generator)
    cfg = T2IConfig(unet=TINY_UNET, unet_steps=4, batch_size=4, warmup_steps=2, checkpoint_every=2)

    def fresh_unet():
        torch.manual_seed(0)
        return build_unet(8, 4, **TINY_UNET)

    straight, straight_losses = train_unet(fresh_unet(), scheduler, latents, table, caption_index, 0, cfg,
                                           tmp_path / "straight.pt")
    interrupted = fresh_unet()
    calls = []

    def interrupt_third_step(*_):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = interrupted.register_forward_pre_hook(interrupt_third_step)
    with pytest.raises(KeyboardInterrupt):
        train_unet(interrupted, scheduler, latents, table, caption_index, 0, cfg, tmp_path / "resumed.pt")
    handle.remove()
    resumed, resumed_losses = train_unet(fresh_unet(), scheduler, latents, table, caption_index, 0, cfg,
                                         tmp_path / "resumed.pt")
    assert resumed_losses == straight_losses
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_shipped_model_follows_colour_words():
    """The shipped pipeline at its defaults draws the named colour far above the 1-in-6 of ignoring the word."""
    from sae_guard.shapes.t2i import load_pipeline

    pipe = load_pipeline()
    named = [(colour, shape) for colour in COLOURS for shape in ("circle", "square")]
    images = generate(pipe, [f"a {colour} {shape}" for colour, shape in named], steps=20, guidance_scale=3.0)
    hits = [colour in colours_present(image) for (colour, _), image in zip(named, images)]
    assert sum(hits) >= 6, hits
