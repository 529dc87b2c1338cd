"""
Offline test fixtures: a tiny tokenizer and deterministic images, built in-process (nothing is downloaded).

Used by the test suite and the demo in place of the GPT-NeoX-20B tokenizer and real photos.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"

# A few captions / VQA-style prompts, so that common prompt words ("Output:", "Question:", "a", ...) get merges.
_CORPUS = [
    "An image of a cat sitting on a red mat.",
    "Output: a dog running in the park.",
    "Output: two birds on a branch.",
    "Question: What is in the image? Short answer: a cat.",
    "Question: What color is the car? Short answer: red.",
    "A photo of a man riding a horse on the beach.",
    "A plate of food with a fork and a knife.",
    "Output: a group of people standing next to a bus.",
]


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """
    A tiny byte-level BPE tokenizer in the spirit of GPT-NeoX's: byte-level pre-tokenization (every string can be
    encoded), `<|endoftext|>` as bos / eos / unk token, no pad token and no special tokens added around the text.

    It is trained in-process on a fixed corpus, so it is deterministic (same vocabulary and ids on every call) and
    needs no download. It has `vocab_size` entries (the 256 byte symbols, `<|endoftext|>` and BPE merges).

    Returns:
        `PreTrainedTokenizerFast` (a `TokenizersBackend` in transformers 5) returning `input_ids` and
        `attention_mask` only.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_input_names=["input_ids", "attention_mask"],
    )


def make_image(seed: int, size: tuple[int, int] = (32, 40)) -> Image.Image:
    """
    A deterministic RGB noise image.

    Args:
        seed (`int`): Seed of the pixel values; different seeds give different images.
        size (`tuple[int, int]`, defaults to `(32, 40)`): `(width, height)`, PIL's convention.

    Returns:
        `PIL.Image.Image` in mode `"RGB"`.
    """
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


__all__ = ["EOS_TOKEN", "build_tiny_tokenizer", "make_image"]
