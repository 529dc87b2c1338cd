"""Batching of tokenized OpenFlamingo samples for `Trainer`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from ..processing.processing_openflamingo import IGNORE_INDEX, stack_media

# Key under which samples report what their data pipeline skipped before them (reason -> count); the collator sums it
# per batch and `OpenFlamingoTrainer` adds it up over the run (see `openflamingo_hf.trainer.shard_reading`).
SKIPPED_KEY = "skipped"


@dataclass
class OpenFlamingoDataCollator:
    """
    Pads a list of samples into a batch (right padding, for training).

    Each sample is a dict with `input_ids` (seq_len,), optional `attention_mask` (seq_len,) and `labels` (seq_len,)
    (`IGNORE_INDEX` where no loss is wanted; computed by the processor's sample methods), optional `pixel_values`
    (num_images, num_frames, 3, H, W) with an optional `frame_mask` (num_images, num_frames) for videos, and
    optional `skipped` counts.

    Returns:
        `input_ids`, `attention_mask`, `labels` (batch, max_len); `pixel_values` (batch, max_images, max_frames, 3,
        H, W) with zero images / frames where a sample has fewer (a row's k `<image>` tokens use its first k
        slots); `frame_mask` (batch, max_images, max_frames) when any media has several frames (False on padding
        frames, which the model then never attends); `skipped` (reason -> count) when any sample carries counts.

    Args:
        pad_token_id: the pad id of the processor's tokenizer.
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly lengths).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("Cannot collate an empty list of samples.")
        batch = self._pad_text(samples)
        batch.update(self._pad_media(samples))
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
        labels = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
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
    def _pad_media(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """
        `pixel_values` laid out by the processor's `stack_media` from each sample's real frames (its `frame_mask`, or
        all frames of its `pixel_values`), and `frame_mask` when any media has several frames; nothing when no sample
        has media.
        """
        rows, present = [], []
        for row, sample in enumerate(samples):
            image = sample.get("pixel_values")
            image = None if image is None else torch.as_tensor(image)
            if image is not None and image.ndim != 5:
                raise ValueError(
                    f"Sample {row}: pixel_values must be (num_images, num_frames, 3, H, W), got {tuple(image.shape)}."
                )
            if image is None or image.numel() == 0:
                rows.append([])
                continue
            own = sample.get("frame_mask")
            own = torch.ones(image.shape[:2], dtype=torch.bool) if own is None else torch.as_tensor(own).bool()
            rows.append([media[mask] for media, mask in zip(image, own)])
            present.append(image)
        if not present:
            return {}
        # Slots and frames as many as the samples' own tensors have, whether real or padding.
        pixel_values, frame_mask = stack_media(
            rows,
            like=present[0],
            num_slots=max(image.shape[0] for image in present),
            num_frames=max(image.shape[1] for image in present),
        )
        media = {"pixel_values": pixel_values}
        if pixel_values.shape[2] > 1:  # some media has several frames: which of them are real
            media["frame_mask"] = frame_mask
        return media


__all__ = ["OpenFlamingoDataCollator", "SKIPPED_KEY"]
