"""Harvesting on real tiny models: layouts, masks, chat templates, early stop, pipelines, training."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, GPT2Config, GPT2LMHeadModel
from transformers import T5Config, T5EncoderModel

import sae_guard
from sae_guard import SAE, harvest

TEXTS = [
    "the cat sat on the mat", "a dog ran in the park today", "hello", "the quick brown fox jumps over the lazy dog",
    "paint a red circle and a blue square", "i am fine thank you",
]


@pytest.fixture
def gpt2(word_tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(word_tokenizer), n_positions=64,
                        bos_token_id=word_tokenizer.bos_token_id, eos_token_id=word_tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


def _clip_text(clip_tokenizer, cls=CLIPTextModel):
    torch.manual_seed(0)
    return cls(CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=37,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77)).eval()


def _rows_fed(model):
    """Record the input_ids rows (and attention masks) of every forward call of `model`."""
    calls = []

    def record(_module, _args, kwargs):
        mask = kwargs.get("attention_mask")
        calls.append((kwargs["input_ids"].clone(), None if mask is None else mask.clone()))

    return calls, model.register_forward_pre_hook(record, with_kwargs=True)


def test_block_mode_concatenates_documents_into_fixed_rows(gpt2, word_tokenizer):
    eos = word_tokenizer.eos_token_id
    stream = [t for text in TEXTS for t in word_tokenizer(text).input_ids + [eos]]  # GPT-2 marks no end: EOS added
    calls, handle = _rows_fed(gpt2)
    acts = harvest(gpt2, "transformer.h.0", TEXTS, tokenizer=word_tokenizer, context_size=8, batch_size=2)
    chunks = list(acts.with_tokens())
    handle.remove()
    rows = [row[mask.bool()].tolist() for ids, mask in calls for row, mask in zip(ids, mask)]
    assert all(len(row) == 8 for row in rows[:-1]) and 0 < len(rows[-1]) <= 8
    assert sum(rows, []) == stream
    assert torch.cat([ids for _, ids in chunks]).tolist() == stream
    assert sum(a.shape[0] for a, _ in chunks) == len(stream) and acts.d_in == 32


def test_sequential_mode_gives_each_instance_its_own_row(gpt2, word_tokenizer):
    calls, handle = _rows_fed(gpt2)
    batched = harvest(gpt2, "transformer.h.1", TEXTS, tokenizer=word_tokenizer, mode="sequential", batch_size=4)
    acts = batched.to_tensor()
    handle.remove()
    expected = [word_tokenizer(text).input_ids for text in TEXTS]
    rows = [row[mask.bool()].tolist() for ids, mask in calls for row, mask in zip(ids, mask)]
    assert rows == expected  # one instance per row, never two
    padded = word_tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert acts.shape == (padded.attention_mask.sum().item(), 32)  # padding never emitted
    alone = harvest(gpt2, "transformer.h.1", TEXTS, tokenizer=word_tokenizer, mode="sequential", batch_size=1)
    torch.testing.assert_close(acts, alone.to_tensor(), atol=1e-5, rtol=1e-5)  # padding changed nothing


def test_harvest_matches_the_models_own_hidden_states(gpt2, word_tokenizer):
    """The harvested rows are output_hidden_states[1] (block 0's output) at the masked positions."""
    inputs = word_tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    acts = harvest(gpt2, "transformer.h.0", inputs, batch_size=2).to_tensor()
    with torch.no_grad():
        states = gpt2(**inputs, output_hidden_states=True).hidden_states[1]
    assert acts.shape[0] == inputs.attention_mask.sum()
    torch.testing.assert_close(acts, states[inputs.attention_mask.bool()], atol=1e-5, rtol=1e-5)


def test_chat_template_tokens_are_kept_in_sequential_mode(gpt2, word_tokenizer):
    conversations = [
        [{"role": "user", "content": "hello how are you"}, {"role": "assistant", "content": "i am fine"}],
        "paint a red circle",  # a plain string becomes one user turn
    ]
    acts = harvest(gpt2, "transformer.h.0", conversations, tokenizer=word_tokenizer, mode="sequential",
                   chat_template=True)
    ids = [row for _, row in acts.with_tokens()][0].tolist()
    rendered = [word_tokenizer.apply_chat_template(c if isinstance(c, list) else [{"role": "user", "content": c}],
                                                   tokenize=False) for c in conversations]
    expected = [t for text in rendered for t in word_tokenizer(text, add_special_tokens=False).input_ids]
    assert ids == expected
    start, end = word_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 3 and ids.count(end) == 3


def test_early_stop_skips_later_layers_and_restores_the_mode(gpt2, word_tokenizer):
    calls = {name: 0 for name in ["transformer.h.0", "transformer.h.1", "lm_head"]}
    modules = dict(gpt2.named_modules())
    for name in calls:
        modules[name].register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    gpt2.train()
    first = harvest(gpt2, "transformer.h.0", TEXTS, tokenizer=word_tokenizer, context_size=8, batch_size=2)
    once, twice = first.to_tensor(), first.to_tensor()
    assert calls["transformer.h.1"] == 0 and calls["lm_head"] == 0 and calls["transformer.h.0"] > 0
    assert torch.equal(once, twice)  # re-iterable and deterministic: eval mode, dropout off
    assert gpt2.training and all(m.training for m in gpt2.modules())
    assert first.to_tensor(max_tokens=5).shape == (5, 32)


def test_tuple_outputs_and_pretokenized_ids(word_tokenizer):
    """T5 blocks return tuples; rows given as a tensor are fed as they are, every position real."""
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(word_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4)).eval()
    ids = torch.randint(0, len(word_tokenizer), (3, 7), generator=torch.Generator().manual_seed(1))
    acts = harvest(t5, "encoder.block.0", ids, batch_size=2).to_tensor()
    seen = []
    handle = t5.encoder.block[0].register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        t5(ids)
    handle.remove()
    assert isinstance(seen[0], tuple)
    torch.testing.assert_close(acts, seen[0][0].reshape(-1, 32))


@pytest.mark.parametrize("cls", [CLIPTextModel, CLIPTextModelWithProjection])
def test_clip_text_models_under_both_spellings(clip_tokenizer, cls):
    model = _clip_text(clip_tokenizer, cls)
    prompts = ["a photo of an astronaut riding a horse", "a cat"]
    per_spelling = [harvest(model, name, prompts, tokenizer=clip_tokenizer, mode="sequential").to_tensor()
                    for name in ["encoder.layers.1", "text_model.encoder.layers.1"]]
    assert torch.equal(*per_spelling)
    assert per_spelling[0].shape[0] == sum(len(clip_tokenizer(p).input_ids) for p in prompts)
    dropped = harvest(model, "encoder.layers.1", prompts, tokenizer=clip_tokenizer, mode="sequential", drop_bos=True)
    ids = torch.cat([row for _, row in dropped.with_tokens()])
    assert clip_tokenizer.bos_token_id not in ids and ids.numel() == per_spelling[0].shape[0] - len(prompts)


def test_pipeline_text_encoder_is_harvested_as_the_pipeline_runs_it(tiny_sd_pipeline):
    """Prompts alone, padded to 77 with no mask; kept tokens run up to and including the first EOS."""
    pipe, prompts = tiny_sd_pipeline, ["a photo of a dog", "an oil painting of a lighthouse at night, trending"]
    acts = harvest(pipe, "text_encoder.encoder.layers.1", prompts, batch_size=2)
    assert acts.context_size == 77 and acts.mode == "sequential"
    harvested = acts.to_tensor()
    seen = []
    handle = pipe.text_encoder.encoder.layers[1].register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        for prompt in prompts:
            pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)
    handle.remove()
    lengths = [len(pipe.tokenizer(p).input_ids) for p in prompts]  # <|startoftext|> ... <|endoftext|>
    expected = torch.cat([out[0, :n] for out, n in zip(seen, lengths)])
    torch.testing.assert_close(harvested, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sequential"):
        harvest(pipe, "text_encoder.encoder.layers.1", prompts, mode="block")


def test_clear_errors(gpt2, word_tokenizer):
    with pytest.raises(ValueError, match="tokenizer"):
        harvest(gpt2, "transformer.h.0", TEXTS)
    with pytest.raises(ValueError, match="mode"):
        harvest(gpt2, "transformer.h.0", TEXTS, tokenizer=word_tokenizer, mode="packed")
    with pytest.raises(LookupError, match="transformer.h.\\[0-1\\]"):
        harvest(gpt2, "transformer.h.5", TEXTS, tokenizer=word_tokenizer)


def test_train_accepts_a_harvest(gpt2, word_tokenizer):
    acts = harvest(gpt2, "transformer.h.1", TEXTS * 4, tokenizer=word_tokenizer, context_size=16, batch_size=16,
                   buffer_size=256)
    sae = SAE.create("topk", d_in=acts.d_in, d_sae=64, k=4)
    before = sae.W_dec.detach().clone()
    trained, figures = sae_guard.train(sae, acts, tokens=1024, batch_size=64, progress=False)  # ~8 passes
    assert figures["steps"] == 16 and torch.isfinite(torch.tensor(figures["fvu"]))
    assert not torch.equal(trained.W_dec, before)
