"""Shared fixtures: real tokenizers built offline, tiny pipelines, one torch thread for tiny models."""

from __future__ import annotations

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
)
WORDS = [
    "the cat sat on the mat", "a dog ran in the park", "user assistant system", "hello how are you today",
    "i am fine thank you", "the quick brown fox jumps over the lazy dog", "paint a red circle and a blue square",
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster than two contending for a shared CPU (`usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """The genuine CLIP tokenizer (49408 tokens), built from the BPE merges that open_clip ships."""
    from sae_guard.adapters.clip_vocab import clip_tokenizer

    return clip_tokenizer(str(tmp_path_factory.mktemp("clip_tokenizer")))


@pytest.fixture(scope="session")
def word_tokenizer():
    """A small GPT-2-style fast tokenizer: word-level, `<|endoftext|>` as BOS/EOS/pad, a ChatML template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(WORDS, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def tiny_sd_pipeline(clip_tokenizer):
    """A real StableDiffusionPipeline with tiny random components and the genuine CLIP tokenizer."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77,
    ))
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer, unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


T5_WORDS = [
    "a", "an", "the", "of", "and", "in", "on", "at", "by", "near", "under", "with", "photo", "painting", "zebra",
    "dog", "cat", "horse", "lion", "tiger", "bird", "fish", "cow", "sheep", "goat", "duck", "bear", "field", "beach",
    "hill", "snow", "river", "city", "street", "tree", "night", "rain", "farm", "zoo", "sea", "red", "blue",
]


@pytest.fixture(scope="session")
def t5_tokenizer():
    """A T5-style tokenizer built offline: a Unigram model over whole words (with a "▁" prefix) and
    single letters, so any lowercase text tokenizes; `<pad>`=0, `</s>`=1 appended, `<unk>`=2, 512 long."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -3.0) for word in T5_WORDS]
    pieces += [(c, -6.0) for c in letters] + [("\u2581" + c, -6.0) for c in letters]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                           special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=512)
