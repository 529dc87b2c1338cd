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


def build_tiny_model_and_processor(
    family: str = "llama", seed: int = 0, gate: float | None = 0.5, text_config_overrides: dict | None = None,
    **config_overrides,
):
    """
    A tiny random OpenFlamingo and a matching `OpenFlamingoProcessor`, consistent with each other as a converted
    release is: the tokenizer has the special tokens, the model's vocabulary is `len(tokenizer)`, `media_token_id` /
    `eoc_token_id` / pad come from the processor, images are preprocessed to the tiny vision tower's size, and (as for
    every OpenFlamingo whose config knows the ids) the generation config stops at `<|endofchunk|>`.

    Args:
        family: language-model family of `openflamingo_hf.tiny_models.tiny_text_config`.
        seed: seed of the random weights.
        gate: value given to every `attn_gate` / `ff_gate` (non-zero so that images matter); `None` keeps zeros.
        text_config_overrides: fields of the language model's config (e.g. `{"tie_word_embeddings": True}`).
        **config_overrides: other `OpenFlamingoConfig` fields.
    Returns:
        `(model, processor)`, the model in eval mode.
    """
    import torch

    from .modeling.modeling_openflamingo import OpenFlamingoForConditionalGeneration
    from .processing.processing_openflamingo import OpenFlamingoProcessor, default_image_processor
    from .tiny_models import tiny_openflamingo_config, tiny_text_config

    image_processor = default_image_processor()
    config = tiny_openflamingo_config(family, **config_overrides)
    size = config.vision_config.image_size
    image_processor.size = {"shortest_edge": size}
    image_processor.crop_size = {"height": size, "width": size}
    processor = OpenFlamingoProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer())
    tokenizer = processor.tokenizer
    config.text_config = tiny_text_config(
        family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **(text_config_overrides or {}),
    )
    processor.update_model_config(config)
    torch.manual_seed(seed)
    model = OpenFlamingoForConditionalGeneration(config).eval()
    if gate is not None:
        with torch.no_grad():
            for block in model.gated_cross_attn_layers.values():
                block.attn_gate.fill_(gate)
                block.ff_gate.fill_(gate)
    return model, processor


def save_tiny_backbones(folder, family: str = "llama", seed: int = 0) -> tuple[str, str]:
    """
    Writes a tiny random CLIP vision tower (with a CLIP image processor at its 30 px size) to `folder/vision` and a
    tiny random causal LM (with the tiny tokenizer) to `folder/lm`, as pretrained backbones would be on disk: the
    starting point of `openflamingo-train --vision_model ... --language_model ...` in tests.

    Returns:
        `(vision_path, language_model_path)`
    """
    import os

    import torch
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from .processing.processing_openflamingo import default_image_processor
    from .tiny_models import tiny_text_config, tiny_vision_config

    vision_path, lm_path = os.path.join(folder, "vision"), os.path.join(folder, "lm")
    torch.manual_seed(seed)
    vision_config = tiny_vision_config()
    CLIPVisionModel(vision_config).save_pretrained(vision_path)
    image_processor = default_image_processor()
    size = vision_config.image_size
    image_processor.size = {"shortest_edge": size}
    image_processor.crop_size = {"height": size, "width": size}
    image_processor.save_pretrained(vision_path)
    tokenizer = build_tiny_tokenizer()
    text_config = tiny_text_config(family, vocab_size=len(tokenizer), pad_token_id=None,
                                   eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    AutoModelForCausalLM.from_config(text_config).save_pretrained(lm_path)
    tokenizer.save_pretrained(lm_path)
    return vision_path, lm_path



TINY_CAPTIONS = ["a cat", "a dog on a mat", "two birds", "a red car", "a man", "a plate of food", "a bus", "a horse"]


def recipe_sample(processor, index: int, interleaved: bool, max_length: int = 24, no_loss: bool = False) -> dict:
    """One tokenized training sample with the recipe's labels (`processor.pretraining_labels`), padded to
    `max_length`: a caption pair, or (`interleaved`) a 3-chunk document with 2 images. `no_loss`: every label
    `IGNORE_INDEX`."""
    from .processing.processing_openflamingo import IGNORE_INDEX

    if interleaved:
        text = processor.interleaved_text(["Intro.", f"{TINY_CAPTIONS[index % 8]}.", "a dog."], [1, 2])
        images = [make_image(index), make_image(index + 100)]
    else:
        text, images = processor.pair_text(TINY_CAPTIONS[index % 8]), [make_image(index)]
    batch = processor(images=[images], text=[text], return_tensors="pt", padding="max_length", max_length=max_length,
                      padding_side="right", truncation=True)
    labels = processor.pretraining_labels(batch["input_ids"], batch["attention_mask"], interleaved=interleaved)[0]
    return {
        "input_ids": batch["input_ids"][0],
        "attention_mask": batch["attention_mask"][0],
        "pixel_values": batch["pixel_values"][0],
        "labels": labels.new_full(labels.shape, IGNORE_INDEX) if no_loss else labels,
    }


__all__ = [
    "EOS_TOKEN",
    "TINY_CAPTIONS",
    "build_tiny_model_and_processor",
    "build_tiny_tokenizer",
    "make_image",
    "recipe_sample",
    "save_tiny_backbones",
]
