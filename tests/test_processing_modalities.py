"""OpenFlamingoProcessor's modalities and video settings as transformers' processors have them: absent modalities
(audio) ignored, every returned input named in `model_input_names`, `do_sample_frames=False` for every frame,
`num_frames` a saved default that a call overrides, and `max_num_images` padding for rows processed one by one."""

import numpy as np
import pytest
import torch
from PIL import Image

from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = build_tiny_model_and_processor("llama")
    with torch.no_grad():  # open the gates, so that the images change the outputs
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    return model.eval(), processor


@pytest.fixture
def processor(model_and_processor):
    processor = model_and_processor[1]
    saved = processor.num_frames
    yield processor
    processor.num_frames = saved


def _frames(count: int, size: int = 40) -> list:
    """Solid frames whose grey level is their index x 20: which frames were kept is visible in the pixels."""
    return [Image.fromarray(np.full((size, size, 3), 20 * i, dtype=np.uint8)) for i in range(count)]


def _as_images(processor, frames) -> torch.Tensor:
    return processor(images=[frames], return_tensors="pt")["pixel_values"][0, :, 0]


# ----------------------------------------------------------------------------------------------------------------------
# Absent modalities and model_input_names
# ----------------------------------------------------------------------------------------------------------------------


def test_audio_is_ignored_as_transformers_processors_ignore_a_modality_they_lack(processor):
    image = make_image(0)
    without = processor(images=[image], text="<image>Output:", return_tensors="pt")
    with_audio = processor(images=[image], text="<image>Output:", audio=np.zeros(16000, dtype=np.float32),
                           return_tensors="pt")
    assert with_audio.keys() == without.keys()
    for key in without:
        assert torch.equal(with_audio[key], without[key])
    with pytest.raises(ValueError, match="ignores `audio`"):
        processor(audio=np.zeros(16000, dtype=np.float32))


def test_model_input_names_name_everything_the_processor_returns(model_and_processor, processor):
    model = model_and_processor[0]
    processor.num_frames = 3
    outputs = [
        processor(images=[[make_image(0)]], text=["<image>Output:"], return_tensors="pt"),
        processor(images=[[make_image(1)], []], videos=[[], [_frames(3)]], text=["<image>a", "<video>b"],
                  return_tensors="pt"),
        processor(images=[[make_image(2)]], text=["<image>Output:"], max_num_images=2, return_tensors="pt"),
    ]
    assert {"frame_mask", "image_mask", "pixel_values", "input_ids", "attention_mask"} <= set(
        processor.model_input_names
    )
    for inputs in outputs:
        assert set(inputs) <= set(processor.model_input_names)
        # Keeping only the named inputs (as a trainer or collator filtering by name does) changes nothing.
        named = {key: value for key, value in inputs.items() if key in processor.model_input_names}
        with torch.no_grad():
            assert torch.equal(model(**named).logits, model(**inputs).logits)


# ----------------------------------------------------------------------------------------------------------------------
# Frames: do_sample_frames and num_frames
# ----------------------------------------------------------------------------------------------------------------------


def test_do_sample_frames_false_takes_every_frame_and_needs_no_num_frames(processor):
    processor.num_frames = None
    frames = _frames(5)
    out = processor(videos=[frames], text="<video>", do_sample_frames=False, return_tensors="pt")
    assert out["pixel_values"].shape[:3] == (1, 1, 5)
    assert torch.equal(out["pixel_values"][0, 0], _as_images(processor, frames))
    # The saved default does not apply either: every frame is every frame.
    processor.num_frames = 2
    assert processor(videos=[frames], text="<video>", videos_kwargs={"do_sample_frames": False},
                     return_tensors="pt")["pixel_values"].shape[:3] == (1, 1, 5)
    # Through a chat, as the image-text-to-text pipeline calls it.
    messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "Output:"}]}]
    chat = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                         processor_kwargs={"do_sample_frames": False})
    assert chat["pixel_values"].shape[:3] == (1, 1, 5)


def test_do_sample_frames_false_reads_every_frame_of_a_file(processor, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in _frames(6, size=32):
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    processor.num_frames = None
    out = processor(videos=[str(path)], text="<video>", do_sample_frames=False, return_tensors="pt")
    assert out["pixel_values"].shape[:3] == (1, 1, 6) and out["frame_mask"].all()


def test_do_sample_frames_false_wins_over_num_frames_as_in_transformers_video_processors(processor):
    """transformers' video processors sample only with do_sample_frames; apply_chat_template (and the server) may
    pass a num_frames of their own along with a user's do_sample_frames=False."""
    out = processor(videos=[_frames(5)], text="<video>", do_sample_frames=False, num_frames=3, return_tensors="pt")
    assert out["pixel_values"].shape[:3] == (1, 1, 5)


def test_num_frames_is_a_saved_default_that_a_call_overrides(processor):
    frames = _frames(8)
    processor.num_frames = 4

    def count(**kwargs):
        return processor(videos=[frames], text="<video>", return_tensors="pt", **kwargs)["pixel_values"].shape[2]

    assert count() == 4
    assert count(num_frames=2) == 2 and processor.num_frames == 4  # for that call only
    assert count(videos_kwargs={"num_frames": 2}) == 2
    assert count(num_frames=None) == 4  # None is "the default", as everywhere in transformers
    assert count() == 4
    with pytest.raises(ValueError, match="given twice"):
        count(num_frames=2, videos_kwargs={"num_frames": 3})


def test_fps_sampling_is_refused_rather_than_ignored(processor):
    processor.num_frames = 2
    with pytest.raises(ValueError, match="pass num_frames=N instead of fps"):
        processor(videos=[_frames(8)], text="<video>", fps=1)


# ----------------------------------------------------------------------------------------------------------------------
# max_num_images: rows processed one by one stack into a batch
# ----------------------------------------------------------------------------------------------------------------------


def test_max_num_images_gives_every_row_the_same_shapes(processor):
    rows = [([make_image(0)], "<image>a"), ([], "text only"), ([make_image(1), make_image(2)], "<image>b<image>c")]
    outputs = [processor(images=[images], text=[text], max_num_images=3, return_tensors="pt") for images, text in rows]
    for (images, _), out in zip(rows, outputs):
        assert out["pixel_values"].shape[:3] == (1, 3, 1)
        assert out["image_mask"].tolist() == [[index < len(images) for index in range(3)]]
        assert out["frame_mask"][..., 0].tolist() == out["image_mask"].tolist()
        assert not out["pixel_values"][0, len(images):].any()  # padding slots are zero images
    with pytest.raises(ValueError, match=r"Sample 0 has 2 images .* max_num_images=1"):
        processor(images=[[make_image(1), make_image(2)]], text=["<image>b<image>c"], max_num_images=1)


def test_max_num_images_answers_as_the_unpadded_batch(model_and_processor):
    """Padding slots (even beyond every row's count) are never attended: the same logits and generations."""
    model, processor = model_and_processor
    images = [[make_image(0), make_image(1)], [], [make_image(2)]]
    texts = ["<image>a cat<|endofchunk|><image>Output:", "Output:", "<image>Output:"]
    plain = processor(images=images, text=texts, return_tensors="pt")
    padded = processor(images=images, text=texts, max_num_images=4, return_tensors="pt")
    assert padded["pixel_values"].shape[1] == 4 and plain["pixel_values"].shape[1] == 2
    with torch.no_grad():
        assert torch.allclose(model(**padded).logits, model(**plain).logits, atol=1e-5)
        greedy = {"max_new_tokens": 5, "do_sample": False}
        assert torch.equal(model.generate(**padded, **greedy), model.generate(**plain, **greedy))
