"""OpenFlamingoPipeline stacks rows preprocessed one by one into the layout the processor gives the batch whole."""

import numpy as np
import pytest
import torch
from transformers import pipeline

from openflamingo_hf.pipeline_openflamingo import MEDIA_KEYS, OpenFlamingoPipeline, _RowMedia
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image


@pytest.fixture(scope="module")
def pipe():
    model, processor = build_tiny_model_and_processor("llama")
    return pipeline("image-text-to-text", model=model, processor=processor, pipeline_class=OpenFlamingoPipeline)


def _video(seed: int, num_frames: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(num_frames, 32, 32, 3), dtype=np.uint8)


# Rows with 1, 0 and 2 images, and one video: (images, videos, text).
ROWS = [
    ([make_image(0)], [], "<image>Output:"),
    ([], [], "Question:What is it? Short answer:"),
    ([make_image(1), make_image(2)], [], "<image>a<|endofchunk|><image>Output:"),
    ([], [_video(3, 3)], "<video>Output:"),
]


def _stack(pipe, outputs):
    rows = [_RowMedia({key: out[key] for key in MEDIA_KEYS if key in out}, num_rows=1) for out in outputs]
    num_images = torch.cat([(out["input_ids"] == pipe.processor.image_token_id).sum(dim=-1) for out in outputs])
    return pipe._stack_row_media(rows, num_images)


def _process(processor, rows, **kwargs):
    images, videos, texts = (list(column) for column in zip(*rows))
    return processor(images=images, videos=videos, text=texts, do_sample_frames=False, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("rows", [ROWS[:3], ROWS], ids=["images", "images_and_a_video"])
def test_rows_one_by_one_stack_as_the_whole_batch(pipe, rows):
    whole = _process(pipe.processor, rows)
    stacked = _stack(pipe, [_process(pipe.processor, [row]) for row in rows])
    assert stacked.keys() == {key for key in ("pixel_values", "frame_mask") if key in whole}
    assert ("frame_mask" in stacked) == (rows is ROWS)  # only the video brings several frames
    for key, value in stacked.items():
        assert value.dtype == whole[key].dtype and torch.equal(value, whole[key]), key


def test_slots_beyond_the_largest_marker_count_are_dropped(pipe):
    # A row padded to 4 slots by `max_num_images` (with `frame_mask` / `image_mask`) next to a 2-image row: the batch
    # keeps 2 slots, and the padded row's `frame_mask` makes the batch return one.
    padded = _process(pipe.processor, ROWS[:1], max_num_images=4)
    assert padded["pixel_values"].shape[1] == 4
    stacked = _stack(pipe, [padded, _process(pipe.processor, ROWS[2:3])])
    whole = _process(pipe.processor, [ROWS[0], ROWS[2]])
    assert torch.equal(stacked["pixel_values"], whole["pixel_values"])
    assert torch.equal(stacked["frame_mask"], torch.tensor([[[True], [False]], [[True], [True]]]))


def test_rows_without_markers_stack_nothing(pipe):
    assert _stack(pipe, [_process(pipe.processor, ROWS[1:2])]) == {}
