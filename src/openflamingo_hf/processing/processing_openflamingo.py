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

import base64
import json
import os
import re
from importlib import resources
from io import BytesIO
from typing import Any, NamedTuple
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import BatchFeature, PreTrainedTokenizerBase
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    is_valid_image,
    load_image,
)
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import TextInput
from transformers.utils import is_torchvision_available, logging, to_py_obj
from transformers.utils.chat_template_utils import _CONTROL_TOKEN_START

# No import from the rest of the package: this file is also shipped alone in trust_remote_code Hub folders.

logger = logging.get_logger(__name__)

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_EOC_TOKEN = "<|endofchunk|>"
DEFAULT_PAD_TOKEN = "<PAD>"
# Where a video goes in a prompt. Text-level only: the processor turns it into the `<image>` marker (a video takes one
# media slot, with its frames), so the model and tokenizer know a single marker.
VIDEO_MARKER = "<video>"
CHAT_TEMPLATE_RESOURCE = "chat_template.jinja"

# The text after each image in the original's evaluation prompts (DESIGN §6), by task: `{answer}` is the caption,
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
        Labels of the pretraining recipe (the model shifts them itself): the input ids, with -100 on padding and on
        `<image>`; for interleaved documents also on every token before the first `<image>` and on every token after
        an `<|endofchunk|>` up to the next `<image>` (text that no image introduces). `<|endofchunk|>` itself and the
        text after each image carry loss. The original also meant to mask eos but compared ids with a string, so eos
        was trained; `mask_eos=True` masks it.

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
        return labels.masked_fill(masked, -100)

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
        where = where or f"Sample {sample_idx}, image {image_idx}"
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        if isinstance(image, str):
            image = _read_image_source(image, where)
        if not is_valid_image(image):
            raise TypeError(
                f"{where}: unsupported image type {type(image).__module__}.{type(image).__qualname__}. Pass a "
                "PIL.Image.Image, a numpy array or torch tensor of shape (H, W), (H, W, C) or (C, H, W), or a path "
                "to an image file."
            )
        if isinstance(image, PIL.Image.Image):
            return _normalize_pil_image(image, where)
        return _array_to_pil_image(image, where, channel_format)

    # ------------------------------------------------------------------------------------------------------------
    # Videos: each one fills one media slot (its `<video>` marker becomes `<image>`) with its sampled frames
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _is_video(item: Any) -> bool:
        """A video: a file path, a `(T, H, W, C)` / `(T, C, H, W)` array or tensor, or a list of frames."""
        if isinstance(item, (str, os.PathLike)):
            return True
        if isinstance(item, (np.ndarray, torch.Tensor)):
            return item.ndim == 4
        return (
            isinstance(item, (list, tuple))
            and len(item) > 0
            and all(isinstance(f, PIL.Image.Image) or (isinstance(f, (np.ndarray, torch.Tensor)) and f.ndim in (2, 3))
                    for f in item)
        )

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
        """Each sample's media in text order (images as they are, videos as `_VideoFrames`), `<video>` -> `<image>`."""
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
    ) -> _VideoFrames:
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
        if isinstance(video, (str, os.PathLike)):
            frames = _read_video_file(os.fspath(video), num_frames, where)
        else:
            frames = video
            if len(frames) == 0:
                raise ValueError(f"{where} has no frames.")
            if num_frames is not None:
                frames = [frames[int(i)] for i in uniform_frame_indices(len(frames), num_frames)]
        return _VideoFrames(
            self._load_image(frame, sample_idx, video_idx, channel_format, where=f"{where}, frame {frame_idx}")
            for frame_idx, frame in enumerate(frames)
        )

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
        frames = [list(item) if isinstance(item, _VideoFrames) else [item] for row in images for item in row]
        flat = [frame for item in frames for frame in item]
        # Always ask for a stacked torch tensor: the image processor returns a list otherwise.
        processed = self.image_processor(flat or [self._blank_image()], return_tensors="pt", **kwargs)["pixel_values"]
        if not isinstance(processed, torch.Tensor) or processed.ndim != 4:
            raise ValueError(
                "The image processor must return one `(3, height, width)` array per image, all of the same size, to "
                "batch them; got a result that does not stack. Keep `do_center_crop=True` (or resize to a square)."
            )

        padded = isinstance(images, _PaddedMediaRows)
        max_images = max([len(row) for row in images] + ([images.num_slots] if padded else []))
        max_frames = max([len(item) for item in frames] + ([images.num_frames] if padded else [1]))
        pixel_values = processed.new_zeros((len(images), max_images, max_frames, *processed.shape[1:]))
        frame_mask = torch.zeros(pixel_values.shape[:3], dtype=torch.bool)
        start, item_idx = 0, 0
        for sample_idx, row in enumerate(images):
            for media_idx in range(len(row)):
                count = len(frames[item_idx])
                pixel_values[sample_idx, media_idx, :count] = processed[start : start + count]
                frame_mask[sample_idx, media_idx, :count] = True
                start, item_idx = start + count, item_idx + 1
        outputs = {"pixel_values": pixel_values}
        if max_frames > 1 or padded:  # which frames are real (shorter media are padded with zero frames)
            outputs["frame_mask"] = frame_mask
        if padded:  # which slots are real: the model cannot tell from the markers which slots no row uses
            outputs["image_mask"] = frame_mask.any(dim=-1)
        if return_tensors != "pt":
            outputs = {key: value.numpy() for key, value in outputs.items()}
        return outputs, []

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
        Returns only the newly generated text of each row: drops the prompt tokens and cuts at the first
        `<|endofchunk|>` (OpenFlamingo's end of answer).

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
            answers.append(self.tokenizer.decode(new_tokens, skip_special_tokens=skip_special_tokens, **kwargs))
        return answers


# ----------------------------------------------------------------------------------------------------------------
# Video reading: frames sampled uniformly, files through transformers' `load_video`
# ----------------------------------------------------------------------------------------------------------------

class _VideoFrames(list):
    """The loaded frames of one video: one media slot of several frames (a plain list is not a media item)."""


def uniform_frame_indices(total_num_frames: int, num_frames: int) -> np.ndarray:
    """
    Which frames of a `total_num_frames`-frame video to keep: transformers' uniform sampling
    (`video_utils.default_sample_indices_fn`: `arange(num_frames) * total // num_frames`), or every frame when the
    video has no more than `num_frames`.
    """
    if total_num_frames <= num_frames:
        return np.arange(total_num_frames)
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    return default_sample_indices_fn(VideoMetadata(total_num_frames=total_num_frames), num_frames=num_frames)


def _read_video_file(path: str, num_frames: int | None, where: str) -> np.ndarray:
    """(T, H, W, C) uint8 frames of a video file, uniformly sampled to `num_frames` (`None`: every frame), read by
    transformers' `load_video` (PyAV)."""
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no such video file: {path}.")
    from transformers.video_utils import load_video

    try:
        frames, _ = load_video(
            path, backend="pyav",
            sample_indices_fn=lambda metadata, **_: uniform_frame_indices(
                metadata.total_num_frames, metadata.total_num_frames if num_frames is None else num_frames
            ),
        )
    except ImportError as error:
        raise ImportError(f"{where}: reading video files needs PyAV: `pip install av` ({error}).") from error
    except Exception as error:  # noqa: BLE001 (PyAV raises its own error types for unreadable files)
        raise ValueError(f"{where}: cannot read video file {path} ({type(error).__name__}: {error}).") from error
    if len(frames) == 0:
        raise ValueError(f"{where}: video file {path} has no frames.")
    return frames


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


# ----------------------------------------------------------------------------------------------------------------
# Image normalization: every image becomes an 8-bit PIL image before the image processor runs. Its own handling of
# arrays guesses the channel axis (channels first when in doubt), rescales float [0, 1] images by 1/255 a second
# time, and PIL clips 16-bit images to white when converting them to RGB; a PIL image in an 8-bit mode is what every
# image processor backend handles the same, correct way.
# ----------------------------------------------------------------------------------------------------------------

# Channel counts of an image array: gray, RGB, RGBA (as in transformers' `infer_channel_dimension_format` calls).
_CHANNEL_COUNTS = (1, 3, 4)
# 16-bit PIL modes. They, and the 32-bit modes `I` and `F`, are clipped (not scaled) by `Image.convert("RGB")`.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _requested_channel_format(kwargs: dict[str, Any]) -> ChannelDimension | None:
    """The `input_data_format` the caller passed to the processor (top level or in `images_kwargs`), if any."""
    value = kwargs.get("input_data_format") or (kwargs.get("images_kwargs") or {}).get("input_data_format")
    return None if value is None else ChannelDimension(value)


def _read_image_source(source: str, where: str) -> PIL.Image.Image:
    """
    Opens an image file path (or `file://` URL), base64 image data (optionally as a `data:image/...` URL) or an
    http(s) URL.

    Files and base64 data are opened without a mode conversion, so that `_normalize_pil_image` can scale 16-bit
    images instead of PIL clipping them (which `load_image`'s `convert("RGB")` does). URLs are downloaded by
    `load_image`, which returns 8-bit RGB.
    """
    if source.startswith("file://"):
        source = url2pathname(urlparse(source).path)
    try:
        if source.startswith(("http://", "https://")):
            return load_image(source)
        if os.path.isfile(source):
            opened = PIL.Image.open(source)
        else:
            data = source.split(",", 1)[-1] if source.startswith("data:image/") else source
            opened = PIL.Image.open(BytesIO(base64.decodebytes(data.encode())))
        with opened:
            # Decode here (PIL opens lazily), so that a corrupt file gets the message below; `exif_transpose`
            # returns a copy, which outlives the file closed here.
            opened.load()
            return PIL.ImageOps.exif_transpose(opened)
    except Exception as error:
        shown = source if len(source) <= 120 else source[:120] + "..."
        if source.startswith(("http://", "https://")):
            reason = f"could not download {shown!r} ({type(error).__name__}: {error})"
        elif os.path.isfile(source):
            reason = f"{shown!r} exists but is not a readable image file ({type(error).__name__}: {error})"
        else:
            reason = f"there is no image file at {shown!r} (and it is not base64 image data)"
        raise ValueError(
            f"{where}: {reason}. Pass the path of a readable image file, an http(s) URL, base64 image data, or a PIL "
            "image."
        ) from error


def _empty_image_error(where: str, description: str) -> ValueError:
    """The error for an image without pixels (the image processor would fail on it with a `ZeroDivisionError`)."""
    return ValueError(
        f"{where}: the image is empty ({description}). Pass an image at least one pixel wide and high, or leave the "
        "empty image (and its `<image>` marker) out."
    )


def _normalize_pil_image(image: PIL.Image.Image, where: str) -> PIL.Image.Image:
    """Scales a 16-bit / 32-bit PIL image to an 8-bit gray one; returns 8-bit modes unchanged."""
    if image.width == 0 or image.height == 0:
        raise _empty_image_error(where, f"a {image.width}x{image.height} (width x height) PIL image")
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_bit_to_uint8(np.asarray(image))
    elif image.mode == "I":
        gray = _int32_image_to_uint8(np.asarray(image), where)
    elif image.mode == "F":
        gray = _float_to_uint8(np.asarray(image), where)
    else:
        # 8-bit modes (RGB, L, RGBA, LA, P, 1, CMYK, ...): the image processor converts them to RGB itself,
        # compositing transparency onto white.
        return image
    return PIL.Image.fromarray(gray)


def _array_to_pil_image(
    image: np.ndarray | torch.Tensor, where: str, channel_format: ChannelDimension | None
) -> PIL.Image.Image:
    """Turns an `(H, W)`, `(H, W, C)` or `(C, H, W)` array / tensor into an 8-bit L, RGB or RGBA PIL image."""
    is_tensor = isinstance(image, torch.Tensor)
    pixels = _to_numpy(image)
    if pixels.ndim not in (2, 3):
        raise ValueError(
            f"{where}: an image array must have 2 or 3 dimensions ((H, W), (H, W, C) or (C, H, W)), got shape "
            f"{tuple(pixels.shape)}."
        )
    if pixels.size == 0:
        raise _empty_image_error(where, f"an array of shape {tuple(pixels.shape)}")
    if pixels.ndim == 3:
        if _channel_layout(pixels.shape, is_tensor, channel_format, where) == ChannelDimension.FIRST:
            pixels = np.moveaxis(pixels, 0, -1)
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
    # `fromarray` picks L / RGB / RGBA from the uint8 array's shape.
    return PIL.Image.fromarray(np.ascontiguousarray(_pixels_to_uint8(pixels, where)))


def _to_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view / copy of an array or (any device, any float precision) tensor."""
    if isinstance(image, np.ndarray):
        return image
    image = image.detach().cpu()
    # numpy has no bfloat16; float32 holds every half-precision value exactly.
    if image.dtype in (torch.float16, torch.bfloat16):
        image = image.float()
    return image.numpy()


def _channel_layout(
    shape: tuple[int, ...], is_tensor: bool, requested: ChannelDimension | None, where: str
) -> ChannelDimension:
    """
    The channel axis of a 3-D image array: `requested` if given, else the axis of size 1, 3 or 4. When both the
    first and the last axis qualify (an image at most 4 pixels high or wide), numpy arrays are read as (H, W, C),
    the numpy / PIL convention, and torch tensors as (C, H, W), the torchvision convention.
    """
    first_fits, last_fits = shape[0] in _CHANNEL_COUNTS, shape[-1] in _CHANNEL_COUNTS
    if requested is not None:
        channels = shape[0] if requested == ChannelDimension.FIRST else shape[-1]
        if channels not in _CHANNEL_COUNTS:
            raise ValueError(
                f"{where}: with `input_data_format={requested.value!r}` the image array of shape {tuple(shape)} has "
                f"{channels} channels, but an image needs 1 (gray), 3 (RGB) or 4 (RGBA). Check the array's layout "
                "or `input_data_format`."
            )
        return requested
    if first_fits and last_fits:
        return ChannelDimension.FIRST if is_tensor else ChannelDimension.LAST
    if first_fits or last_fits:
        return ChannelDimension.FIRST if first_fits else ChannelDimension.LAST
    raise ValueError(
        f"{where}: cannot find the channel axis of the image array of shape {tuple(shape)}: an image needs 1 "
        f"(gray), 3 (RGB) or 4 (RGBA) channels, on its first axis (C, H, W) or its last axis (H, W, C), but these "
        f"axes have {shape[0]} and {shape[-1]} entries. Convert it to gray, RGB or RGBA first."
    )


def _pixels_to_uint8(pixels: np.ndarray, where: str) -> np.ndarray:
    """8-bit pixel values for an `(H, W)` / `(H, W, C)` array of any supported dtype (rules: see `__call__`)."""
    kind = pixels.dtype.kind
    if kind == "b":
        return pixels.astype(np.uint8) * 255
    if kind == "u" and pixels.dtype.itemsize == 1:
        return pixels
    if kind == "u" and pixels.dtype.itemsize == 2:
        return _sixteen_bit_to_uint8(pixels)
    if kind in "ui":
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{where}: an image of dtype {pixels.dtype} must have pixel values in [0, 255], got [{low}, {high}]. "
                "Pass 16-bit images as uint16, or scale the image to [0, 255]."
            )
        return pixels.astype(np.uint8)
    if kind == "f":
        return _float_to_uint8(pixels, where)
    raise TypeError(
        f"{where}: unsupported pixel dtype {pixels.dtype}. Pass uint8 pixels in [0, 255], uint16 (16-bit) pixels, "
        "or float pixels in [0, 1] or [0, 255]."
    )


def _sixteen_bit_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scales 16-bit values [0, 65535] to [0, 255], rounding to nearest (65535 / 255 = 257 exactly)."""
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _int32_image_to_uint8(pixels: np.ndarray, where: str) -> np.ndarray:
    """A PIL mode `I` image (32-bit integers, e.g. some 16-bit PNGs) holding 16-bit values, scaled to 8 bits."""
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise ValueError(
            f"{where}: a PIL image of mode 'I' is read as 16-bit, with values in [0, 65535], but has values in "
            f"[{low}, {high}]. Scale it to 16 bits (mode 'I;16') or 8 bits (mode 'L') first."
        )
    return _sixteen_bit_to_uint8(pixels)


def _float_to_uint8(pixels: np.ndarray, where: str) -> np.ndarray:
    """
    Float pixels to 8 bits: values all in [0, 1] are read as [0, 1], else as [0, 255]. NaN / infinite, negative
    (e.g. already normalized pixel values) and > 255 values are refused rather than silently clipped.
    """
    pixels = pixels.astype(np.float64)
    num_non_finite = int(np.count_nonzero(~np.isfinite(pixels)))
    if num_non_finite:
        raise ValueError(
            f"{where}: the image has NaN or infinite pixel values ({num_non_finite} of {pixels.size}). Pass an image "
            "with finite pixel values."
        )
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"{where}: float pixel values must lie in [0, 1] or [0, 255], got [{low:g}, {high:g}]. Pass the raw image "
            "(not normalized pixel values), clamped to its range (e.g. `image.clamp(0, 1)`)."
        )
    scale = 255.0 if high <= 1.0 else 1.0
    return np.rint(pixels * scale).astype(np.uint8)


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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


__all__ = ["OpenFlamingoProcessor", "default_image_processor", "load_default_chat_template"]
