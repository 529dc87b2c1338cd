# Copyright 2024 The OpenFlamingo authors and the openflamingo_hf contributors.
# Licensed under the MIT License.
"""
Processor class for OpenFlamingo: a CLIP image processor plus the language model's tokenizer.

OpenFlamingo reads interleaved images and text. The text carries one `<image>` marker per image, in order, and
`<|endofchunk|>` closes the text that belongs to an image (it is also the generation stop token):

    "<image>Output:a cat<|endofchunk|><image>Output:"   # one few-shot demonstration, then the query

Unlike LLaVA-style processors, the marker is *not* expanded into one placeholder per visual token: the model
attends to the images through gated cross-attention, and the marker only tells each text token which image is the
latest one before it. The processor therefore keeps the markers as they are, and returns the images as a padded
`(batch_size, max_num_images, num_frames=1, 3, height, width)` tensor next to `input_ids` / `attention_mask`.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature, PreTrainedTokenizerBase
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
)
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import TextInput
from transformers.utils import is_torchvision_available, logging, to_py_obj
from transformers.utils.chat_template_utils import _CONTROL_TOKEN_START

# No absolute import of the package: this file is shipped in trust_remote_code Hub folders, next to its sibling
# `media_inputs.py` (hence the relative import).
from .media_inputs import VideoFrames, is_video_input, load_image_input, load_video_input, uniform_frame_indices

logger = logging.get_logger(__name__)

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_EOC_TOKEN = "<|endofchunk|>"
DEFAULT_PAD_TOKEN = "<PAD>"
# Where a video goes in a prompt. Text-level only: the processor turns it into the `<image>` marker (a video takes one
# media slot, with its frames), so the model and tokenizer know a single marker.
VIDEO_MARKER = "<video>"
CHAT_TEMPLATE_RESOURCE = "chat_template.jinja"
# The label of tokens that carry no loss: the `ignore_index` of torch's cross-entropy, which the model's loss uses.
IGNORE_INDEX = -100

# The text after each image in the original OpenFlamingo evaluation prompts, by task: `{answer}` is the caption,
# short answer or class name of a demonstration, and empty for the query.
TASK_TEMPLATES = {
    "captioning": "Output:{answer}",
    "vqa": "Question:{question} Short answer:{answer}",
    "hateful_memes": "is an image with: '{ocr}' written on it. Is it hateful? Answer:{answer}",
    "classification": "Output:{answer}",
}


def load_default_chat_template(image_token: str = DEFAULT_IMAGE_TOKEN, eoc_token: str = DEFAULT_EOC_TOKEN) -> str:
    """
    The OpenFlamingo chat template shipped with this package (`chat_template.jinja` next to this module), with the
    given marker and end-of-chunk tokens written into it.
    """
    template = resources.files(__package__).joinpath(CHAT_TEMPLATE_RESOURCE).read_text(encoding="utf-8")
    # The tokens are written into the template rather than passed as render variables: with
    # `apply_chat_template(..., sanitize_control_tokens=True)` render variables count as user input and their
    # control tokens would be neutralised, while the template's own text is trusted.
    for default, token in ((DEFAULT_IMAGE_TOKEN, image_token), (DEFAULT_EOC_TOKEN, eoc_token)):
        if token != default:
            template = template.replace(f"'{default}'", json.dumps(token))
    return template


def default_image_processor():
    """
    The image preprocessing of every released OpenFlamingo model: OpenAI CLIP at 224 px (resize the shortest side to
    224 with bicubic resampling, center crop 224x224, rescale to [0, 1], normalize with the OpenAI CLIP mean/std).

    Returns transformers' `CLIPImageProcessor` (torchvision backend) when torchvision is installed, else its PIL
    backend `CLIPImageProcessorPil`; both save as `"image_processor_type": "CLIPImageProcessor"`.
    """
    # Pick the backend explicitly: `transformers.CLIPImageProcessor` falls back to the PIL backend by itself when
    # torchvision is missing, but warns every time it does.
    if is_torchvision_available():
        from transformers import CLIPImageProcessor as image_processor_class
    else:
        from transformers import CLIPImageProcessorPil as image_processor_class
    return image_processor_class(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


class OpenFlamingoProcessorKwargs(ProcessingKwargs, total=False):
    """
    transformers' processor kwargs, plus:

    max_num_images (`int`, *optional*):
        Pad every sample to exactly this many media slots (zero images) and return `image_mask` and `frame_mask`, so
        that samples processed one by one stack into a batch (transformers' pipelines collate rows by concatenating
        `pixel_values`). A sample with more images is an error.
    """

    max_num_images: int | None


class OpenFlamingoProcessor(ProcessorMixin):
    r"""
    Constructs an OpenFlamingo processor: a CLIP image processor and the language model's tokenizer in one object.

    On creation the processor makes sure the tokenizer knows OpenFlamingo's special tokens, adding what is missing
    the way the original OpenFlamingo code did (the tokenizer is modified in place):

    1. `[eoc_token, image_token]` as extra (additional) special tokens, in that order;
    2. then, only if the tokenizer has no pad token, `pad_token` as its pad token.

    For the GPT-NeoX-20B tokenizer (50277 entries) this gives `<|endofchunk|>` = 50277, `<image>` = 50278 and
    `<PAD>` = 50279. Never hard-code these ids: read `image_token_id`, `eoc_token_id` and
    `tokenizer.pad_token_id`, and use [`~OpenFlamingoProcessor.update_model_config`] to copy them into a model
    config.

    Protocol tokens in raw text: the texts of training data (captions, document sentences, fine-tuning answers and
    message texts) are raw text, and a protocol token written in one (`<image>`, `<|endofchunk|>`, the pad token)
    never acts as one, since it would add a marker without an image or end a chunk early. `pair_sample` and
    `interleaved_sample` remove such tokens (web-scale pretraining text cannot be fixed by hand); fine-tuning data
    is refused where it holds them (`protocol_tokens_in` finds them; the data's author can fix the file). A prompt
    passed to `__call__`, `prompt_messages` or `finetune_sample(prompt=...)` is protocol text: its markers place
    the images. `apply_chat_template(..., sanitize_control_tokens=True)` encodes the protocol tokens of message
    texts as plain text.

    Args:
        image_processor ([`CLIPImageProcessor`], *optional*):
            Image processor. Defaults to OpenAI CLIP preprocessing at 224 px (see `default_image_processor`).
        tokenizer ([`PreTrainedTokenizerBase`]):
            The language model's tokenizer. Required.
        chat_template (`str`, *optional*):
            Jinja chat template. Defaults to the OpenFlamingo template shipped with this package, which writes an
            image block as `<image>`, text verbatim, and closes every finished assistant turn with
            `<|endofchunk|>`; the generation prompt adds nothing.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The marker that stands for one image in the text.
        eoc_token (`str`, *optional*, defaults to `"<|endofchunk|>"`):
            The end-of-chunk token: closes the text that belongs to an image; the generation stop token.
        pad_token (`str`, *optional*, defaults to `"<PAD>"`):
            Pad token added when the tokenizer has none.
        num_frames (`int`, *optional*):
            The default of the call argument `num_frames`: how many frames are sampled (uniformly) from each video
            when a call does not say. Saved with the processor (`processor_config.json`); for a model with frame
            embeddings it is the model's `config.perceiver_max_num_frames`. This is its only role: a call's
            `num_frames=` (or `videos_kwargs={"num_frames": ...}`) overrides it for that call alone and never changes
            `processor.num_frames`; a call's `num_frames=None` means "the default"; `do_sample_frames=False` takes
            every frame of each video and ignores it. Images are 1-frame media whatever its value.
    """

    valid_processor_kwargs = OpenFlamingoProcessorKwargs
    # Pad to the longest row by default, so that `return_tensors="pt"` works on a batch out of the box.
    text_kwargs = {"padding": "longest"}
    # Left padding keeps every prompt flush with the position where generation starts. It is applied in `__call__`
    # (not here) because in `_merge_kwargs` a `padding_side` saved in the tokenizer's init kwargs outranks processor
    # defaults.
    default_padding_side = "left"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        eoc_token: str = DEFAULT_EOC_TOKEN,
        pad_token: str = DEFAULT_PAD_TOKEN,
        num_frames: int | None = None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError(
                "OpenFlamingoProcessor needs the language model's tokenizer, e.g. "
                "`OpenFlamingoProcessor(tokenizer=AutoTokenizer.from_pretrained(...))`."
            )
        if image_processor is None:
            image_processor = default_image_processor()
        if chat_template is None:
            chat_template = load_default_chat_template(image_token, eoc_token)

        self.image_token = image_token
        self.eoc_token = eoc_token
        self.pad_token = pad_token
        self.num_frames = num_frames
        self._ensure_special_tokens(tokenizer)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.eoc_token_id = tokenizer.convert_tokens_to_ids(eoc_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def _ensure_special_tokens(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Adds the marker, end-of-chunk and pad tokens that the tokenizer lacks, in the original's order."""
        # `replace_extra_special_tokens=False` extends the tokenizer's extra special tokens instead of replacing them
        # (which would stop skipping its own ones when decoding), and skips tokens that are already there, so that
        # re-creating the processor from a saved tokenizer adds nothing.
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [self.eoc_token, self.image_token]}, replace_extra_special_tokens=False
        )
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": self.pad_token})

        for token in (self.image_token, self.eoc_token):
            ids = tokenizer.encode(token, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"The tokenizer encodes {token!r} as {len(ids)} tokens {ids}, but OpenFlamingo needs it to be a "
                    "single token. Add it to the tokenizer as a special token (`tokenizer.add_special_tokens(...)`) "
                    "before building the processor."
                )

    def _count_markers(self, text: str, marker: str | None = None) -> int:
        """Number of `<image>` markers (or of `marker`, e.g. `<video>`) in `text`."""
        return len(self._marker_pattern(marker).findall(text))

    def _marker_pattern(self, marker: str | None = None) -> re.Pattern:
        # Occurrences that `apply_chat_template(..., sanitize_control_tokens=True)` wrapped in control markers are
        # user-written text, encoded as plain text: they are not markers.
        return re.compile(f"(?<!{_CONTROL_TOKEN_START}){re.escape(marker or self.image_token)}")

    # ------------------------------------------------------------------------------------------------------------
    # The OpenFlamingo protocol: prompt shapes and which tokens carry loss. Training, evaluation, the CLI and the
    # demo call these; nothing else writes `<image>...<|endofchunk|>` layouts or label masks of its own.
    # ------------------------------------------------------------------------------------------------------------

    def few_shot_prompt(self, demonstrations: list[str], query: str = "") -> str:
        """
        `<image>{demonstration}<|endofchunk|>` per demonstration, then `<image>{query}`: the in-context prompt of
        the original evaluation (e.g. demonstrations `"Output:a cat."`, query `"Output:"`). One image per
        demonstration and one for the query, in that order.
        """
        return "".join(f"{self.image_token}{text}{self.eoc_token}" for text in demonstrations) + (
            f"{self.image_token}{query}"
        )

    def task_text(self, task: str, answer: str | None = None, **fields: str) -> str:
        """
        The text after an image in the evaluation prompt of `task` (a key of `TASK_TEMPLATES`): with `answer` for
        a demonstration (`"Output:a cat."`), without it for the query (`"Output:"`). `fields` fill the template
        (`question=` for VQA, `ocr=` for Hateful Memes).
        """
        if task not in TASK_TEMPLATES:
            raise ValueError(f"Unknown task {task!r}: use one of {', '.join(TASK_TEMPLATES)}.")
        try:
            return TASK_TEMPLATES[task].format(answer="" if answer is None else answer.strip(), **fields)
        except KeyError as error:
            raise ValueError(f"The {task} prompt needs {error.args[0]}=...") from None

    def task_prompt(self, demonstrations: list[str], query: str, text_only_demonstrations: bool = False) -> str:
        """
        The evaluation prompt: `few_shot_prompt(demonstrations, query)`, each demonstration a `task_text` with its
        answer. `text_only_demonstrations` drops the demonstrations' `<image>` markers (the original's "0-shot":
        two demonstrations as text only, no images but the query's).
        """
        prompt = self.few_shot_prompt(demonstrations, query)
        if text_only_demonstrations:
            context, query_part = prompt[: -len(self.image_token + query)], prompt[-len(self.image_token + query) :]
            prompt = context.replace(self.image_token, "") + query_part
        return prompt

    @staticmethod
    def postprocess_answer(task: str, text: str) -> str:
        """
        Where a generated evaluation answer ends, as the original cut it (open_flamingo's
        `postprocess_captioning_generation(text).replace('"', "")` and `postprocess_vqa_generation`): captions up to
        the first "Output", without double quotes; VQA answers up to the first "Question" / "Answer" / "Short", then up
        to the first ", ". Both ends are then stripped of whitespace, which the original does not do but which changes
        no score: VQA accuracy strips the answer itself (and NLTK's word tokenizer, before OK-VQA's stemming, splits on
        whitespace), and the PTB tokenizer of CIDEr ignores whitespace at a caption's ends, except next to the
        characters it takes for line breaks (carriage return, vertical tab, form feed, U+2028, U+2029): a caption
        holding one of those is left unstripped, as the original left it (tests/test_eval_vs_original.py checks all of
        this against the original's code).
        """
        if task == "captioning":
            caption = text.split("Output", 1)[0].replace('"', "")
            return caption if any(char in caption for char in "\r\v\f\u2028\u2029") else caption.strip()
        if task == "vqa":
            return re.split(", ", re.split("Question|Answer|Short", text, maxsplit=1)[0], maxsplit=1)[0].strip()
        return text.strip()

    def pair_text(self, caption: str) -> str:
        """The text of an image-caption pair in pretraining: `<image>{caption}<|endofchunk|>{eos}`."""
        return f"{self.image_token}{caption.strip()}{self.eoc_token}{self.tokenizer.eos_token or ''}"

    def interleaved_text(self, sentences: list[str], image_sentence_indices: list[int]) -> str:
        """
        The text of an interleaved (MMC4-style) document in pretraining, as the original built it.

        Each image's sentence gets `<|endofchunk|><image>` in front (once per image, so two images on one sentence
        give two markers); sentences are joined with spaces; the first `<|endofchunk|>` is dropped (no chunk ends
        before the first image); spaces around the markers are removed; `<|endofchunk|>{eos}` closes the document.

        Args:
            sentences: the document's sentences, in order.
            image_sentence_indices: for each image, the index of the sentence it precedes.
        """
        prefix = f"{self.eoc_token}{self.image_token}"
        sentences = list(sentences)
        for index in image_sentence_indices:
            sentences[index] = f"{prefix}{sentences[index]}"
        text = " ".join(sentences).replace(self.eoc_token, "", 1)
        text = text.replace(f" {self.eoc_token}", self.eoc_token)
        text = text.replace(f"{self.image_token} ", self.image_token).replace(f" {self.image_token}", self.image_token)
        return f"{text}{self.eoc_token}{self.tokenizer.eos_token or ''}"

    def pretraining_labels(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        interleaved: bool = False,
        mask_eos: bool = False,
    ) -> torch.Tensor:
        """
        Labels of the pretraining recipe (the model shifts them itself): the input ids, with `IGNORE_INDEX` on padding
        and on `<image>`; for interleaved documents also on every token before the first `<image>` and on every token
        after an `<|endofchunk|>` up to the next `<image>` (text that no image introduces). `<|endofchunk|>` itself and
        the text after each image carry loss. The original also meant to mask eos but compared ids with a string, so
        eos was trained; `mask_eos=True` masks it.

        Args:
            input_ids: (batch, seq_len)
            attention_mask: (batch, seq_len), 0 on padding; without it padding is found by the pad token id.
        Returns:
            (batch, seq_len) long tensor.
        """
        labels = input_ids.clone()
        masked = input_ids == self.image_token_id
        masked |= attention_mask == 0 if attention_mask is not None else input_ids == self.tokenizer.pad_token_id
        if interleaved:
            masked |= _after_chunk_end_or_before_first_image(input_ids, self.image_token_id, self.eoc_token_id)
        if mask_eos and self.tokenizer.eos_token_id is not None:
            masked |= input_ids == self.tokenizer.eos_token_id
        return labels.masked_fill(masked, IGNORE_INDEX)

    # ------------------------------------------------------------------------------------------------------------
    # Training samples: the pretraining data and the fine-tuning data call these once per sample
    # ------------------------------------------------------------------------------------------------------------

    def protocol_tokens_in(self, text: str) -> list[str]:
        """The protocol tokens (`<image>`, `<|endofchunk|>`, the pad token) written in `text`, in that order."""
        return [token for token in self._protocol_tokens() if token in text]

    def _protocol_tokens(self) -> tuple[str, ...]:
        pad = self.tokenizer.pad_token
        return (self.image_token, self.eoc_token) + ((pad,) if pad and pad not in (self.image_token, self.eoc_token)
                                                     else ())

    def _without_protocol_tokens(self, text: str) -> str:
        for token in self._protocol_tokens():
            text = text.replace(token, "")
        return text

    def pair_sample(self, media: Any, caption: str, max_length: int, mask_eos: bool = False) -> BatchFeature:
        """
        One image-caption (or video-caption) pair of the pretraining recipe as a training sample.

        The text is `pair_text(caption)`, with the protocol tokens written in the caption removed (see the class
        docstring), tokenized with right padding to `max_length` and truncated to it; the labels are
        `pretraining_labels(..., mask_eos=mask_eos)`.

        Args:
            media: the image (anything `__call__` takes as one image), or a video's frames as `load_video_input`
                returns them.
            caption (`str`): the caption, raw text.
            max_length (`int`): the sample's length in tokens.
            mask_eos (`bool`, *optional*, defaults to `False`): passed to `pretraining_labels`.

        Returns:
            [`BatchFeature`] of tensors: `input_ids`, `attention_mask`, `labels` `(max_length,)`; `pixel_values`
            `(1, num_frames, 3, height, width)` (`num_frames` is 1 for an image); `frame_mask` `(1, num_frames)` when
            `num_frames > 1`.
        """
        text = self.pair_text(self._without_protocol_tokens(caption))
        return self._pretraining_sample(text, [media], max_length, interleaved=False, mask_eos=mask_eos)

    def interleaved_sample(
        self,
        media: list[Any],
        sentences: list[str],
        image_sentence_indices: list[int],
        max_length: int,
        mask_eos: bool = False,
    ) -> BatchFeature:
        """
        One interleaved document of the pretraining recipe as a training sample.

        The text is `interleaved_text(sentences, image_sentence_indices)`, with the protocol tokens written in the
        sentences removed (see the class docstring), tokenized with right padding to `max_length` and truncated to
        it; the labels are `pretraining_labels(..., interleaved=True, mask_eos=mask_eos)`. Truncation may cut
        `<image>` markers: only the media of the markers left are laid out, so `len(pixel_values)` is the number of
        images the sample uses (0 when truncation left none).

        Args:
            media: one per entry of `image_sentence_indices`, in that order, sorted by sentence: images, or videos'
                frames as `load_video_input` returns them.
            sentences: the document's sentences, raw text.
            image_sentence_indices: for each media, the index of the sentence it precedes.
            max_length (`int`): the sample's length in tokens.
            mask_eos (`bool`, *optional*, defaults to `False`): passed to `pretraining_labels`.

        Returns:
            [`BatchFeature`] of tensors: `input_ids`, `attention_mask`, `labels` `(max_length,)`; `pixel_values`
            `(num_images, num_frames, 3, height, width)` (`num_frames`: the most frames of one media, 1 without
            videos); `frame_mask` `(num_images, num_frames)` when `num_frames > 1`.
        """
        sentences = [self._without_protocol_tokens(sentence) for sentence in sentences]
        text = self.interleaved_text(sentences, image_sentence_indices)
        return self._pretraining_sample(text, list(media), max_length, interleaved=True, mask_eos=mask_eos)

    def _pretraining_sample(
        self, text: str, media: list[Any], max_length: int, interleaved: bool, mask_eos: bool
    ) -> BatchFeature:
        # Truncation may cut markers here (the recipe's documents are longer than its `max_length`), so the text is
        # tokenized directly rather than through `__call__`, which refuses that.
        encoded = self.tokenizer(
            text, max_length=max_length, truncation=True, padding="max_length", padding_side="right",
            return_tensors="pt",
        )
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        labels = self.pretraining_labels(input_ids, attention_mask, interleaved=interleaved, mask_eos=mask_eos)
        if interleaved:
            media = media[: int((input_ids == self.image_token_id).sum())]
        media = [
            item if isinstance(item, VideoFrames) else self._load_image(item, 0, media_idx)
            for media_idx, item in enumerate(media)
        ]
        pixels, _ = self._process_images([media], return_tensors="pt")
        sample = {"input_ids": input_ids[0], "attention_mask": attention_mask[0], "labels": labels[0]}
        sample.update({key: value[0] for key, value in pixels.items()})
        return BatchFeature(sample)

    def prompt_messages(self, prompt: str, answer: str, num_images: int, where: str = "The prompt") -> list[dict]:
        """
        The chat messages of a prompt-answer example: one user turn, the prompt split at its `<image>` markers into
        image and text blocks (a prompt without markers gets one image block per image in front, as `__call__` does
        with a text without markers), and one assistant turn, the answer.

        Raises:
            `ValueError` (its message starting with `where`) when the prompt has markers, but not one per image.
        """
        parts = prompt.split(self.image_token)
        num_markers = len(parts) - 1
        if num_markers == 0:
            user = [{"type": "image"} for _ in range(num_images)] + _text_blocks(parts[0])
        elif num_markers == num_images:
            user = _text_blocks(parts[0])
            for part in parts[1:]:
                user += [{"type": "image"}] + _text_blocks(part)
        else:
            raise ValueError(
                f"{where} has {num_markers} `{self.image_token}` markers but the example has {num_images} images: give "
                "one marker per image, in order (or none, and the images go in front)."
            )
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def finetune_sample(
        self,
        messages: list[dict] | None = None,
        images: list[Any] | None = None,
        max_length: int | None = 512,
        *,
        prompt: str | None = None,
        answer: str | None = None,
    ) -> BatchFeature:
        """
        One fine-tuning example as a training sample: the chat template's text, loss on the assistant turns only.

        The chat template writes an image block as `<image>`, text verbatim, and closes every assistant turn with
        `<|endofchunk|>`; the labels are the input ids on the assistant tokens (each answer and the
        `<|endofchunk|>` that ends it) and `IGNORE_INDEX` everywhere else.

        Args:
            messages: chat messages (`{"role", "content"}`), content a string or `{"type": "image"}` /
                `{"type": "text", "text": ...}` blocks. Or, instead, `prompt` and `answer` (see `prompt_messages`).
            images: the images of the image blocks, in order.
            max_length: truncate longer texts to this many tokens (`None`: never truncate). Truncation that would cut
                an `<image>` marker, or leave no answer token, is a `ValueError`.

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask`, `labels` `(seq_len,)` long tensors; `pixel_values`
            `(num_images, 1, 3, height, width)`, or `None` without images.
        """
        images = list(images or [])
        if (messages is None) == (prompt is None and answer is None) or (messages is None and None in (prompt, answer)):
            raise ValueError("finetune_sample takes either `messages`, or `prompt` and `answer`.")
        if messages is None:
            messages = self.prompt_messages(prompt, answer, len(images))
        processor_kwargs: dict[str, Any] = {"images": images} if images else {}
        if max_length is not None:
            processor_kwargs.update(truncation=True, max_length=max_length)
        encoded = self.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
            processor_kwargs=processor_kwargs,
        )
        input_ids = encoded["input_ids"][0].long()
        attention_mask = encoded["attention_mask"][0].long()
        carries_loss = torch.as_tensor(encoded["assistant_masks"][0]).bool() & attention_mask.bool()
        if not bool(carries_loss.any()):
            raise ValueError(
                f"no answer token is left after truncating to max_length={max_length} tokens: raise max_length or "
                "shorten the prompt."
            )
        pixel_values = encoded.get("pixel_values")
        return BatchFeature({
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(~carries_loss, IGNORE_INDEX),
            "pixel_values": pixel_values[0] if pixel_values is not None else None,
        })

    # ------------------------------------------------------------------------------------------------------------
    # Model config
    # ------------------------------------------------------------------------------------------------------------

    def update_model_config(self, config: OpenFlamingoConfig, set_vocab_size: bool = False) -> int:
        """
        Makes an [`OpenFlamingoConfig`] consistent with this processor's tokenizer, in place.

        Sets `config.media_token_id` (the `<image>` id), `config.eoc_token_id` (the `<|endofchunk|>` id) and
        `config.text_config.pad_token_id` (where transformers 5 keeps the language model's token ids; generation
        reads them from there).

        Args:
            config (`OpenFlamingoConfig`):
                The config to update.
            set_vocab_size (`bool`, *optional*, defaults to `False`):
                If `True` and `config.text_config.vocab_size` is smaller than the tokenizer, raise it to
                `len(tokenizer)`. Use this when building a model from the config; for a pretrained model keep it
                `False` and call `model.resize_token_embeddings(n)` with the returned `n` instead.

        Returns:
            `int`: the number of embedding rows the language model needs, `len(tokenizer)`. A model whose
            `text_config.vocab_size` is smaller must be resized (`model.resize_token_embeddings(n)`).
        """
        num_embeddings = len(self.tokenizer)
        config.media_token_id = self.image_token_id
        config.eoc_token_id = self.eoc_token_id
        config.text_config.pad_token_id = self.tokenizer.pad_token_id
        vocab_size = getattr(config.text_config, "vocab_size", None)
        if set_vocab_size and (vocab_size is None or vocab_size < num_embeddings):
            config.text_config.vocab_size = num_embeddings
        elif vocab_size is not None and vocab_size < num_embeddings:
            logger.warning(
                f"The language model has {vocab_size} embeddings but the tokenizer has {num_embeddings} tokens: "
                f"call `model.resize_token_embeddings({num_embeddings})` before using the model."
            )
        return num_embeddings

    # ------------------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: ImageInput | list[ImageInput] | list[list[ImageInput]] | None = None,
        text: TextInput | list[TextInput] | None = None,
        videos=None,
        audio=None,
        **kwargs: Unpack[OpenFlamingoProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Prepares interleaved images and text for the model.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str`, or (nested) lists of them, *optional*):
                One image, a list of images for one sample, or a list of lists (one list per sample) for a batch.
                A string is read as an image file path, base64 image data, or an http(s) URL (downloaded by
                `transformers.image_utils.load_image`, which returns it as 8-bit RGB). A flat list given with a
                batch of texts is split over the samples in order, by their `<image>` counts; if no text has a
                marker and there is one image per text, each sample gets one image. See *Images* below for the
                pixel values and layouts accepted.
            input_data_format (`"channels_first"` or `"channels_last"`, *optional*):
                The channel axis of 3-D image arrays / tensors, when the layout rule below would guess wrong.
            text (`str` or `list[str]`, *optional*):
                One text or a batch; `<image>` marks where each image goes, in order.
            videos (*optional*):
                Videos, each filling one `<video>` marker with its frames (see the README's Videos section): per
                sample, in text order, a list of frames, a `(T, H, W, C)` / `(T, C, H, W)` array or tensor, or a file.
            audio (*optional*):
                Ignored, as transformers' processors ignore a modality they have no component for: OpenFlamingo
                reads images, videos and text (a warning says so once).
            num_frames (`int`, *optional*):
                Frames sampled uniformly from each video (videos with fewer keep all theirs). Defaults to
                `processor.num_frames`; `None` means that default. Also accepted in `videos_kwargs`.
            do_sample_frames (`bool`, *optional*):
                `False` takes every frame of each video and needs no `num_frames` (ignoring it, as transformers'
                video processors do); `True` or unset samples `num_frames` frames. Sampling by `fps` is not
                supported: pass `num_frames`.
            max_num_images (`int`, *optional*):
                Pad every sample to this many media slots and return `image_mask` and `frame_mask` (see Returns), so
                that samples processed separately (a pipeline with `batch_size > 1`) stack into one batch.
            padding, truncation, max_length, padding_side, return_tensors, ...:
                Tokenizer arguments. Padding defaults to `"longest"` and `padding_side` to `"left"` (prompts for
                generation); pass `padding_side="right"` for training.

        Rules:
            - Each sample needs exactly as many `<image>` markers as images, else `ValueError` (naming the sample).
            - A text with no marker but with images gets one marker per image prepended (the image comes first, as
              in captioning): `text="A cat"`, one image -> `"<image>A cat"`.
            - Images without text: each sample's text is one `<image>` per image (the zero-shot captioning prompt).
            - Truncation must not separate a marker from its image: if truncating to `max_length` would cut a
              marker, a `ValueError` says which sample, its length, and what to do.

        Images:
            Every image is turned into an 8-bit PIL image before the image processor sees it, so that each input
            type is preprocessed exactly like the equivalent 8-bit PIL image:
            - PIL images: 16-bit modes (`I;16*`, and `I` with values in [0, 65535]) are scaled to 8 bits
              (`round(v / 257)`); mode `F` follows the float rule below. Other modes (`L`, `RGBA`, `LA`, `P`, ...)
              are passed on; the image processor converts them to RGB, compositing transparency onto white.
            - Arrays / tensors: `(H, W)` is gray; `(H, W, C)` or `(C, H, W)` with C = 1 (gray), 3 (RGB) or 4 (RGBA).
              The channel axis is the one of size 1, 3 or 4. When both the first and the last axis could be it
              (an image at most 4 pixels high or wide), numpy arrays are read as `(H, W, C)` (the numpy/PIL
              convention) and torch tensors as `(C, H, W)` (the torchvision convention); pass `input_data_format`
              to say otherwise.
            - Pixel values by dtype: `uint8` as is; `uint16` is 16-bit (scaled by 1/257); `bool` is 0 / 255; other
              integer dtypes must lie in [0, 255]. Floats must be finite and non-negative: if they all lie in
              [0, 1] they are read as [0, 1] (the torchvision `ToTensor` convention) and multiplied by 255, else
              as [0, 255] (so a [0, 255] image that is all <= 1 is read as [0, 1]); values above 255 are refused.
              Floats are rounded to 8 bits. Clamp interpolated float images (which can overshoot [0, 1]) first.
            - Refused with a `ValueError` naming the sample and image: empty images (no pixels), channel counts other
              than 1, 3 or 4, NaN / infinite values, and values outside the ranges above (other dtypes, e.g.
              complex: `TypeError`).

        Returns:
            [`BatchFeature`] with:
            - **input_ids** -- `(batch_size, sequence_length)` token ids.
            - **attention_mask** -- `(batch_size, sequence_length)`, 0 on padding.
            - **pixel_values** -- `(batch_size, max_num_images, num_frames, 3, height, width)`, float; `num_frames`
              is 1 unless there are videos. Rows with fewer media are padded with all-zero images (a row without
              media is all zeros); a sample's k `<image>` markers use its first k slots. Absent when no sample has
              media (unless `max_num_images` is given).
            - **frame_mask** -- `(batch_size, max_num_images, num_frames)` bool, `False` on padding frames and slots:
              returned when some medium has several frames, or with `max_num_images`.
            - **image_mask** -- `(batch_size, max_num_images)` bool, `True` on real media: returned with
              `max_num_images` only (without it the model reads a row's media count from its `<image>` markers).
        """
        # `_merge_kwargs` ranks `padding_side` from the tokenizer's init kwargs above processor defaults, so the
        # left-padding default has to be applied here, where only an explicit user choice can override it.
        if "padding_side" not in kwargs and "padding_side" not in kwargs.get("text_kwargs", {}):
            kwargs["padding_side"] = self.default_padding_side
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def prepare_inputs_layout(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        videos=None,
        audio=None,
        **kwargs: Unpack[OpenFlamingoProcessorKwargs],
    ) -> tuple[list[list[Any]] | None, list[str], None, None]:
        """
        Normalizes the inputs to `(images, text, None, None)`: `text` a list of `batch_size` strings, `images` a list
        of `batch_size` lists of loaded images (`None` when there is no image at all). Applies the no-marker and
        image-only rules and reads image paths.
        """
        if audio is not None:
            # As transformers' base processor does with a modality it has no component for.
            logger.warning_once(
                "OpenFlamingoProcessor ignores `audio`: OpenFlamingo reads images, videos and text only."
            )
        if images is None and text is None and videos is None:
            raise ValueError(
                "OpenFlamingoProcessor needs `images`, `videos`, `text`, or a combination"
                + (" (it ignores `audio`)." if audio is not None else ".")
            )
        max_num_images = _requested_max_num_images(kwargs)

        texts = None if text is None else self._as_text_list(text)
        rows = None if images is None else self._split_images(images, texts)
        video_rows = None if videos is None else self._split_videos(videos, texts)

        if texts is None:
            # Media-only call: the zero-shot caption prompt, one marker per image (and video).
            batch_size = len(rows if rows is not None else video_rows)
            texts = [
                self.image_token * (len(rows[i]) if rows else 0)
                + VIDEO_MARKER * (len(video_rows[i]) if video_rows else 0)
                for i in range(batch_size)
            ]
        else:
            for idx, sample in enumerate(texts):
                # Media but no markers: they come first, as in captioning.
                if video_rows is not None and video_rows[idx] and self._count_markers(sample, VIDEO_MARKER) == 0:
                    texts[idx] = sample = VIDEO_MARKER * len(video_rows[idx]) + sample
                if rows is not None and rows[idx] and self._count_markers(sample) == 0:
                    texts[idx] = self.image_token * len(rows[idx]) + sample

        channel_format = _requested_channel_format(kwargs)
        if rows is not None:
            rows = [
                [self._load_image(image, sample_idx, image_idx, channel_format) for image_idx, image in enumerate(row)]
                for sample_idx, row in enumerate(rows)
            ]
        sampling = self._frame_sampling(kwargs)
        if video_rows is not None or any(self._count_markers(sample, VIDEO_MARKER) for sample in texts):
            rows, texts = self._interleave_videos(rows, video_rows, texts, sampling, channel_format)
        if max_num_images is not None:
            return self._padded_rows(rows, texts, max_num_images, sampling), texts, None, None
        if rows is not None and not any(rows):
            rows = None
        return rows, texts, None, None

    def _frame_sampling(self, kwargs: dict[str, Any]) -> _FrameSampling:
        """
        How frames are taken from each video in this call: `num_frames` of the call (top level or `videos_kwargs`;
        `None` is the default), else `processor.num_frames`; every frame with `do_sample_frames=False`.
        """
        videos_kwargs = kwargs.get("videos_kwargs") or {}

        def requested(name: str) -> Any:
            top, nested = kwargs.get(name), videos_kwargs.get(name)
            if top is not None and nested is not None and top != nested:
                raise ValueError(
                    f"{name} is given twice with different values: {name}={top!r} and "
                    f"videos_kwargs={{{name!r}: {nested!r}}}. Pass it once."
                )
            return top if top is not None else nested

        num_frames, do_sample_frames = requested("num_frames"), requested("do_sample_frames")
        if requested("fps") is not None:
            raise ValueError(
                "OpenFlamingoProcessor samples a fixed number of frames per video, not frames per second: pass "
                "num_frames=N instead of fps."
            )
        if do_sample_frames is False:  # as transformers' video processors: every frame, num_frames unused
            if num_frames is not None:
                logger.warning_once(
                    f"do_sample_frames=False takes every frame of each video: num_frames={num_frames!r} is ignored."
                )
            return _FrameSampling(num_frames=None, every_frame=True)
        if num_frames is None:
            num_frames = self.num_frames
        if num_frames is not None and (
            isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1
        ):
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}.")
        return _FrameSampling(num_frames=num_frames, every_frame=False)

    def _padded_rows(
        self, rows: list[list[Any]] | None, texts: list[str], max_num_images: int, sampling: _FrameSampling
    ) -> _PaddedMediaRows:
        """The media rows of a `max_num_images` call: every sample padded to `max_num_images` slots of at least
        `num_frames` frames (1 for images), whatever its own media."""
        rows = rows if rows is not None else [[] for _ in texts]
        for sample_idx, row in enumerate(rows):
            if len(row) > max_num_images:
                raise ValueError(
                    f"Sample {sample_idx} has {_plural(len(row), 'image')} (videos included) but "
                    f"max_num_images={max_num_images}: raise max_num_images to the largest number of images of a "
                    "sample."
                )
        return _PaddedMediaRows(rows, num_slots=max_num_images, num_frames=sampling.num_frames or 1)

    @staticmethod
    def _as_text_list(text: TextInput | list[TextInput]) -> list[str]:
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and all(isinstance(sample, str) for sample in text):
            if len(text) == 0:
                raise ValueError("`text` is an empty list; pass at least one string.")
            return list(text)
        raise TypeError(
            f"`text` must be a string or a list of strings with `<image>` markers, got {type(text).__name__}"
            + (f" of {sorted({type(s).__name__ for s in text})}" if isinstance(text, (list, tuple)) else "")
            + ". Pre-tokenized input is not supported: pass the raw text."
        )

    @staticmethod
    def _is_image_list(images: Any) -> bool:
        # A 4-D array / tensor is a stack of images, as everywhere in transformers.
        return isinstance(images, (list, tuple)) or (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
        )

    def _split_images(self, images: Any, texts: list[str] | None) -> list[list[Any]]:
        """Turns the accepted `images` layouts into one list of images per sample."""
        if not self._is_image_list(images):
            images = [images]
        images = list(images)

        is_nested = any(self._is_image_list(item) or item is None for item in images)
        if is_nested:
            rows = [[] if item is None else (list(item) if self._is_image_list(item) else [item]) for item in images]
            if texts is not None and len(rows) != len(texts):
                raise ValueError(
                    f"Got {len(rows)} lists of images for {len(texts)} texts. Pass one list of images per text "
                    "(an empty list for a text without images)."
                )
            for sample_idx, row in enumerate(rows):
                for image_idx, item in enumerate(row):
                    if self._is_image_list(item):
                        raise ValueError(
                            f"Sample {sample_idx}, image {image_idx} is itself a list of images: images may be "
                            "nested at most two levels deep (a list of lists, one list per sample)."
                        )
            return rows

        # A flat list: one sample's images, or the images of a batch of texts in order.
        if texts is None or len(texts) == 1:
            return [images]
        counts = [self._count_markers(sample) for sample in texts]
        if sum(counts) == 0:
            if len(images) == len(texts):
                return [[image] for image in images]
            raise ValueError(
                f"Got {len(images)} images for {len(texts)} texts without `{self.image_token}` markers: either pass "
                "one image per text, or a list of lists (one list per text), or put the markers in the texts."
            )
        rows, start = [], 0
        for sample_idx, count in enumerate(counts):
            row = images[start : start + count]
            if len(row) != count:
                raise ValueError(
                    f"Sample {sample_idx} has {_plural(count, f'`{self.image_token}` marker')} but only "
                    f"{_plural(len(row), 'image')} left for it: the texts have {sum(counts)} markers in total "
                    f"({counts} per sample) and {len(images)} images were given. Pass as many images as markers, or "
                    "a list of lists (one list per text)."
                )
            rows.append(row)
            start += count
        if start != len(images):
            raise ValueError(
                f"The texts have {sum(counts)} `{self.image_token}` markers in total ({counts} per sample) but "
                f"{len(images)} images were given. Pass as many images as markers, or a list of lists (one list "
                "per text)."
            )
        return rows

    def _load_image(
        self,
        image: Any,
        sample_idx: int,
        image_idx: int,
        channel_format: ChannelDimension | None = None,
        where: str | None = None,
    ) -> PIL.Image.Image:
        """
        Turns one input image into a PIL image that the image processor preprocesses correctly (see *Images* in
        `__call__`): reads a path / URL / base64 string, scales 16-bit and float pixels to 8 bits, lays arrays out
        as `(H, W, C)`, and refuses what is not a valid image with a message that names it (`where`, default
        "Sample i, image j").
        """
        return load_image_input(image, where or f"Sample {sample_idx}, image {image_idx}", channel_format)

    # ------------------------------------------------------------------------------------------------------------
    # Videos: each one fills one media slot (its `<video>` marker becomes `<image>`) with its sampled frames
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _is_video(item: Any) -> bool:
        return is_video_input(item)

    def _split_videos(self, videos: Any, texts: list[str] | None) -> list[list[Any]]:
        """One list of videos per sample: a video, a list of one sample's videos, or a list of lists."""
        if self._is_video(videos):
            return [[videos]]
        if not isinstance(videos, (list, tuple)):
            raise TypeError(
                f"`videos` must be a video (a file path, a (T, H, W, C) array / tensor or a list of frames), a list of "
                f"videos, or a list of lists of videos (one list per text); got {type(videos).__name__}."
            )
        if all(self._is_video(item) for item in videos):
            if texts is None or len(texts) == 1:
                return [list(videos)]
            counts = [self._count_markers(sample, VIDEO_MARKER) for sample in texts]
            if sum(counts) != len(videos):
                raise ValueError(
                    f"The texts have {sum(counts)} `{VIDEO_MARKER}` markers in total ({counts} per sample) but "
                    f"{len(videos)} videos were given. Pass as many videos as markers, or a list of lists (one list "
                    "per text)."
                )
            starts = np.cumsum([0, *counts])
            return [list(videos[starts[i] : starts[i + 1]]) for i in range(len(texts))]
        rows = []
        for sample_idx, row in enumerate(videos):
            row = [] if row is None else ([row] if self._is_video(row) else row)
            if not isinstance(row, (list, tuple)) or not all(self._is_video(item) for item in row):
                raise TypeError(
                    f"Sample {sample_idx}: `videos` entries must be videos (a file path, a (T, H, W, C) array / tensor "
                    "or a list of frames) or lists of them."
                )
            rows.append(list(row))
        if texts is not None and len(rows) != len(texts):
            raise ValueError(f"Got {len(rows)} lists of videos for {len(texts)} texts: pass one list per text.")
        return rows

    def _interleave_videos(
        self,
        rows: list[list[Any]] | None,
        video_rows: list[list[Any]] | None,
        texts: list[str],
        sampling: _FrameSampling,
        channel_format: ChannelDimension | None = None,
    ) -> tuple[list[list[Any]], list[str]]:
        """Each sample's media in text order (images as they are, videos as `VideoFrames`), `<video>` -> `<image>`."""
        media_rows, new_texts = [], []
        either = re.compile(f"{self._marker_pattern().pattern}|{self._marker_pattern(VIDEO_MARKER).pattern}")
        for sample_idx, sample in enumerate(texts):
            images = list(rows[sample_idx]) if rows is not None else []
            videos = list(video_rows[sample_idx]) if video_rows is not None else []
            num_video_markers = self._count_markers(sample, VIDEO_MARKER)
            if num_video_markers != len(videos):
                raise ValueError(
                    f"Sample {sample_idx} has {_plural(num_video_markers, f'`{VIDEO_MARKER}` marker')} in its text but "
                    f"{_plural(len(videos), 'video')}. Each video needs exactly one marker where it goes."
                )
            media, video_idx = [], 0
            for match in either.finditer(sample):
                if match.group(0) == VIDEO_MARKER:
                    media.append(self._load_video(videos[video_idx], sample_idx, video_idx, sampling, channel_format))
                    video_idx += 1
                elif images:
                    media.append(images.pop(0))
                else:  # too few images: counted and explained by validate_inputs
                    break
            media_rows.append(media + images)
            new_texts.append(self._marker_pattern(VIDEO_MARKER).sub(self.image_token, sample))
        return media_rows, new_texts

    def _load_video(
        self,
        video: Any,
        sample_idx: int,
        video_idx: int,
        sampling: _FrameSampling,
        channel_format: ChannelDimension | None = None,
    ) -> VideoFrames:
        """The frames of one video, sampled uniformly to `sampling.num_frames` (all of them when it has no more, or
        with `do_sample_frames=False`)."""
        where = f"Sample {sample_idx}, video {video_idx}"
        num_frames = sampling.num_frames
        if num_frames is None and not sampling.every_frame:
            raise ValueError(
                f"{where}: the processor does not know how many frames to take from a video (processor.num_frames "
                "is None: the model has no frame embeddings). Pass num_frames=N: the model's "
                "config.perceiver_max_num_frames, or, for a model without frame embeddings, the N frames to flatten "
                "into one media slot as the released models would; or do_sample_frames=False for every frame."
            )
        return load_video_input(video, num_frames, where, channel_format)

    def validate_inputs(
        self,
        images: list[list[Any]] | None = None,
        text: list[str] | None = None,
        videos=None,
        audio=None,
        **kwargs: Unpack[OpenFlamingoProcessorKwargs],
    ) -> None:
        """Checks, per sample, that the number of `<image>` markers equals the number of images."""
        num_images = [len(row) for row in images] if images is not None else [0] * len(text)
        for sample_idx, (sample, count) in enumerate(zip(text, num_images)):
            num_markers = self._count_markers(sample)
            if num_markers != count:
                raise ValueError(
                    f"Sample {sample_idx} has {_plural(num_markers, f'`{self.image_token}` marker')} in its text but "
                    f"{_plural(count, 'image')}. Each image needs exactly one marker where it goes in the text: add "
                    "or remove markers, or pass the matching images."
                )

    def _process_images(self, images: list[list[Any]], **kwargs) -> tuple[dict[str, Any], list[str]]:
        """
        Runs the image processor on all images at once and lays them out as
        `(batch_size, max_num_images, num_frames, 3, height, width)`, zero-padding rows with fewer media and media
        with fewer frames. A `max_num_images` call pads to its slot and frame counts and returns both masks.

        Returns `({"pixel_values": ..., ...}, [])`: no marker replacement, OpenFlamingo keeps one marker per image.
        """
        return_tensors = kwargs.pop("return_tensors", None)
        frames = [list(item) if isinstance(item, VideoFrames) else [item] for row in images for item in row]
        flat = [frame for item in frames for frame in item]
        # Always ask for a stacked torch tensor: the image processor returns a list otherwise.
        processed = self.image_processor(flat or [self._blank_image()], return_tensors="pt", **kwargs)["pixel_values"]
        if not isinstance(processed, torch.Tensor) or processed.ndim != 4:
            raise ValueError(
                "The image processor must return one `(3, height, width)` array per image, all of the same size, to "
                "batch them; got a result that does not stack. Keep `do_center_crop=True` (or resize to a square)."
            )

        padded = isinstance(images, _PaddedMediaRows)
        items = iter(processed.split([len(item) for item in frames]) if flat else ())
        pixel_values, frame_mask = stack_media(
            [[next(items) for _ in row] for row in images],
            like=processed,
            num_slots=images.num_slots if padded else 0,
            num_frames=images.num_frames if padded else 1,
        )
        outputs = {"pixel_values": pixel_values}
        if pixel_values.shape[2] > 1 or padded:  # which frames are real (shorter media are padded with zero frames)
            outputs["frame_mask"] = frame_mask
        if padded:  # which slots are real: the model cannot tell from the markers which slots no row uses
            outputs["image_mask"] = frame_mask.any(dim=-1)
        if return_tensors != "pt":
            outputs = {key: value.numpy() for key, value in outputs.items()}
        return outputs, []

    @staticmethod
    def stack_media(
        rows: list[list[torch.Tensor]], like: torch.Tensor, num_slots: int = 0, num_frames: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        This module's `stack_media`, reachable from a processor instance: `OpenFlamingoPipeline` lays out its batches
        with it but cannot import this module, whose relative path from the pipeline's file differs between the
        package (`processing/`) and a flat remote-code Hub folder.
        """
        return stack_media(rows, like, num_slots=num_slots, num_frames=num_frames)

    @staticmethod
    def _blank_image() -> PIL.Image.Image:
        """A stand-in for the image processor when a `max_num_images` call has no image at all: only the shape of
        its output is used (for the all-zero padding)."""
        return PIL.Image.new("RGB", (8, 8))

    def _check_special_mm_tokens(self, text: list[str], text_inputs: BatchFeature, modalities: list[str]) -> None:
        """Raises if tokenization (i.e. truncation) lost an `<image>` marker, naming the sample."""
        input_ids = text_inputs["input_ids"]
        input_ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        attention_mask = text_inputs.get("attention_mask")
        attention_mask = attention_mask.tolist() if hasattr(attention_mask, "tolist") else attention_mask
        for sample_idx, (sample, ids) in enumerate(zip(text, input_ids)):
            num_markers = self._count_markers(sample)
            num_kept = list(ids).count(self.image_token_id)
            if num_kept == num_markers:
                continue
            kept_length = sum(attention_mask[sample_idx]) if attention_mask is not None else len(ids)
            full_length = len(self.tokenizer(sample)["input_ids"])
            raise ValueError(
                f"Truncation would cut sample {sample_idx}: it is {full_length} tokens long and truncating it to "
                f"{kept_length} tokens keeps only {num_kept} of its {num_markers} `{self.image_token}` markers, which "
                f"would leave images without their marker. Use `max_length >= {full_length}` (or no truncation), "
                "shorten the text, or pass fewer images / demonstrations."
            )

    @property
    def unused_input_names(self) -> list[str]:
        # The model takes no token type ids; some tokenizers return them by default.
        return ["token_type_ids"]

    @property
    def model_input_names(self) -> list[str]:
        """Every input the processor can return for the model: the tokenizer's and the image processor's, the frame
        mask of videos, and the image mask of `max_num_images` calls."""
        names = super().model_input_names
        return names + [name for name in ("frame_mask", "image_mask") if name not in names]

    # ------------------------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------------------------

    def _cut_at_eoc(self, ids: list[int]) -> list[int]:
        """Drops everything from the first `<|endofchunk|>` after the last `<image>` on (rows without images: none)."""
        if self.image_token_id not in ids:
            return ids
        last_image = len(ids) - 1 - ids[::-1].index(self.image_token_id)
        try:
            return ids[: ids.index(self.eoc_token_id, last_image)]
        except ValueError:
            return ids

    def post_process_image_text_to_text(
        self, generated_outputs, skip_special_tokens: bool = True, stop_at_eoc: bool = True, **kwargs
    ) -> list[str] | str:
        """
        Decodes the output of `model.generate` (prompt included), as called by the `image-text-to-text` pipeline.

        Args:
            generated_outputs (`torch.Tensor`, `np.ndarray` or lists of ids):
                `(batch_size, sequence_length)` or `(sequence_length,)` token ids.
            skip_special_tokens (`bool`, *optional*, defaults to `True`):
                Drop special tokens (`<image>`, `<|endofchunk|>`, padding) from the text.
            stop_at_eoc (`bool`, *optional*, defaults to `True`):
                Cut each row at the first `<|endofchunk|>` after its last `<image>`, i.e. at the end of the answer
                to the query (the query ends after its last `<image>` and has no `<|endofchunk|>`, so the prompt
                itself is not cut). A prompt and its generation are cut at the same place, so the decoded prompt
                stays a prefix of the decoded generation, which the pipeline relies on to strip it. Rows without
                `<image>` are not cut.
            **kwargs:
                Passed to the tokenizer's `decode`.

        Returns:
            `list[str]` for a batch, `str` for a single sequence.
        """
        ids = to_py_obj(generated_outputs)
        is_single = len(ids) == 0 or not isinstance(ids[0], (list, tuple))
        rows = [ids] if is_single else ids
        if stop_at_eoc:
            rows = [self._cut_at_eoc(list(row)) for row in rows]
        texts = [self.tokenizer.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in rows]
        return texts[0] if is_single else texts

    def post_process_generation(
        self,
        generated_ids,
        prompt: int | torch.Tensor | np.ndarray | list[list[int]],
        skip_special_tokens: bool = True,
        **kwargs,
    ) -> list[str]:
        """
        Returns only the newly generated text of each row: drops the prompt tokens, cuts at the first
        `<|endofchunk|>` (OpenFlamingo's end of answer) and strips leading whitespace.

        Args:
            generated_ids (`torch.Tensor`, `np.ndarray` or lists of ids):
                `(batch_size, sequence_length)` output of `model.generate`, prompt included (for a left-padded
                batch every row starts with the full padded prompt).
            prompt (`int`, or `(batch_size, prompt_length)` / `(prompt_length,)` ids):
                The prompt's padded length, or the `input_ids` given to `generate` (only their length is used). Use
                `0` if `generated_ids` holds the new tokens only.
            skip_special_tokens (`bool`, *optional*, defaults to `True`):
                Drop special tokens (padding and the like) from the text.
            **kwargs:
                Passed to the tokenizer's `decode`.

        Returns:
            `list[str]`: one answer per row.
        """
        if isinstance(prompt, int):
            prompt_length = prompt
        else:
            prompt_ids = to_py_obj(prompt)
            prompt_length = len(prompt_ids[0]) if prompt_ids and isinstance(prompt_ids[0], list) else len(prompt_ids)
        rows = to_py_obj(generated_ids)
        if len(rows) > 0 and not isinstance(rows[0], (list, tuple)):
            rows = [rows]
        answers = []
        for row in rows:
            new_tokens = list(row[prompt_length:])
            if self.eoc_token_id in new_tokens:
                new_tokens = new_tokens[: new_tokens.index(self.eoc_token_id)]
            answer = self.tokenizer.decode(new_tokens, skip_special_tokens=skip_special_tokens, **kwargs)
            # The first generated token usually carries the space after the prompt ("Output:" -> " two cats").
            answers.append(answer.lstrip())
        return answers


class _FrameSampling(NamedTuple):
    """How a call takes frames from its videos: `num_frames` sampled uniformly, or every frame."""

    num_frames: int | None
    every_frame: bool


class _PaddedMediaRows(list):
    """The media rows of a `max_num_images` call: `_process_images` pads every row to `num_slots` slots of at least
    `num_frames` frames, and returns both masks."""

    def __init__(self, rows: list[list[Any]], num_slots: int, num_frames: int):
        super().__init__(rows)
        self.num_slots, self.num_frames = num_slots, num_frames


def _requested_max_num_images(kwargs: dict[str, Any]) -> int | None:
    value = kwargs.get("max_num_images")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_num_images must be a positive integer, got {value!r}.")
    return value


def _requested_channel_format(kwargs: dict[str, Any]) -> ChannelDimension | None:
    """The `input_data_format` the caller passed to the processor (top level or in `images_kwargs`), if any."""
    value = kwargs.get("input_data_format") or (kwargs.get("images_kwargs") or {}).get("input_data_format")
    return None if value is None else ChannelDimension(value)


def _after_chunk_end_or_before_first_image(input_ids: torch.Tensor, image_id: int, eoc_id: int) -> torch.Tensor:
    """
    True at tokens that no image introduces: before the first `<image>`, or after an `<|endofchunk|>` with no
    `<image>` since (the `<|endofchunk|>` itself is not included).
    """
    marker = torch.where(input_ids == image_id, 1, torch.where(input_ids == eoc_id, 2, 0))
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    # Position of the latest marker strictly before each token (-1: none yet).
    latest = torch.where(marker > 0, positions, -1).cummax(dim=-1).values
    latest_before = torch.cat([torch.full_like(latest[..., :1], -1), latest[..., :-1]], dim=-1)
    kind_before = torch.where(latest_before >= 0, marker.gather(-1, latest_before.clamp(min=0)), 0)
    before_first_image = (input_ids == image_id).long().cumsum(dim=-1) == 0
    return before_first_image | (kind_before == 2)


def stack_media(
    rows: list[list[torch.Tensor]], like: torch.Tensor, num_slots: int = 0, num_frames: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The pixel layout of a batch: `rows[b][m]` is the `(frames, 3, height, width)` tensor of the real frames of media
    `m` of sample `b`. Returns `pixel_values` `(batch, max_media, max_frames, 3, height, width)`, zero on padding
    slots and frames (at least `num_slots` slots and `num_frames` frames), and `frame_mask`
    `(batch, max_media, max_frames)`, `True` on real frames. `like` gives the frame shape and dtype when no row has
    media.
    """
    max_media = max([len(row) for row in rows] + [num_slots])
    max_frames = max([len(item) for row in rows for item in row] + [num_frames])
    pixel_values = like.new_zeros((len(rows), max_media, max_frames, *like.shape[-3:]))
    frame_mask = torch.zeros(pixel_values.shape[:3], dtype=torch.bool)
    for sample_idx, row in enumerate(rows):
        for media_idx, item in enumerate(row):
            pixel_values[sample_idx, media_idx, : len(item)] = item
            frame_mask[sample_idx, media_idx, : len(item)] = True
    return pixel_values, frame_mask


def _text_blocks(text: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text}] if text else []


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


__all__ = ["OpenFlamingoProcessor", "default_image_processor", "load_default_chat_template", "uniform_frame_indices"]
