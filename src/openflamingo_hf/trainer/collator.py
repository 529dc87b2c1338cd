"""Batching of tokenized OpenFlamingo samples for `Trainer`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

# Key under which samples report what their data pipeline skipped before them (reason -> count); the collator sums it
# per batch and `OpenFlamingoTrainer` adds it up over the run (see `openflamingo_hf.trainer.data`).
SKIPPED_KEY = "skipped"


@dataclass
class OpenFlamingoDataCollator:
    """
    Pads a list of samples into a batch (right padding, for training).

    Each sample is a dict with `input_ids` (seq_len,), optional `attention_mask` (seq_len,) and `labels` (seq_len,)
    (-100 where no loss is wanted; computed by the data pipeline through the processor), optional `pixel_values`
    (num_images, num_frames, 3, H, W) with an optional `frame_mask` (num_images, num_frames) for videos, and
    optional `skipped` counts.

    Returns:
        `input_ids`, `attention_mask`, `labels` (batch, max_len); `pixel_values` (batch, max_images, max_frames, 3,
        H, W) with zero images / frames where a sample has fewer (a row's k `<image>` tokens use its first k
        slots); `frame_mask` (batch, max_images, max_frames) when any media has several frames (False on padding
        frames, which the model then never attends); `skipped` (reason -> count) when any sample carries counts.

    Args:
        pad_token_id: the tokenizer's pad id (`processor.tokenizer.pad_token_id`).
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly lengths).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("Cannot collate an empty list of samples.")
        batch = self._pad_text(samples)
        pixel_values = self._pad_images(samples)
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
            if pixel_values.shape[2] > 1:
                batch["frame_mask"] = self._frame_mask(samples, pixel_values.shape[:3])
        skipped = Counter()
        for sample in samples:
            for reason, count in (sample.get(SKIPPED_KEY) or {}).items():
                if count is not None:
                    skipped[reason] += int(count)  # plain ints, also when a dataset format made them tensors
        skipped = +skipped  # drop zero counts
        if skipped:
            batch[SKIPPED_KEY] = dict(skipped)
        return batch

    def _pad_text(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(sample["input_ids"], dtype=torch.long) for sample in samples]
        length = max(len(row) for row in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        has_labels = "labels" in samples[0]
        labels = torch.full((len(ids), length), -100, dtype=torch.long) if has_labels else None
        for row, (sample, row_ids) in enumerate(zip(samples, ids)):
            n = len(row_ids)
            input_ids[row, :n] = row_ids
            mask = sample.get("attention_mask")
            attention_mask[row, :n] = torch.as_tensor(mask, dtype=torch.long) if mask is not None else 1
            if has_labels:
                if "labels" not in sample:
                    raise ValueError(f"Sample {row} has no labels but sample 0 has: give all samples labels or none.")
                labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if has_labels:
            batch["labels"] = labels
        return batch

    @staticmethod
    def _pad_images(samples: list[dict[str, Any]]) -> torch.Tensor | None:
        images = [sample.get("pixel_values") for sample in samples]
        images = [None if image is None else torch.as_tensor(image) for image in images]
        present = [image for image in images if image is not None and image.numel() > 0]
        if not present:
            return None
        for row, image in enumerate(images):
            if image is not None and image.ndim != 5:
                raise ValueError(
                    f"Sample {row}: pixel_values must be (num_images, num_frames, 3, H, W), got {tuple(image.shape)}."
                )
        max_images = max(image.shape[0] for image in present)
        max_frames = max(image.shape[1] for image in present)
        out = present[0].new_zeros((len(samples), max_images, max_frames, *present[0].shape[2:]))
        for row, image in enumerate(images):
            if image is not None and image.numel() > 0:
                out[row, : image.shape[0], : image.shape[1]] = image
        return out

    @staticmethod
    def _frame_mask(samples: list[dict[str, Any]], shape: torch.Size) -> torch.Tensor:
        """True for each sample's real frames: its own `frame_mask`, or all frames of its `pixel_values`."""
        mask = torch.zeros(shape, dtype=torch.bool)
        for row, sample in enumerate(samples):
            image = sample.get("pixel_values")
            if image is None or torch.as_tensor(image).numel() == 0:
                continue
            own = sample.get("frame_mask")
            own = torch.ones(torch.as_tensor(image).shape[:2], dtype=torch.bool) if own is None else own
            own = torch.as_tensor(own, dtype=torch.bool)
            mask[row, : own.shape[0], : own.shape[1]] = own
        return mask


__all__ = ["OpenFlamingoDataCollator", "SKIPPED_KEY"]
