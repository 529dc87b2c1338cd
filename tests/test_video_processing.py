"""Videos in the processor: one media slot of uniformly sampled frames, mixed with images, padded with a mask."""

import numpy as np
import pytest
import torch
from PIL import Image

from openflamingo_hf import OpenFlamingoProcessor
from openflamingo_hf.processing.processing_openflamingo import uniform_frame_indices
from openflamingo_hf.testing_utils import build_tiny_model_and_processor


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model_and_processor("llama")[1]


def _frames(count: int, size: int = 40) -> list:
    """Solid frames whose grey level is their index x 20: which frame was kept is visible in the pixels."""
    return [Image.fromarray(np.full((size, size, 3), 20 * i, dtype=np.uint8)) for i in range(count)]


def _pixels(processor, images) -> torch.Tensor:
    """The processor's pixels of `images` taken as separate images (the independent reference)."""
    return processor(images=[images], return_tensors="pt")["pixel_values"][0, :, 0]


def test_uniform_sampling_equals_the_hand_computed_indices():
    assert uniform_frame_indices(10, 4).tolist() == [0, 2, 5, 7]  # arange(4) * 10 // 4
    assert uniform_frame_indices(9, 3).tolist() == [0, 3, 6]
    assert uniform_frame_indices(3, 8).tolist() == [0, 1, 2]  # a shorter video keeps every frame


def test_mixed_image_and_video_batch(processor):
    frames = _frames(10)
    image = Image.fromarray(np.full((40, 40, 3), 250, dtype=np.uint8))
    out = processor(
        images=[[image], []], videos=[[frames], [frames[:2]]],
        text=["<image>Output:a<|endofchunk|><video>Output:", "<video>Output:"], num_frames=4, return_tensors="pt",
    )
    assert out["pixel_values"].shape[:3] == (2, 2, 4) and out["frame_mask"].dtype == torch.bool
    assert out["frame_mask"].tolist() == [[[True, False, False, False], [True, True, True, True]],
                                          [[True, True, False, False], [False, False, False, False]]]
    pixels = out["pixel_values"]
    torch.testing.assert_close(pixels[0, 0, 0], _pixels(processor, [image])[0])
    torch.testing.assert_close(pixels[0, 1], _pixels(processor, [frames[i] for i in (0, 2, 5, 7)]))
    torch.testing.assert_close(pixels[1, 0, :2], _pixels(processor, frames[:2]))
    assert not pixels[0, 0, 1:].any() and not pixels[1, 0, 2:].any() and not pixels[1, 1].any()
    # `<video>` became the model's one marker.
    image_id = processor.image_token_id
    assert [int((row == image_id).sum()) for row in out["input_ids"]] == [2, 1]


def test_video_layouts_are_the_same_video(processor, tmp_path):
    frames = _frames(6)
    array = np.stack([np.asarray(f) for f in frames])  # (T, H, W, C)
    expected = processor(videos=[frames], text="<video>", num_frames=3, return_tensors="pt")["pixel_values"]
    for video in (array, torch.from_numpy(array), torch.from_numpy(array).permute(0, 3, 1, 2)):
        got = processor(videos=[video], text="<video>", num_frames=3, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(got, expected)
    # Videos without text: the zero-shot prompt, one marker each; the processor's own num_frames.
    processor.num_frames = 3
    try:
        alone = processor(videos=[frames], return_tensors="pt")
    finally:
        processor.num_frames = None
    torch.testing.assert_close(alone["pixel_values"], expected)


def test_video_file_is_read_and_sampled(processor, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in _frames(8, size=32):
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = processor(videos=[str(path)], text="<video>Output:", num_frames=4, return_tensors="pt")
    assert out["pixel_values"].shape[:3] == (1, 1, 4) and out["frame_mask"].all()
    # Frames 0, 2, 4, 6 (lossy codec: compare mean grey levels, 20 apart per frame).
    reference = _pixels(processor, [_frames(8, size=32)[i] for i in (0, 2, 4, 6)])
    assert torch.allclose(out["pixel_values"][0, 0].mean(dim=(1, 2, 3)), reference.mean(dim=(1, 2, 3)), atol=0.05)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(videos=[_frames(3)], text="<video><video>", num_frames=2), ValueError,
         r"Sample 0 has 2 `<video>` markers in its text but 1 video"),
        (dict(videos=[_frames(3)], text="<video>"), ValueError, r"Sample 0, video 0: .*num_frames=N"),
        (dict(videos=["missing.mp4"], text="<video>", num_frames=2), ValueError, r"Sample 0, video 0: no such video"),
        (dict(videos=[[_frames(2)], [_frames(2)]], text=["<video>"], num_frames=2), ValueError,
         r"2 lists of videos for 1 texts"),
        (dict(videos=[_frames(2)], text="<video>", num_frames=0), ValueError, r"num_frames must be a positive"),
        (dict(videos=[[np.zeros((2, 2, 5, 5))]], text="<video>", num_frames=2), ValueError,
         r"Sample 0, video 0, frame 0"),
    ],
)
def test_video_errors_name_the_sample(processor, kwargs, error, message):
    with pytest.raises(error, match=message):
        processor(return_tensors="pt", **kwargs)


def test_num_frames_is_saved_with_the_processor(processor, tmp_path):
    saved = OpenFlamingoProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                  num_frames=4)
    saved.save_pretrained(tmp_path)
    assert OpenFlamingoProcessor.from_pretrained(tmp_path).num_frames == 4


def test_chat_template_places_videos(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Output:a"}]},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Output:"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<image>Output:ab<|endofchunk|><video>Output:"


def test_input_data_format_applies_to_video_frames(processor):
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, size=(2, 3, 4, 4), dtype=np.uint8)  # tiny frames: the layout rule alone would say HWC
    got = processor(videos=[chw], text="<video>", num_frames=2, input_data_format="channels_first",
                    return_tensors="pt")["pixel_values"][0, 0]
    expected = _pixels(processor, [Image.fromarray(frame.transpose(1, 2, 0)) for frame in chw])
    torch.testing.assert_close(got, expected)
