"""`ImageTextToTextPipeline` that batches rows of any shape and also takes images alone (zero-shot captioning).

Batches: with `batch_size > 1`, transformers' pipelines process every row on its own and collate the rows by
concatenating their `pixel_values`, which only works when all rows hold the same number of images (and frames).
OpenFlamingo rows do not: a few-shot chat, a zero-shot one and a text-only one differ in their image count. This
subclass carries each row's media past the collation and stacks them per batch with the processor's `stack_media`,
which also lays out a batch the processor is given whole: every row padded to the batch's largest image and frame
counts with zero images, a row's k `<image>` markers using its first k slots. So a batch answers exactly as its rows
run one by one. (The stock `pipeline("image-text-to-text")` batches such rows too when every row is padded to the
same count up front: `pipe(chats, batch_size=4, processor_kwargs={"max_num_images": 3})`.)

Images alone: transformers 5 folded the `image-to-text` task into `image-text-to-text`, whose pipeline requires text
with every image. OpenFlamingo's zero-shot caption prompt is just `<image>`, so an image-only call has an obvious
meaning: this subclass gives each image an empty text, which `OpenFlamingoProcessor` turns into `<image>` (its
"images without markers" rule). Everything else — few-shot prompts, chat messages, `generate_kwargs` — is the stock
pipeline.

Use it directly, `pipeline("image-text-to-text", model=model, processor=processor, pipeline_class=OpenFlamingoPipeline)`
(not the `image-to-text` task name: transformers 5 maps it to `image-text-to-text` but logs that with a malformed
logging call, a "--- Logging error ---" traceback on stderr), or through a Hub folder exported with
`openflamingo_hf.export_for_hub`, whose `config.json` names this class for the `image-to-text` task
(`pipeline("image-to-text", model=repo_id, trust_remote_code=True)`: a custom task of the folder, which transformers
looks up before its task-name redirect, so nothing is logged).

This file imports nothing from the `openflamingo_hf` package: it is also shipped in remote-code Hub folders, where the
processor module is its sibling while in the package it is `processing/processing_openflamingo.py`, so no one relative
import names it in both. It reaches the processor's code through `self.processor` instead.
"""

from __future__ import annotations

import torch
from transformers import ImageTextToTextPipeline
from transformers.image_utils import valid_images

# What the processor returns about a row's media; each row carries them to `_forward` in one `_RowMedia`.
MEDIA_KEYS = ("pixel_values", "frame_mask", "image_mask")
_ROW_MEDIA_KEY = "openflamingo_row_media"


class _RowMedia:
    """
    The media tensors of one preprocessed row (or of a batch given whole in one call). Not a tensor, so that the
    pipeline's collation keeps the rows' objects in a list (for `_forward` to stack) instead of concatenating their
    `pixel_values`, which differ in their image and frame counts.
    """

    __slots__ = ("tensors", "num_rows")

    def __init__(self, tensors: dict[str, torch.Tensor], num_rows: int):
        self.tensors, self.num_rows = tensors, num_rows

    def __getstate__(self):  # DataLoader workers pickle the rows
        return self.tensors, self.num_rows

    def __setstate__(self, state):
        self.tensors, self.num_rows = state


def _real_frames(row: _RowMedia, num_slots: int) -> list[list[torch.Tensor]]:
    """
    The real frames of each sample of `row`: `[sample][medium]` a `(frames, 3, H, W)` tensor, for its first `num_slots`
    media (slots beyond the batch's largest `<image>` count are padding in every row). Media without a `frame_mask`
    are all real frames; a row without `pixel_values` gives its samples no media.
    """
    pixels = row.tensors.get("pixel_values")
    if pixels is None:
        return [[] for _ in range(row.num_rows)]
    frame_mask = row.tensors.get("frame_mask")
    if pixels.ndim == 5:  # one frame per image
        pixels = pixels.unsqueeze(2)
        frame_mask = None if frame_mask is None or frame_mask.ndim == 3 else frame_mask.unsqueeze(-1)
    if frame_mask is None:
        frame_mask = torch.ones(pixels.shape[:3], dtype=torch.bool)
    return [
        [medium[real] for medium, real in zip(sample[:num_slots], sample_mask[:num_slots].bool())]
        for sample, sample_mask in zip(pixels, frame_mask)
    ]


class OpenFlamingoPipeline(ImageTextToTextPipeline):
    """
    Image-text-to-text generation whose batches (`batch_size > 1`) may mix rows with any numbers of images, videos
    or none; `pipe(image)` / `pipe([image, ...])` caption each image zero-shot.
    """

    def __call__(self, images=None, text=None, **kwargs):
        if text is None and images is not None and valid_images(images):
            if isinstance(images, (list, tuple)):
                # A list of images is a batch of one-image samples, each captioned on its own.
                images, text = [[image] for image in images], [""] * len(images)
            else:
                text = ""
        return super().__call__(images=images, text=text, **kwargs)

    def preprocess(self, inputs=None, **kwargs):
        model_inputs = super().preprocess(inputs, **kwargs)
        media = {key: model_inputs.pop(key) for key in MEDIA_KEYS if key in model_inputs}
        model_inputs[_ROW_MEDIA_KEY] = _RowMedia(media, num_rows=model_inputs["input_ids"].shape[0])
        return model_inputs

    def _forward(self, model_inputs, generate_kwargs=None):
        media = model_inputs.pop(_ROW_MEDIA_KEY)
        rows = media if isinstance(media, list) else [media]  # a list when the pipeline collated several rows
        input_ids = model_inputs["input_ids"]
        num_images = (input_ids == self.processor.image_token_id).sum(dim=-1)
        for key, value in self._stack_row_media(rows, num_images.cpu()).items():
            model_inputs[key] = value.to(input_ids.device)
        return super()._forward(model_inputs, generate_kwargs)

    def _stack_row_media(self, rows: list[_RowMedia], num_images: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        One batch's `pixel_values` (and `frame_mask`) from its rows' media, laid out by the processor's `stack_media`
        as it lays out a batch given whole: `(batch, max images, max frames, 3, H, W)`, zero images padding each row
        after its own, zero frames each medium after its own. `num_images` (batch,) holds each row's `<image>`
        count: slots beyond the largest one are padding in every row and are dropped, so no `image_mask` is needed
        (the model reads each row's count from its markers). `frame_mask` is returned when some medium has several
        frames or a row brought one.
        """
        num_slots = int(num_images.max()) if num_images.numel() else 0
        given = [row.tensors["pixel_values"] for row in rows if row.tensors.get("pixel_values") is not None]
        if num_slots == 0 or not given:
            return {}  # no row has an <image> marker (rows padded with `max_num_images` may still carry zero images)
        # As many frames as the rows' tensors have, real or padding (5-D pixel values are one frame per image).
        num_frames = max(pixels.shape[2] if pixels.ndim == 6 else 1 for pixels in given)
        samples = [sample for row in rows for sample in _real_frames(row, num_slots)]
        pixel_values, frame_mask = self.processor.stack_media(
            samples, like=given[0], num_slots=num_slots, num_frames=num_frames
        )
        stacked = {"pixel_values": pixel_values}
        if num_frames > 1 or any("frame_mask" in row.tensors for row in rows):
            stacked["frame_mask"] = frame_mask
        return stacked


__all__ = ["OpenFlamingoPipeline"]
