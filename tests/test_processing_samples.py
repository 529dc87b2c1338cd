"""The processor's training samples (`pair_sample`, `interleaved_sample`, `finetune_sample`), the pixel layout that
the collator shares with it (`stack_media`), and the reading of media inputs (`processing.media_inputs`)."""

from __future__ import annotations

import re

import pytest
import torch

from openflamingo_hf.processing.media_inputs import VideoFrames, load_video_input, read_video_file
from openflamingo_hf.processing.processing_openflamingo import IGNORE_INDEX, OpenFlamingoProcessor, stack_media
from openflamingo_hf.testing_utils import build_tiny_tokenizer, make_image


@pytest.fixture(scope="module")
def processor():
    return OpenFlamingoProcessor(tokenizer=build_tiny_tokenizer())


def reference(processor, images, text, max_length, interleaved=False):
    """What `processor(...)` and `pretraining_labels` give for one sample, right-padded to `max_length`."""
    batch = processor(images=[images], text=[text], padding="max_length", max_length=max_length, truncation=True,
                      padding_side="right", return_tensors="pt")
    labels = processor.pretraining_labels(batch["input_ids"], batch["attention_mask"], interleaved=interleaved)
    return {"input_ids": batch["input_ids"][0], "attention_mask": batch["attention_mask"][0], "labels": labels[0],
            "pixel_values": batch["pixel_values"][0]}


def assert_same(sample, expected):
    assert set(sample.keys()) == set(expected.keys())
    for key, value in expected.items():
        torch.testing.assert_close(sample[key], value, msg=key)


def test_pair_sample_equals_the_processor_call_and_the_recipe_labels(processor):
    image = make_image(0, (40, 30))
    sample = processor.pair_sample(image, "  a cat on a mat ", max_length=16)
    assert_same(sample, reference(processor, [image], processor.pair_text("a cat on a mat"), 16))
    assert sample["input_ids"].shape == (16,) and sample["pixel_values"].shape == (1, 1, 3, 224, 224)
    masked = processor.pair_sample(image, "a cat on a mat", max_length=16, mask_eos=True)
    eos = processor.tokenizer.eos_token_id
    assert (masked["labels"][sample["input_ids"] == eos] == IGNORE_INDEX).all()
    assert (sample["labels"][sample["input_ids"] == eos] == eos).all()


def test_pair_sample_removes_protocol_tokens_written_in_the_caption(processor):
    image, eoc, pad = processor.image_token, processor.eoc_token, processor.tokenizer.pad_token
    assert processor.protocol_tokens_in(f"a {pad}cat{eoc} {image}") == [image, eoc, pad]
    assert processor.protocol_tokens_in("a cat") == []
    sample = processor.pair_sample(make_image(1), f"a {image}cat{eoc}{pad}", max_length=16)
    clean = processor.pair_sample(make_image(1), "a cat", max_length=16)
    assert torch.equal(sample["input_ids"], clean["input_ids"])
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == 1


def test_interleaved_sample_lays_out_only_the_media_whose_markers_truncation_left(processor):
    images = [make_image(seed) for seed in range(3)]
    sentences, on = ["Intro.", "A cat.", "A dog.", "Two birds."], [1, 2, 3]
    full = processor.interleaved_sample(images, sentences, on, max_length=64)
    text = processor.interleaved_text(sentences, on)
    assert_same(full, reference(processor, images, text, 64, interleaved=True))

    ids = processor.tokenizer(text)["input_ids"]
    cut = [index for index, token in enumerate(ids) if token == processor.image_token_id][2]  # before the 3rd marker
    short = processor.interleaved_sample(images, sentences, on, max_length=cut)
    assert short["pixel_values"].shape[0] == 2
    torch.testing.assert_close(short["pixel_values"], full["pixel_values"][:2])
    assert torch.equal(short["input_ids"], full["input_ids"][:cut])
    assert processor.interleaved_sample(images, sentences, on, max_length=1)["pixel_values"].shape[0] == 0


def test_interleaved_sample_with_a_video_matches_the_processor_call(processor):
    frames = VideoFrames(make_image(10 + index) for index in range(3))
    image = make_image(5)
    sample = processor.interleaved_sample([frames, image], ["A clip.", "A cat."], [0, 1], max_length=32)
    text = processor.interleaved_text(["A clip.", "A cat."], [0, 1]).replace(processor.image_token, "<video>", 1)
    batch = processor(images=[[image]], videos=[[list(frames)]], text=[text], num_frames=3, padding="max_length",
                      max_length=32, truncation=True, padding_side="right", return_tensors="pt")
    assert sample["pixel_values"].shape == (2, 3, 3, 224, 224)
    torch.testing.assert_close(sample["pixel_values"], batch["pixel_values"][0])
    assert sample["frame_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(sample["input_ids"], batch["input_ids"][0])


def test_finetune_sample_prompt_and_answer_equal_their_messages(processor):
    images = [make_image(0), make_image(1)]
    prompt = f"{processor.image_token}Output:a cat{processor.eoc_token}{processor.image_token}Output:"
    by_prompt = processor.finetune_sample(images=images, prompt=prompt, answer="a dog", max_length=64)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Output:a cat{processor.eoc_token}"},
                                     {"type": "image"}, {"type": "text", "text": "Output:"}]},
        {"role": "assistant", "content": "a dog"},
    ]
    assert processor.prompt_messages(prompt, "a dog", 2) == messages
    by_messages = processor.finetune_sample(messages, images, max_length=64)
    assert_same(by_prompt, by_messages)
    carrying = by_prompt["input_ids"][by_prompt["labels"] != IGNORE_INDEX].tolist()
    answer_ids = processor.tokenizer("a dog", add_special_tokens=False)["input_ids"] + [processor.eoc_token_id]
    assert carrying == answer_ids
    assert by_prompt["pixel_values"].shape == (2, 1, 3, 224, 224)
    text_only = processor.finetune_sample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}])
    assert text_only["pixel_values"] is None


def test_finetune_sample_errors(processor):
    with pytest.raises(ValueError, match=r"^The prompt has 2 `<image>` markers but the example has 1 images"):
        processor.finetune_sample(images=[make_image(0)], prompt="<image>a<image>b", answer="c")
    with pytest.raises(ValueError, match="either `messages`, or `prompt` and `answer`"):
        processor.finetune_sample(prompt="a")
    with pytest.raises(ValueError, match="no answer token is left after truncating to max_length=3"):
        processor.finetune_sample(prompt="a long prompt here", answer="b", max_length=3)


def test_stack_media_pads_slots_and_frames_with_zeros():
    first = [torch.ones(2, 3, 4, 4), torch.full((1, 3, 4, 4), 2.0)]
    second = [torch.full((3, 3, 4, 4), 3.0)]
    pixel_values, frame_mask = stack_media([first, second, []], like=first[0])
    assert pixel_values.shape == (3, 2, 3, 3, 4, 4)
    assert frame_mask.tolist() == [[[True, True, False], [True, False, False]],
                                   [[True, True, True], [False, False, False]],
                                   [[False, False, False], [False, False, False]]]
    # Real frames in place, zeros everywhere else.
    assert torch.equal(pixel_values[0, 0, :2], first[0]) and torch.equal(pixel_values[1, 0], second[0])
    assert pixel_values[~frame_mask].abs().sum() == 0
    padded, mask = stack_media([[]], like=first[0], num_slots=2, num_frames=4)
    assert padded.shape == (1, 2, 4, 3, 4, 4) and not mask.any()


@pytest.mark.parametrize("kind", ["text", "png"])
def test_a_file_that_is_not_a_video_is_named_with_what_to_pass(processor, tmp_path, kind):
    pytest.importorskip("av")
    path = tmp_path / ("notes.webm" if kind == "text" else "still.png")
    if kind == "text":
        path.write_text("this is not a video\n")
    else:
        make_image(0, (32, 32)).save(path)
    expected = rf"^Sample 0, video 0: {re.escape(str(path))} cannot be read as a video \(.*\); pass a video file"
    with pytest.raises(ValueError, match=expected) as raised:
        read_video_file(str(path), 4, "Sample 0, video 0")
    assert "`images=`" in str(raised.value)
    with pytest.raises(ValueError, match=expected):
        processor(videos=[str(path)], text="<video>", num_frames=4)


def test_load_video_input_refuses_what_is_not_a_video():
    with pytest.raises(TypeError, match=r"^Clip: a video is a file path.*got ndarray of shape \(4, 4, 3\)"):
        load_video_input(torch.zeros(4, 4, 3).numpy(), 2, "Clip")
    with pytest.raises(ValueError, match="Clip has no frames"):
        load_video_input([], 2, "Clip")
