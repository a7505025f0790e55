"""Hookpoints on real transformers/diffusers classes: both version spellings, every output form."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from transformers import (
    CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, GPT2Config, GPT2LMHeadModel,
    T5Config, T5EncoderModel,
)

from sae_guard.hooks import HookpointError, find_hookpoint, find_module, hidden_of, hook_hidden, with_hidden

TEXT_CONFIG = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _clip(cls=CLIPTextModel):
    torch.manual_seed(0)
    return cls(CLIPTextConfig(**TEXT_CONFIG)).eval()


def _t5():
    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()


def _ids(batch=2, length=6):
    return torch.randint(2, 99, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls", [CLIPTextModel, CLIPTextModelWithProjection])
def test_both_transformers_spellings_find_the_same_layer(cls):
    model = _clip(cls)
    canonical = dict(model.named_modules())
    layer = canonical.get("encoder.layers.1", canonical.get("text_model.encoder.layers.1"))
    assert layer is not None
    for name in ["encoder.layers.1", "text_model.encoder.layers.1", "layers.1"]:
        assert find_module(model, name) is layer


def test_unique_suffix_and_root():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    assert find_hookpoint(gpt2, "h.1").name == "transformer.h.1"
    assert find_module(gpt2, "transformer.h.1.mlp") is gpt2.transformer.h[1].mlp
    assert find_module(gpt2, "") is gpt2


def test_ambiguous_name_is_refused():
    clip = CLIPModel(CLIPConfig(text_config=TEXT_CONFIG, vision_config=dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8)))
    with pytest.raises(HookpointError, match="ambiguous.*text_model.encoder.layers.0.*vision_model"):
        find_module(clip, "encoder.layers.0")
    assert find_module(clip, "vision_model.encoder.layers.0") is clip.vision_model.encoder.layers[0]


def test_missing_hookpoint_lists_close_names_and_layer_containers():
    with pytest.raises(HookpointError) as error:
        find_module(_clip(), "encoder.layer.2")
    message = str(error.value)
    assert "'encoder.layers.2'" in message  # difflib's close match
    assert "encoder.layers.[0-2]" in message


def test_pipeline_hookpoints_start_with_the_component(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    for name in ["text_encoder.encoder.layers.1", "text_encoder.text_model.encoder.layers.1"]:
        hookpoint = find_hookpoint(pipe, name)
        assert hookpoint.module is pipe.text_encoder.encoder.layers[1]
        assert hookpoint.model is pipe.text_encoder and hookpoint.component == "text_encoder"
        assert hookpoint.name == "text_encoder.encoder.layers.1"
    assert find_hookpoint(pipe, "unet").module is pipe.unet
    with pytest.raises(HookpointError, match="text_encoder.*unet.*vae"):
        find_hookpoint(pipe, "text_encoder_2.encoder.layers.1")
    with pytest.raises(HookpointError, match="text_encoder.encoder.layers.\\[0-2\\]"):
        find_hookpoint(pipe, "text_encoder.encoder.layers.7")


def test_hidden_of_and_with_hidden_keep_the_structure():
    hidden, extra, new = torch.zeros(2, 3), torch.ones(1), torch.full((2, 3), 5.0)
    Pair = namedtuple("Pair", "hidden extra")
    for output in [hidden, (hidden, extra), [hidden, extra], Pair(hidden, extra)]:
        assert hidden_of(output) is hidden
        replaced = with_hidden(output, new)
        assert type(replaced) is type(output) and hidden_of(replaced) is new
        if not isinstance(output, torch.Tensor):
            assert replaced[1] is extra
    with pytest.raises(TypeError, match="hidden-state"):
        hidden_of((None, hidden))


def test_tuple_output_edit_reaches_the_model_output():
    """T5 blocks return (hidden, position_bias, ...): the edit replaces element 0 and keeps the rest."""
    model, ids = _t5(), _ids()
    block = find_module(model, "encoder.block.1")
    outputs = []
    block.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    plain = model(ids).last_hidden_state
    handle = hook_hidden(block, lambda h: h * 0)
    edited = model(ids).last_hidden_state
    handle.remove()
    assert isinstance(outputs[0], tuple) and len(outputs[1]) == len(outputs[0])
    assert torch.equal(outputs[1][0], torch.zeros_like(outputs[0][0]))
    assert all(a is None or torch.equal(a, b) for a, b in zip(outputs[0][1:], outputs[1][1:]))
    assert not torch.allclose(plain, edited)
    assert torch.equal(model(ids).last_hidden_state, plain)  # removed: the model is back


def test_model_output_edit_keeps_the_other_fields():
    model, ids = _clip(CLIPTextModelWithProjection), _ids()
    plain = model.text_model(ids)
    handle = hook_hidden(model.text_model, lambda h: h + 1)
    edited = model.text_model(ids)
    handle.remove()
    assert type(edited) is type(plain)
    assert torch.allclose(edited.last_hidden_state, plain.last_hidden_state + 1)
    assert torch.equal(edited.pooler_output, plain.pooler_output)


def test_returning_none_leaves_the_output_bit_identical():
    model, ids = _clip(), _ids()
    plain = model(ids).last_hidden_state
    seen = []
    handle = hook_hidden(find_module(model, "encoder.layers.0"), lambda h: seen.append(h.shape))
    assert torch.equal(model(ids).last_hidden_state, plain) and seen == [torch.Size([2, 6, 32])]
    handle.remove()


def test_prepended_edit_is_seen_by_recorded_hidden_states():
    """transformers 5 records output_hidden_states with hooks installed on the first call; ours runs first."""
    model, ids = _clip(), _ids()
    before = model(ids, output_hidden_states=True).hidden_states  # installs the recording hooks
    handle = hook_hidden(find_module(model, "encoder.layers.1"), lambda h: h + 3)
    after = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    assert torch.allclose(after[2], before[2] + 3)  # hidden_states[i + 1] is the output of layer i
    assert torch.equal(after[1], before[1])
