"""Guarding causal LMs (tiny random GPT-2, Llama and Gemma): sites, scopes, generate-time gating, verdicts."""

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import sae_guard
from sae_guard import SAE, Concept
from sae_guard.adapters import lm
from sae_guard.hooks.capture import capture_hidden
from sae_guard.hooks.hookpoints import find_hookpoint, split_heads

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = [f"the zebra runs across the field number {i}" for i in range(12)]
RETAIN = [f"the dog sleeps in the house number {i}" for i in range(12)]


def tiny(family, vocab):
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64))
    else:
        model = GemmaForCausalLM(GemmaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                             head_dim=8, max_position_embeddings=64))
    return model.eval()


FAMILIES = ["gpt2", "llama", "gemma"]


def prompt_batch(tokenizer, texts, device="cpu"):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_resolve_and_attn_z_is_heads_times_d_head(family, word_tokenizer):
    model = tiny(family, len(word_tokenizer))
    batch = prompt_batch(word_tokenizer, ["the zebra runs"])
    for site in (lm.residual(model, 1), lm.mlp_out(model, 1), lm.attn_z(model, 1)):
        hidden = capture_hidden(find_hookpoint(model, site), **batch)
        assert hidden.shape[:2] == batch["input_ids"].shape
    z = capture_hidden(find_hookpoint(model, lm.attn_z(model, 1)), **batch)
    heads = split_heads(z, lm.n_heads(model))
    assert heads.shape[-2] == 4 and heads.shape[-1] * 4 == z.shape[-1]
    with pytest.raises(ValueError, match="3 heads do not divide"):
        split_heads(torch.zeros(1, 2, 32), 3)
    with pytest.raises(ValueError, match="out of range"):
        lm.residual(model, 7)


def test_input_site_edits_reach_the_output(word_tokenizer):
    """A gate on `o_proj:input` changes the logits: the edit goes in before the projection."""
    model = tiny("llama", len(word_tokenizer))
    point = find_hookpoint(model, lm.attn_z(model, 0))
    batch = prompt_batch(word_tokenizer, ["the zebra runs"])
    plain = model(**batch).logits
    handle = sae_guard.hooks.hookpoints.hook_site(point, lambda h: torch.zeros_like(h))
    try:
        zeroed = model(**batch).logits
    finally:
        handle.remove()
    assert not torch.equal(plain, zeroed)
    assert torch.equal(model(**batch).logits, plain)


def _guard(model, tokenizer, scope="all", site=None, threshold=1.0, **options):
    site = site or lm.residual(model, 1)
    width = capture_hidden(find_hookpoint(model, site), **prompt_batch(tokenizer, ["the"])).shape[-1]
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=width, d_sae=128, k=8)
    # a fitted concept over every latent: each test sets the threshold that makes it flag all or nothing
    concept = Concept("zebra", features=torch.arange(128), threshold=threshold)
    return lm.guard_lm(model, sae=sae, concepts=[concept], tokenizer=tokenizer, hookpoint=site, scope=scope, **options)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sample", [False, True])
def test_unflagged_generation_is_token_identical_and_detach_is_exact(family, sample, word_tokenizer):
    model = tiny(family, len(word_tokenizer))
    batch = prompt_batch(word_tokenizer, ["the dog sleeps in the house", "the cat sleeps"])
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=sample, pad_token_id=word_tokenizer.pad_token_id)
    torch.manual_seed(1)
    plain = model.generate(**batch, **kwargs)
    g = _guard(model, word_tokenizer, threshold=1e30)  # a threshold no score reaches: nothing flagged
    torch.manual_seed(1)
    guarded = model.generate(**batch, **kwargs)
    assert torch.equal(plain, guarded)
    verdicts = g.request_verdicts
    assert len(verdicts) == 2 and all(v.prompt is not None and v.response is not None for v in verdicts)
    assert [v.text() for v in verdicts] == ["safe", "safe"]
    g.detach()
    torch.manual_seed(1)
    assert torch.equal(model.generate(**batch, **kwargs), plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_flagged_prompt_is_edited_in_prefill_and_decode(family, word_tokenizer):
    model = tiny(family, len(word_tokenizer))
    batch = prompt_batch(word_tokenizer, ["the zebra runs across the field"])
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=word_tokenizer.pad_token_id)
    plain_logits = model(**batch).logits
    # everything flags (a random model may generate special tokens: let them score too)
    g = _guard(model, word_tokenizer, threshold=1e-6, score_boilerplate=True)
    out = model.generate(**batch, **kwargs, output_scores=True, return_dict_in_generate=True)
    verdict = g.request_verdicts[0]
    assert verdict.prompt.flagged and verdict.response.flagged
    assert verdict.text("prompt") == "unsafe\nzebra"
    assert not torch.allclose(model(**batch).logits, plain_logits)
    g.detach()
    assert torch.equal(model(**batch).logits, plain_logits)
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 5


def test_scopes_pick_prompt_or_response_tokens(word_tokenizer):
    model = tiny("llama", len(word_tokenizer))
    batch = prompt_batch(word_tokenizer, ["the zebra runs across the field"])
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=word_tokenizer.pad_token_id)
    plain = model.generate(**batch, **kwargs)
    for scope, prompt_flag, response_flag in [("prompt", True, False), ("response", False, True)]:
        g = _guard(model, word_tokenizer, scope=scope, threshold=1e-6, score_boilerplate=True)
        model.generate(**batch, **kwargs)
        verdict = g.request_verdicts[0]
        assert verdict.prompt.flagged is prompt_flag and verdict.response.flagged is response_flag
        g.detach()
    assert torch.equal(model.generate(**batch, **kwargs), plain)


def test_special_tokens_never_score(word_tokenizer):
    scope = lm.TokenScope(word_tokenizer)
    chat = [{"role": "user", "content": "the zebra runs"}]
    ids = word_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    mask = scope((), {"input_ids": ids})
    special = torch.isin(ids, torch.tensor(word_tokenizer.all_special_ids))
    assert special.any() and not mask[special].any() and mask[~special].any()
    assert lm.TokenScope(word_tokenizer, score_boilerplate=True)((), {"input_ids": ids}).all()
    with pytest.raises(ValueError, match="scope must be one of"):
        lm.TokenScope(word_tokenizer, scope="everything")


def test_not_a_causal_lm_is_refused(word_tokenizer):
    with pytest.raises(TypeError, match="causal LM"):
        lm.guard_lm(torch.nn.Linear(2, 2), sae=None, concepts=[Concept("x")], tokenizer=word_tokenizer)
    model = tiny("gpt2", len(word_tokenizer))
    assert type(sae_guard.adapters.registry.adapter_for(model, tokenizer=word_tokenizer)).__name__ == "LMAdapter"


def test_ce_loss_recovered_definition():
    from sae_guard.sae.metrics import ce_loss_recovered, kl_divergence

    assert ce_loss_recovered(clean=2.0, spliced=2.0, ablated=6.0) == 1.0
    assert ce_loss_recovered(clean=2.0, spliced=4.0, ablated=6.0) == 0.5
    logits = torch.randn(3, 10)
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(3), atol=1e-6)
    assert (kl_divergence(logits, torch.randn(3, 10)) > 0).all()


def test_splice_eval_matches_the_models_own_loss(word_tokenizer):
    model = tiny("llama", len(word_tokenizer))
    site = lm.residual(model, 1)
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=32, d_sae=128, k=8)
    text = "the zebra runs across the field"
    figures = lm.splice_eval(model, word_tokenizer, sae, site, [text, "the dog sleeps"])
    single = lm.splice_eval(model, word_tokenizer, sae, site, [text])
    ids = word_tokenizer(text, return_tensors="pt")["input_ids"]
    assert single["ce_clean"] == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-4)
    assert figures["kl"] > 0 and figures["l0"] == pytest.approx(8.0) and figures["fvu"] > 0
    assert figures["ce_ablated"] != figures["ce_clean"]
    with pytest.raises(ValueError, match="non-empty text"):
        lm.splice_eval(model, word_tokenizer, sae, site, ["  "])


def test_eval_command_on_a_local_model(tmp_path, word_tokenizer, capsys):
    import json

    from sae_guard.cli import main

    model = tiny("gpt2", len(word_tokenizer))
    model.save_pretrained(tmp_path / "lm")
    word_tokenizer.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=32, d_sae=64, k=4, metadata={"hookpoint": lm.attn_z(model, 1)})
    sae.save(tmp_path / "sae")
    texts = tmp_path / "held_out.txt"
    texts.write_text("the zebra runs across the field\n\nthe dog sleeps in the house\n")
    assert main(["eval", "--sae", str(tmp_path / "sae"), "--model", str(tmp_path / "lm"), "--texts", str(texts),
                 "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["hookpoint"].endswith("attn.c_proj:input") and figures["texts"] == 2
    assert figures["l0"] == pytest.approx(4.0) and figures["kl"] > 0
    assert main(["eval", "--sae", str(tmp_path / "sae"), "--model", str(tmp_path / "lm"), "--texts", str(texts),
                 "--hookpoint", "transformer.nope"]) == 2
    assert "no module" in capsys.readouterr().err


def test_chat_batch_refuses_bad_chats(word_tokenizer):
    model = tiny("llama", len(word_tokenizer))
    batch = lm.chat_batch(word_tokenizer, [[{"role": "user", "content": "the zebra runs"}]], model)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    with pytest.raises(ValueError, match="chat 0 is empty"):
        lm.chat_batch(word_tokenizer, [[]], model)
    with pytest.raises(ValueError, match="no message content"):
        lm.chat_batch(word_tokenizer, [[{"role": "user", "content": "  "}]], model)
    with pytest.raises(ValueError, match="context of 64"):
        lm.chat_batch(word_tokenizer, [[{"role": "user", "content": "the zebra " * 40}]], model)
    template = word_tokenizer.chat_template
    word_tokenizer.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            lm.chat_batch(word_tokenizer, [[{"role": "user", "content": "hi"}]], model)
    finally:
        word_tokenizer.chat_template = template


def test_concepts_fit_from_chats(word_tokenizer):
    model = tiny("llama", len(word_tokenizer))
    site = lm.residual(model, 1)
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=32, d_sae=64, k=8)
    chat = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    concept = Concept("zebra", target=[chat(t) for t in TARGET], retain=[chat(t) for t in RETAIN], n_features=4,
                      fpr=0.2)
    try:
        g = lm.guard_lm(model, sae=sae, concepts=[concept], tokenizer=word_tokenizer, hookpoint=site)
    except ValueError as error:  # a random SAE may fail calibration; the chats must have reached it as text
        assert "chat" not in str(error)
        return
    assert g.concepts[0].fitted and all(isinstance(t, str) and "<|im_start|>" in t for t in g.concepts[0].target)
    g.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_generate_unchanged_when_unflagged(dtype, word_tokenizer):
    model = tiny("llama", len(word_tokenizer)).to(dtype)
    batch = prompt_batch(word_tokenizer, ["the dog sleeps in the house"])
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=word_tokenizer.pad_token_id)
    plain = model.generate(**batch, **kwargs)
    g = _guard(model, word_tokenizer, threshold=1e30)
    assert torch.equal(model.generate(**batch, **kwargs), plain)
    g.detach()
    g = _guard(model, word_tokenizer, threshold=1e-6, score_boilerplate=True)
    model.generate(**batch, **kwargs)
    assert g.request_verdicts[0].prompt.flagged
    g.detach()


def test_hook_z_sae_of_the_wrong_width_is_refused(word_tokenizer):
    """Gemma's heads need not fill the width: 4 heads of 12 = 48 at o_proj's input, not the hidden size 32."""
    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=len(word_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                         head_dim=12, max_position_embeddings=64)).eval()
    sae = SAE.create("topk", d_in=32, d_sae=64, k=4)
    concept = Concept("zebra", features=torch.arange(4), threshold=1.0)
    with pytest.raises(ValueError, match="does not match the width 48"):
        lm.guard_lm(model, sae=sae, concepts=[concept], tokenizer=word_tokenizer, hookpoint=lm.attn_z(model, 0))
    batch = prompt_batch(word_tokenizer, ["the zebra runs"])
    assert model(**batch).logits.isfinite().all()
    with pytest.raises(ValueError, match="5 heads do not divide"):
        split_heads(torch.zeros(1, 2, 48), 5)


def test_guard_picks_the_lm_family_and_returns_its_handle(word_tokenizer):
    from sae_guard import guard

    model = tiny("llama", len(word_tokenizer))
    site = lm.residual(model, 1)
    width = capture_hidden(find_hookpoint(model, site), **prompt_batch(word_tokenizer, ["the"])).shape[-1]
    sae = SAE.create("topk", d_in=width, d_sae=64, k=4)
    concept = Concept("zebra", features=torch.arange(64), threshold=1e30)
    with guard(model, sae=sae, concepts=[concept], tokenizer=word_tokenizer, hookpoint=site, scope="prompt") as g:
        assert isinstance(g, lm.LMGuard) and g.adapters[0].name == "lm" and g.scope is g.adapters[0].scope
