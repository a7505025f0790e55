"""Guarding real diffusers pipelines (SD, SDXL, SD3, Flux) built from tiny random components.

The text encoders are shared between pipelines (one CLIP-32, one CLIP-48 with projection, one T5-64)
so each SAE is trained once; every test detaches its guard before the next one runs.
"""

import inspect

import numpy as np
import pytest
import torch

import sae_guard
from sae_guard import SAE, Concept, guard
from sae_guard.adapters.diffusers import PipelineGuard
from sae_guard.hooks import find_module

ANIMALS = ["dog", "cat", "horse", "lion", "tiger", "bird", "fish", "cow", "sheep", "goat", "duck", "bear"]
PLACES = ["in a field", "at the beach", "on a hill", "in the snow", "near a river", "in a city street",
          "under a tree", "at night", "in the rain", "on a farm", "in a zoo", "by the sea"]
TEMPLATES = ["a photo of a {} {}", "a {} {}", "a painting of a {} {}"]
TARGET = [t.format("zebra", p) for t in TEMPLATES for p in PLACES]
RETAIN = [t.format(animal, PLACES[(i + j) % len(PLACES)])
          for t in TEMPLATES for i, animal in enumerate(ANIMALS) for j in range(3)]
FLAGGED, CLEAN = "a zebra in the snow", "a photo of a dog at night"
CLIP32, CLIP48, T5 = "text_encoder.encoder.layers.2", "text_encoder_2.text_model.encoder.layers.2", \
    "text_encoder_2.encoder.block.2"


def concept():
    return Concept("zebra", target=TARGET, retain=RETAIN)


# ---------------------------------------------------------------------- tiny pipelines
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoders(clip_tokenizer, t5_tokenizer):
    """No word means anything to a random encoder: CLIP's "zebra" embedding is scaled up so the word stands
    out in its hidden states, as a concept word does in a trained one (T5's embeddings are large already)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = lambda width, layers, **kw: CLIPTextConfig(  # noqa: E731
        vocab_size=len(clip_tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, **kw)
    built = {
        "clip32": CLIPTextModel(clip(32, 4)).eval(),
        "clip48": CLIPTextModelWithProjection(clip(48, 4, projection_dim=16)).eval(),
        "clip16": CLIPTextModelWithProjection(clip(16, 2, projection_dim=16)).eval(),
        "t5": T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=16, d_ff=37, num_layers=3,
                                      num_heads=4, relative_attention_num_buckets=8)).eval(),
    }
    zebra = clip_tokenizer("zebra", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for name in ("clip32", "clip48", "clip16"):
            built[name].get_input_embeddings().weight[zebra] *= 30
    return built


def tiny_vae(latent_channels: int, **scaling):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, **scaling)


def tiny_unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=2, **extra)


@pytest.fixture(scope="module")
def pipes(encoders, clip_tokenizer, t5_tokenizer):
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, StableDiffusionXLPipeline)

    torch.manual_seed(0)
    flow_vae = {"shift_factor": 0.0609, "scaling_factor": 1.5035}
    built = {
        "sd": StableDiffusionPipeline(
            vae=tiny_vae(4), text_encoder=encoders["clip32"], tokenizer=clip_tokenizer, unet=tiny_unet(32),
            scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False),
        "sdxl": StableDiffusionXLPipeline(
            vae=tiny_vae(4), text_encoder=encoders["clip32"], text_encoder_2=encoders["clip48"],
            tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer, scheduler=EulerDiscreteScheduler(),
            unet=tiny_unet(32 + 48, addition_embed_type="text_time", addition_time_embed_dim=4,
                           projection_class_embeddings_input_dim=6 * 4 + 16), add_watermarker=False),
        "sd3": StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                              attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                              joint_attention_dim=64, pooled_projection_dim=32, out_channels=4),
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(4, **flow_vae),
            text_encoder=encoders["clip48"], tokenizer=clip_tokenizer, text_encoder_2=encoders["clip16"],
            tokenizer_2=clip_tokenizer, text_encoder_3=encoders["t5"], tokenizer_3=t5_tokenizer),
        "flux": FluxPipeline(
            transformer=FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                               pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(1, **flow_vae), text_encoder=encoders["clip32"],
            tokenizer=clip_tokenizer, text_encoder_2=encoders["t5"], tokenizer_2=t5_tokenizer),
    }
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


@pytest.fixture(scope="module")
def saes(pipes):
    """Tiny TopK SAEs: 50k training tokens replayed from ~1,300 activations harvested as each pipeline encodes.

    Learning rate and dead window are pinned (the 1/sqrt(d_sae) rate, a tenth of the run) so the concepts fitted
    here do not move with the library's defaults: at the narrow-input default (1.28e-2 for these widths) the Flux
    guard's edit of the flagged prompt changes its image by less than np.allclose resolves."""
    trained = {}
    for name, pipe, hookpoint, width in [("clip32", pipes["sd"], CLIP32, 32), ("clip48", pipes["sdxl"], CLIP48, 48),
                                         ("t5", pipes["flux"], T5, 64)]:
        torch.manual_seed(0)
        acts = sae_guard.harvest(pipe, hookpoint, TARGET + RETAIN, context_size=64 if name == "t5" else None)
        sae = SAE.create("topk", d_in=width, d_sae=256, k=8, dead_tokens=5_000)
        trained[name] = sae_guard.train(sae, acts.to_tensor(), tokens=50_000, batch_size=512, lr=1.6e-3,
                                        progress=False)[0].eval()
    return trained


# What each pipeline is guarded with and how it is called.
CASES = {
    "sd": {"sae": lambda s: s["clip32"], "call": {"output_type": "np"}},
    "sdxl": {"sae": lambda s: {CLIP32: s["clip32"], CLIP48: s["clip48"]}, "call": {"output_type": "np"}},
    "sd3": {"sae": lambda s: {"text_encoder.encoder.layers.2": s["clip48"], "text_encoder_3.encoder.block.2": s["t5"]},
            "call": {"output_type": "latent", "height": 8, "width": 8}},
    "flux": {"sae": lambda s: s["t5"], "call": {"output_type": "np", "height": 8, "width": 8, "true_cfg_scale": 2.0}},
}


@torch.no_grad()  # as pipelines encode: grad mode picks other attention kernels (last-bit differences)
def encode(kind, pipe, prompt, negative_prompt=None):
    """`encode_prompt`'s embeddings by their pipeline-call keyword (the negatives only where given)."""
    if kind == "flux":  # no negative here: Flux encodes it in a second encode_prompt call
        embeds, pooled, _ = pipe.encode_prompt(prompt, None)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    cfg = {"do_classifier_free_guidance": negative_prompt is not None, "negative_prompt": negative_prompt}
    if kind == "sd":
        names, outputs = ["prompt_embeds", "negative_prompt_embeds"], pipe.encode_prompt(prompt, "cpu", 1, **cfg)
    else:
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        outputs = pipe.encode_prompt(prompt, *((None, None) if kind == "sd3" else ()), **cfg)
    return {name: value for name, value in zip(names, outputs) if value is not None}


def positive(embeds):
    return {name: value for name, value in embeds.items() if not name.startswith("negative")}


@pytest.fixture(scope="module")
def guarded(pipes, saes):
    """make(kind) -> a guard on that pipeline; concepts are fitted once per pipeline, then reused."""
    fitted = {}

    def make(kind):
        pipe, sae = pipes[kind], CASES[kind]["sae"](saes)
        if kind not in fitted:
            with guard(pipe, sae=sae, concepts=[concept()]) as g:  # fits the concept at every gate
                fitted[kind] = {gate.hookpoint.name: policy.concepts for gate, policy in zip(g.gates, g.policies)}
        return guard(pipe, sae=sae, concepts=fitted[kind])

    return make


def run(kind, pipe, prompt=None, **kwargs):
    call = {**CASES[kind]["call"], "num_inference_steps": 2, "generator": torch.Generator().manual_seed(0)}
    if kind == "flux" and kwargs.get("negative_prompt") is None:
        call.pop("true_cfg_scale")
    out = pipe(prompt, **call, **kwargs)
    return out, np.asarray(out.images)


def hooks_of(pipe):
    return {(component, name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
            for component, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for name, m in module.named_modules()}


# ---------------------------------------------------------------------- every pipeline
@pytest.mark.parametrize("kind", list(CASES))
def test_guarded_pipeline_keeps_its_call_and_edits_only_flagged_prompts(kind, pipes, guarded):
    pipe = pipes[kind]
    cls, signature, encode_signature = type(pipe), inspect.signature(pipe.__call__), \
        inspect.signature(pipe.encode_prompt)
    plain_out, plain_clean = run(kind, pipe, CLEAN)
    plain_flagged = run(kind, pipe, FLAGGED)[1]
    attributes, hooks = set(vars(pipe)), hooks_of(pipe)

    with guarded(kind) as g:
        assert isinstance(g, PipelineGuard) and isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
        assert inspect.signature(pipe.__call__) == signature
        assert inspect.signature(pipe.encode_prompt) == encode_signature
        out, clean = run(kind, pipe, CLEAN)
        assert type(out) is type(plain_out)
        assert [v.flagged for v in g.last_verdicts] == [False]
        assert np.array_equal(clean, plain_clean)  # not flagged: bit-identical
        flagged = run(kind, pipe, FLAGGED)[1]
        verdict = g.last_verdicts[0]
        assert verdict.flagged and verdict.concepts == ["zebra"] and verdict.action == "deactivate"
        assert not np.allclose(flagged, plain_flagged)

    assert type(pipe) is cls and set(vars(pipe)) == attributes and hooks_of(pipe) == hooks
    assert np.array_equal(run(kind, pipe, FLAGGED)[1], plain_flagged)


@pytest.mark.parametrize("kind", list(CASES))
def test_negative_prompt_with_the_concept_passes_untouched(kind, pipes, guarded):
    pipe = pipes[kind]
    plain_embeds = encode(kind, pipe, FLAGGED, negative_prompt=FLAGGED)
    plain_clean = run(kind, pipe, CLEAN, negative_prompt=FLAGGED)[1]
    plain_precomputed = run(kind, pipe, **positive(plain_embeds), negative_prompt=FLAGGED)[1]
    with guarded(kind) as g:
        # the concept in both prompts of one encode_prompt: the positive is edited, the negative is not
        embeds = encode(kind, pipe, FLAGGED, negative_prompt=FLAGGED)
        assert [v.flagged for v in g.last_verdicts] == [True]
        assert not torch.equal(embeds["prompt_embeds"], plain_embeds["prompt_embeds"])
        negatives = [name for name in embeds if name.startswith("negative")]
        assert all(torch.equal(embeds[name], plain_embeds[name]) for name in negatives)
        # a clean prompt with the concept in its negative: nothing changes, only the positive is judged
        assert np.array_equal(run(kind, pipe, CLEAN, negative_prompt=FLAGGED)[1], plain_clean)
        assert [v.flagged for v in g.last_verdicts] == [False]
        # precomputed positive embeddings: no positive text, so the negative must not be armed either
        assert np.array_equal(run(kind, pipe, **positive(plain_embeds), negative_prompt=FLAGGED)[1], plain_precomputed)
        assert g.last_verdicts == []
        # both flagged in a pipeline call: the guarded positive with the untouched negative
        both = run(kind, pipe, FLAGGED, negative_prompt=FLAGGED)[1]
    assert np.array_equal(both, run(kind, pipe, **positive(embeds), negative_prompt=FLAGGED)[1])


@pytest.mark.parametrize("kind", list(CASES))
def test_one_verdict_per_prompt_and_classify_agrees(kind, pipes, guarded):
    pipe = pipes[kind]
    with guarded(kind) as g:
        out = run(kind, pipe, [FLAGGED, CLEAN], num_images_per_prompt=2)[0]
        assert len(out.images) == 4
        verdicts = g.last_verdicts
        assert [v.flagged for v in verdicts] == [True, False]
        classified = g.classify([FLAGGED, CLEAN])
        assert [v.flagged for v in classified] == [True, False]
        for seen, alone in zip(verdicts, classified):  # classify encodes exactly as the pipeline does
            assert alone.scores["zebra"] == pytest.approx(seen.scores["zebra"], rel=1e-5, abs=1e-6)
            assert alone.action == ("flag" if alone.flagged else "pass")


# ---------------------------------------------------------------------- layout specifics
def test_sdxl_edit_reaches_the_recorded_penultimate_hidden_state(pipes, saes):
    """SDXL reads hidden_states[-2]: with 4 layers that is layer 2's output, recorded by transformers 5's
    own hooks, which must see the gate's edit."""
    pipe = pipes["sdxl"]
    encode = lambda p: pipe.encode_prompt(p, device="cpu", do_classifier_free_guidance=False)  # noqa: E731
    plain, _, plain_pooled, _ = encode(FLAGGED)
    plain_clean = encode(CLEAN)
    with guard(pipe, sae={CLIP48: saes["clip48"]}, concepts=[concept()]) as g:
        embeds, _, pooled, _ = encode(FLAGGED)
        assert g.last_verdicts[0].flagged
        clean = encode(CLEAN)
    assert torch.equal(embeds[..., :32], plain[..., :32])  # text_encoder is not guarded here
    assert not torch.allclose(embeds[..., 32:], plain[..., 32:])  # text_encoder_2's part carries the edit
    assert not torch.allclose(pooled, plain_pooled)
    assert all(torch.equal(a, b) for a, b in zip(clean, plain_clean) if a is not None)


def test_concept_on_both_encoders_is_fitted_per_gate_and_merged(pipes, saes):
    pipe, shared = pipes["sdxl"], concept()
    with guard(pipe, sae={CLIP32: saes["clip32"], CLIP48: saes["clip48"]}, concepts=[shared]) as g:
        first, second = (policy.concepts[0] for policy in g.policies)
        assert first is not second and first.fitted and second.fitted and not shared.fitted
        pipe.encode_prompt([FLAGGED, CLEAN], device="cpu", do_classifier_free_guidance=False)
        merged = g.last_verdicts
        assert [v.flagged for v in merged] == [True, False] and merged[0].concepts == ["zebra"]
        with pytest.raises(ValueError, match="belong to one SAE"):
            guard(pipe, sae={CLIP32: saes["clip32"], CLIP48: saes["clip48"]}, concepts=[first])


def test_t5_gates_see_the_pipeline_layout(pipes, guarded, t5_tokenizer):
    """T5 is called without an attention mask on prompts padded to max_sequence_length: the gate scores
    the tokens up to the first </s>, and fitting and classify pad to the pipeline's default length."""
    with guarded("sd3") as sd3:
        assert [t.model_max_length for t in sd3.tokenizers] == [77, 256]
    with guarded("flux") as flux:
        (gate, tokenizer), = zip(flux.gates, flux.tokenizers)
        assert gate.hookpoint.name == T5  # default hookpoint: the encoder as wide as the SAE, 2/3 up
        ids = tokenizer([FLAGGED, ""])["input_ids"]
        assert ids.shape == (2, 512) and set(tokenizer([FLAGGED])) == {"input_ids"}
        n_real = len(t5_tokenizer(FLAGGED)["input_ids"])
        assert gate.mask_fn((ids,), {}).sum(-1).tolist() == [n_real - 1, 0]  # content tokens: not </s>
        run("flux", pipes["flux"], FLAGGED)
        tokens = flux.last_verdicts[0].tokens["zebra"]
        assert tokens and max(tokens) < n_real


def test_hookpoints_default_spellings_and_errors(pipes, saes):
    pipe = pipes["sd"]
    hooks = hooks_of(pipe)
    with guard(pipe, sae=saes["clip32"], concepts=[concept()]) as g:
        assert g.gates[0].hookpoint.name == CLIP32  # 2/3 up a 4-layer CLIP; ItD's layer 8 of 12
        fitted = g.concepts
    v4_spelling = "text_encoder.text_model.encoder.layers.2"  # transformers 4 kept CLIPTextModel.text_model
    with guard(pipe, sae=saes["clip32"], concepts=fitted, hookpoint=v4_spelling) as g:
        assert g.gates[0].hookpoint.module is find_module(pipe, CLIP32)
        runs = []
        after = find_module(pipe, "text_encoder.encoder.layers.3").register_forward_hook(lambda *_: runs.append(1))
        try:
            assert [v.flagged for v in g.classify([FLAGGED, CLEAN])] == [True, False]
        finally:
            after.remove()
        assert not runs  # classify stops at the hookpoint
    with pytest.raises(ValueError, match="no text encoder .* has the SAE's width d_in=48"):
        guard(pipe, sae=saes["clip48"], concepts=[concept()])
    with pytest.raises(ValueError, match="pipeline gates sit on text encoders"):
        guard(pipe, sae=saes["clip32"], concepts=[concept()], hookpoint="unet.down_blocks.1")
    with pytest.raises(ValueError, match="not both"):
        sae_guard.adapters.diffusers.guard_pipeline(pipe, sae={CLIP32: saes["clip32"]}, concepts=[concept()],
                                                    hookpoint=CLIP32)
    assert hooks_of(pipe) == hooks and type(pipe).__name__ == "StableDiffusionPipeline"


def test_stacked_guards_detach_in_reverse_order(pipes, guarded):
    pipe = pipes["sd"]
    cls, attributes, hooks = type(pipe), set(vars(pipe)), hooks_of(pipe)
    outer, inner = guarded("sd"), guarded("sd")
    with pytest.raises(RuntimeError, match="detach it first"):
        outer.detach()
    run("sd", pipe, FLAGGED)
    assert inner.last_verdicts[0].flagged  # the newest gate runs first (prepend) and removes the concept ...
    assert outer.last_verdicts[0].scores["zebra"] < inner.last_verdicts[0].scores["zebra"]  # ... before the outer
    inner.detach()
    outer.detach()
    assert type(pipe) is cls and set(vars(pipe)) == attributes and hooks_of(pipe) == hooks


def test_an_encode_prompt_overridden_on_the_instance_is_refused(pipes, guarded):
    pipe = pipes["sd"]
    hooks = hooks_of(pipe)
    pipe.encode_prompt = type(pipe).encode_prompt.__get__(pipe)  # e.g. a prompt-weighting patch
    try:
        with pytest.raises(TypeError, match="encode_prompt overridden on the instance"):
            guarded("sd")
        assert hooks_of(pipe) == hooks
    finally:
        del pipe.encode_prompt
    with guarded("sd"):
        pipe.encode_prompt = type(pipe).encode_prompt.__get__(pipe)  # patched after guarding
        try:
            with pytest.raises(TypeError, match="overridden on the instance"):
                run("sd", pipe, FLAGGED, negative_prompt=FLAGGED)
        finally:
            del pipe.encode_prompt
