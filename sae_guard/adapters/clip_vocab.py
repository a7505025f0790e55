"""The genuine CLIP tokenizer, built offline from the BPE merges that open_clip ships.

CLIP's vocabulary is derived from its merges: the 256 byte symbols, the same with the end-of-word
marker `</w>`, one token per merge (the first 49152 - 256 - 2), then `<|startoftext|>` and
`<|endoftext|>`: 49408 tokens, identical to `openai/clip-vit-large-patch14`'s tokenizer files.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from ..cache import cache_root


@lru_cache(maxsize=None)
def clip_tokenizer_files(folder: str | None = None) -> Path:
    """Write vocab.json and merges.txt (once) and return their folder."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    target = Path(folder) if folder else cache_root() / "clip_bpe"
    if (target / "vocab.json").exists() and (target / "merges.txt").exists():
        return target
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target))
    (tmp / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    for name in ("vocab.json", "merges.txt"):
        os.replace(tmp / name, target / name)
    tmp.rmdir()
    return target


def clip_tokenizer(folder: str | None = None):
    """A `transformers.CLIPTokenizer` with CLIP's real vocabulary, padded to 77 tokens like SD's."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_files(folder), model_max_length=77)
