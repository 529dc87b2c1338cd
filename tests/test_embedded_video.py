"""The shipped video variant of the embedded model (trained by examples/train_embedded_video.py) on held-out clips."""


import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf.embedded import (
    CLIP_MAX_NEW_TOKENS,
    EMBEDDED_VIDEO_MODEL_DIR,
    caption_clips,
    caption_direction,
    evaluate_embedded_clips,
    load_embedded_video_model,
)
from openflamingo_hf.embedded.world import (
    CLIP_FRAMES,
    HELD_OUT_SEED_START,
    OPPOSITE_DIRECTIONS,
    make_clips,
    reverse_clip,
)

HELD_OUT_SEED = HELD_OUT_SEED_START + 4343  # training draws its clips far below the held-out seeds
GREEDY = {"max_new_tokens": CLIP_MAX_NEW_TOKENS, "do_sample": False}

def test_a_reversed_clip_shows_the_opposite_direction():
    clip = make_clips(1, HELD_OUT_SEED)[0]
    backward = reverse_clip(clip)
    assert backward.direction == OPPOSITE_DIRECTIONS[clip.direction] != clip.direction
    assert backward.caption == clip.caption.replace(clip.direction, backward.direction)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(backward.frames, clip.frames[::-1]))
    assert caption_direction(clip.caption) == clip.direction and caption_direction("two red circles.") is None


def test_the_video_loader_says_how_to_get_a_missing_model(tmp_path, monkeypatch):
    import openflamingo_hf.embedded as embedded

    monkeypatch.setattr(embedded, "EMBEDDED_VIDEO_MODEL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train_embedded_video.py"):
        load_embedded_video_model()


@pytest.fixture(scope="module")
def video_pipeline():
    torch.manual_seed(0)
    return pipeline("image-text-to-text", model=EMBEDDED_VIDEO_MODEL_DIR, dtype=torch.float32)


@pytest.fixture(scope="module")
def clips():
    return make_clips(40, HELD_OUT_SEED)


def _pipeline_captions(pipe, clips) -> list[str]:
    """Zero-shot captions through chat messages with a video block (the clip's frames, in memory)."""
    chats = [[{"role": "user", "content": [{"type": "video", "video": clip.frames}]}] for clip in clips]
    results = pipe(text=chats, generate_kwargs=GREEDY, return_full_text=False)
    return [result[0]["generated_text"].strip() for result in results]


def test_the_folder_loads_with_the_auto_classes_and_has_frame_embeddings():
    model = AutoModelForImageTextToText.from_pretrained(EMBEDDED_VIDEO_MODEL_DIR)
    processor = AutoProcessor.from_pretrained(EMBEDDED_VIDEO_MODEL_DIR)
    assert model.config.perceiver_max_num_frames == CLIP_FRAMES
    assert processor.num_frames == CLIP_FRAMES  # videos need no num_frames argument
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def test_held_out_clips_are_captioned_through_the_pipeline(video_pipeline, clips):
    captions = _pipeline_captions(video_pipeline, clips)
    exact = sum(c == clip.caption for c, clip in zip(captions, clips)) / len(clips)
    direction = sum(caption_direction(c) == clip.direction for c, clip in zip(captions, clips)) / len(clips)
    assert exact >= 0.8, list(zip(captions, [clip.caption for clip in clips]))
    assert direction >= 0.8


def test_the_pipeline_answers_as_caption_clips(video_pipeline, clips):
    model, processor = load_embedded_video_model()
    assert _pipeline_captions(video_pipeline, clips[:6]) == caption_clips(clips[:6], model, processor)


def test_reversing_the_frames_reverses_the_predicted_direction(clips):
    """The direction is read from the frames' order: played backwards, a clip moving left is captioned as moving
    right (and up as down)."""
    forward = [caption_direction(c) for c in caption_clips(clips)]
    backward = [caption_direction(c) for c in caption_clips([reverse_clip(clip) for clip in clips])]
    flipped = sum(f is not None and b == OPPOSITE_DIRECTIONS[f] for f, b in zip(forward, backward)) / len(clips)
    assert flipped >= 0.75


def test_evaluate_embedded_clips_scores_the_shipped_variant():
    scores = evaluate_embedded_clips(num_examples=12)
    assert set(scores) == {"clip_caption_exact", "clip_direction", "clip_reversed_direction"}
    assert scores["clip_direction"] >= 0.6 and scores["clip_reversed_direction"] >= 0.6
