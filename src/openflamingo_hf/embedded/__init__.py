"""
The embedded OpenFlamingo: a tiny model trained by this package's own recipe on a procedural world, shipped with the
package so that everything runs offline.

    from openflamingo_hf.embedded import caption, answer, load_embedded_model, make_examples

    examples = make_examples(4, seed=1_000_001)  # held-out seeds: >= world.HELD_OUT_SEED_START
    caption([e.image for e in examples])                              # ["three green squares.", ...]
    answer([e.image for e in examples], [e.question for e in examples])  # ["three", "green", ...]

Its folder (`EMBEDDED_MODEL_DIR`) loads like any converted model: `AutoModelForImageTextToText.from_pretrained`,
`AutoProcessor.from_pretrained`, `pipeline("image-text-to-text", model=EMBEDDED_MODEL_DIR)`. It was trained by
`examples/train_embedded.py` (see the README for its scores).
"""

from __future__ import annotations

import os
import re
from importlib import resources

import numpy as np

from .world import (
    CLIP_FRAMES,
    FORMATS,
    HELD_OUT_SEED_START,
    SAMPLE_SEED,
    Clip,
    Example,
    make_clips,
    make_examples,
    output_caption_text,
    reverse_clip,
    tag_text,
    vqa_text,
)

EMBEDDED_MODEL_DIR = str(resources.files(__package__).joinpath("model"))
# The video variant: the same model plus frame embeddings, trained on clips too (examples/train_embedded_video.py).
EMBEDDED_VIDEO_MODEL_DIR = str(resources.files(__package__).joinpath("video_model"))
SAMPLES_DIR = str(resources.files(__package__).joinpath("samples"))

# What a tag of each format looks like, to measure in-context format following.
FORMAT_PATTERNS = {
    "dash": re.compile(r"^[a-z]+-[a-z]+-\d$"),
    "slash": re.compile(r"^[a-z]+/[a-z]+/\d$"),
    "words": re.compile(r"^\d [a-z]+ [a-z]+$"),
}

_LOADED: dict = {}


def load_embedded_model(device: str | None = None):
    """`(model, processor)` of the shipped model, in eval mode (cached per device)."""
    return _load_shipped(EMBEDDED_MODEL_DIR, "examples/train_embedded.py", device)


def load_embedded_video_model(device: str | None = None):
    """`(model, processor)` of the shipped video variant (frame embeddings; answers clips), in eval mode (cached per
    device). Its processor samples `CLIP_FRAMES` frames per video."""
    return _load_shipped(EMBEDDED_VIDEO_MODEL_DIR, "examples/train_embedded_video.py", device)


def _load_shipped(folder: str, script: str, device: str | None):
    """A shipped model folder through `_load_folder`, cached per (folder, device)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"The embedded model is missing from {folder}. Reinstall openflamingo-hf, or train it with {script} and "
            "copy its model folder there."
        )
    key = (folder, device or "cpu")
    if key not in _LOADED:
        model, processor = _load_folder(folder)
        _LOADED[key] = (model.to(key[1]), processor)
    return _LOADED[key]


def _load_folder(folder: str):
    """`(model, processor)` of a model folder, fp32, in eval mode."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import OpenFlamingoConfig  # noqa: F401  (registers the Auto classes)

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


def sample_image_paths() -> list[str]:
    """The bundled sample images (PNG files of the world)."""
    return sorted(os.path.join(SAMPLES_DIR, name) for name in os.listdir(SAMPLES_DIR) if name.endswith(".png"))


def sample_examples() -> list[Example]:
    """The bundled samples as world examples (the same images, with their captions, questions and answers)."""
    return make_examples(len(sample_image_paths()), SAMPLE_SEED)


def sample_captions() -> list[str]:
    """The true captions of `sample_image_paths()`, in the same order."""
    with open(os.path.join(SAMPLES_DIR, "captions.txt"), encoding="utf-8") as file:
        return [line.strip() for line in file if line.strip()]


def default_caption_prompt(processor, num_images: int) -> str:
    """A few-shot caption prompt for the sample images in the released models' format: the first `num_images - 1`
    captioned (`Output:{caption}`), the last the query `Output:`."""
    demonstrations = [output_caption_text(text) for text in sample_captions()[: num_images - 1]]
    return processor.few_shot_prompt(demonstrations, output_caption_text())


def _model_and_processor(model, processor):
    if model is None:
        return load_embedded_model()
    if processor is None:
        raise ValueError("Pass the processor of `model` too (processor=...), or neither for the embedded model.")
    return model, processor


def _generate(model, processor, images: list, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to `prompts` (one row of images each), cut at `<|endofchunk|>` and stripped."""
    import torch

    rows = [[image] if not isinstance(image, (list, tuple)) else list(image) for image in images]
    inputs = processor(images=rows, text=prompts, return_tensors="pt").to(model.device)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [text.strip() for text in processor.post_process_generation(generated, inputs["input_ids"])]


def caption(images: list, model=None, processor=None, prompt: str = "") -> list[str]:
    """Zero-shot captions of `images` (PIL images, arrays or paths), one per image, with the prompt `<image>{prompt}`:
    by default `<image>` alone, as the recipe's pair text (`processor.pair_text`) and an image-only pipeline or chat
    request; `prompt="Output:"` is the released models' caption prompt, which the embedded model answers alike."""
    model, processor = _model_and_processor(model, processor)
    images = list(images)
    return _generate(model, processor, images, [processor.few_shot_prompt([], prompt)] * len(images), 16)


def answer(images: list, questions: list[str], model=None, processor=None) -> list[str]:
    """Short answers, one per (image, question), with the prompt `<image>Question:{q} Short answer:`."""
    images, questions = list(images), list(questions)
    if len(images) != len(questions):
        raise ValueError(f"Got {len(images)} images for {len(questions)} questions: give one question per image.")
    model, processor = _model_and_processor(model, processor)
    prompts = [processor.few_shot_prompt([], vqa_text(question)) for question in questions]
    return _generate(model, processor, images, prompts, 8)


def follows_format(text: str, format_name: str) -> bool:
    return bool(FORMAT_PATTERNS[format_name].match(text.strip()))


def evaluate_embedded(
    model_dir: str | None = None, seed: int = HELD_OUT_SEED_START + 12345, num_examples: int = 60, shots: int = 4
) -> dict:
    """
    Held-out scores (examples drawn with `seed`, never used in training): exact captions with the bare prompt
    `<image>`, with the released models' zero-shot `<image>Output:` and with `shots` `Output:` demonstrations; short
    VQA answers (`Question:... Short answer:`); and tag-format following with `shots` demonstrations against none
    (in-context learning).
    """
    model, processor = _load(model_dir)
    examples = make_examples(num_examples, seed)
    images = [e.image for e in examples]
    answers = answer(images, [e.question for e in examples], model, processor)
    scores = {
        "caption_exact": _exact(caption(images, model, processor), [e.caption for e in examples]),
        "caption_output_exact": _exact(caption(images, model, processor, output_caption_text()),
                                       [e.caption for e in examples]),
        f"caption_output_exact_{shots}shot": few_shot_caption_accuracy(examples, model, processor, shots, seed),
        "vqa_exact": _exact(answers, [e.answer for e in examples]),
    }
    scores.update(in_context_format_following(examples, model, processor, shots, seed))
    return scores


def _exact(predictions: list[str], truths: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predictions, truths)]))


def few_shot_caption_accuracy(examples: list[Example], model, processor, shots: int = 4, seed: int = 0) -> float:
    """Exact captions of the examples' images with `shots` held-out demonstrations in the released models' format
    (`<image>Output:{caption}<|endofchunk|>` each, then `<image>Output:`)."""
    rng = np.random.default_rng([seed, 3])
    demo_pool = make_examples(4 * len(examples), seed + 2)
    rows, prompts = [], []
    for example in examples:
        demos = [demo_pool[int(i)] for i in rng.choice(len(demo_pool), size=shots, replace=False)]
        rows.append([d.image for d in demos] + [example.image])
        prompts.append(processor.few_shot_prompt([output_caption_text(d.caption) for d in demos],
                                                 output_caption_text()))
    return _exact(_generate(model, processor, rows, prompts, 16), [e.caption for e in examples])


def in_context_format_following(examples: list[Example], model, processor, shots: int = 4, seed: int = 0) -> dict:
    """How often the tag of a query image takes the format its demonstrations show, with `shots` of them and none."""
    rng = np.random.default_rng(seed)
    demo_pool = make_examples(4 * len(examples), seed + 1)
    rows, prompts_few, prompts_zero, formats = [], [], [], []
    for index, example in enumerate(examples):
        format_name = list(FORMATS)[index % len(FORMATS)]
        demos = [demo_pool[int(i)] for i in rng.choice(len(demo_pool), size=shots, replace=False)]
        rows.append([d.image for d in demos] + [example.image])
        prompts_few.append(processor.few_shot_prompt([tag_text(d.tag(format_name)) for d in demos], tag_text()))
        prompts_zero.append(processor.few_shot_prompt([], tag_text()))
        formats.append(format_name)
    few = _generate(model, processor, rows, prompts_few, 10)
    zero = _generate(model, processor, [e.image for e in examples], prompts_zero, 10)
    return {
        f"format_{shots}shot": float(np.mean([follows_format(t, f) for t, f in zip(few, formats)])),
        "format_0shot": float(np.mean([follows_format(t, f) for t, f in zip(zero, formats)])),
        f"tag_exact_{shots}shot": float(np.mean([t == e.tag(f) for t, e, f in zip(few, examples, formats)])),
    }


def _load(model_dir: str | None):
    return load_embedded_model() if model_dir is None else _load_folder(model_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Clips (the video variant)
# ----------------------------------------------------------------------------------------------------------------------


# The longest clip caption, "one yellow triangle moving right.", is 19 tokens with this tokenizer (which spells "moving"
# and the directions letter by letter: the image world it was trained on has no such words), plus the stop token.
CLIP_MAX_NEW_TOKENS = 24


def caption_clips(clips: list[Clip], model=None, processor=None) -> list[str]:
    """Zero-shot captions of clips (prompt `<video>`, `CLIP_FRAMES` frames each), e.g. "one red circle moving left."
    Default model: the shipped video variant."""
    import torch

    if model is None:
        model, processor = load_embedded_video_model()
    elif processor is None:
        raise ValueError("Pass the processor of `model` too (processor=...), or neither for the video variant.")
    clips = list(clips)
    inputs = processor(videos=[[c.frames] for c in clips], text=["<video>"] * len(clips), num_frames=CLIP_FRAMES,
                       return_tensors="pt").to(model.device)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=CLIP_MAX_NEW_TOKENS, do_sample=False)
    return [text.strip() for text in processor.post_process_generation(generated, inputs["input_ids"])]


def evaluate_embedded_clips(
    model_dir: str | None = None, seed: int = HELD_OUT_SEED_START + 7000, num_examples: int = 100
) -> dict:
    """
    Held-out clip scores (clips drawn with `seed`, never used in training) of a video model folder (default: the
    shipped video variant): exact captions, right direction, and how often reversing the frames turns the predicted
    direction into its opposite (the frames' order is what the direction is read from).
    """
    model, processor = load_embedded_video_model() if model_dir is None else _load_folder(model_dir)
    clips = make_clips(num_examples, seed)
    captions = caption_clips(clips, model, processor)
    reversed_clips = [reverse_clip(c) for c in clips]
    reversed_captions = caption_clips(reversed_clips, model, processor)
    return {
        "clip_caption_exact": float(np.mean([t == c.caption for t, c in zip(captions, clips)])),
        "clip_direction": float(np.mean([caption_direction(t) == c.direction for t, c in zip(captions, clips)])),
        "clip_reversed_direction": float(
            np.mean([caption_direction(t) == c.direction for t, c in zip(reversed_captions, reversed_clips)])
        ),
    }


def caption_direction(caption_text: str) -> str | None:
    """The direction a clip caption names ("... moving left." -> "left"), or None."""
    match = re.search(r"moving (\w+)\.?$", caption_text.strip())
    return match.group(1) if match else None


__all__ = [
    "CLIP_MAX_NEW_TOKENS",
    "EMBEDDED_MODEL_DIR",
    "EMBEDDED_VIDEO_MODEL_DIR",
    "Clip",
    "Example",
    "answer",
    "caption",
    "caption_clips",
    "caption_direction",
    "default_caption_prompt",
    "evaluate_embedded",
    "evaluate_embedded_clips",
    "few_shot_caption_accuracy",
    "load_embedded_model",
    "load_embedded_video_model",
    "make_clips",
    "make_examples",
    "sample_examples",
    "sample_image_paths",
]
