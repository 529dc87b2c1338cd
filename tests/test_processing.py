"""Tests of OpenFlamingoProcessor against hand-built expectations (offline: tiny in-process tokenizer)."""

import re

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CLIPImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from openflamingo_hf.modeling.configuration_openflamingo import OpenFlamingoConfig
import openflamingo_hf  # noqa: F401  (registers AutoProcessor)
from openflamingo_hf.processing.processing_openflamingo import OpenFlamingoProcessor
from openflamingo_hf.testing_utils import EOS_TOKEN, build_tiny_tokenizer, make_image

IMAGE, EOC, PAD = "<image>", "<|endofchunk|>", "<PAD>"


@pytest.fixture
def processor() -> OpenFlamingoProcessor:
    return OpenFlamingoProcessor(tokenizer=build_tiny_tokenizer())


@pytest.fixture(scope="module")
def images() -> list:
    return [make_image(seed) for seed in range(5)]


def reference_image_processor():
    """Built independently of the processor: the OpenAI CLIP settings the original OpenFlamingo used."""
    return CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def expected_ids(processor: OpenFlamingoProcessor, text: str) -> list[int]:
    """Tokenizes the text between the markers on its own and puts the marker ids in between by hand."""
    special = {IMAGE: processor.image_token_id, EOC: processor.eoc_token_id}
    ids = []
    for piece in re.split(f"({re.escape(IMAGE)}|{re.escape(EOC)})", text):
        if piece in special:
            ids.append(special[piece])
        elif piece:
            ids.extend(processor.tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def small_config(vocab_size: int = 64) -> OpenFlamingoConfig:
    return OpenFlamingoConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 14,
        },
        text_config={
            "model_type": "gpt_neox",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    )


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer set-up and model config
# ------------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_is_deterministic_and_gpt_neox_like():
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.eos_token == EOS_TOKEN and first.pad_token is None
    # No special tokens around the text, like GPT-NeoX.
    assert first("a cat")["input_ids"] == first("a cat", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(np.asarray(make_image(3)), np.asarray(make_image(3)))
    assert not np.array_equal(np.asarray(make_image(3)), np.asarray(make_image(4)))
    assert make_image(0).size == (32, 40) and make_image(0).mode == "RGB"


def test_special_tokens_added_in_original_order():
    tokenizer = build_tiny_tokenizer()
    base = len(tokenizer)
    processor = OpenFlamingoProcessor(tokenizer=tokenizer)

    # [<|endofchunk|>, <image>] as extra special tokens, then <PAD> because there was no pad token.
    assert len(tokenizer) == base + 3
    assert processor.eoc_token_id == base == tokenizer.convert_tokens_to_ids(EOC)
    assert processor.image_token_id == base + 1 == tokenizer.convert_tokens_to_ids(IMAGE)
    assert tokenizer.pad_token == PAD and tokenizer.pad_token_id == base + 2
    assert (processor.image_token, processor.eoc_token) == (IMAGE, EOC)
    assert tokenizer.extra_special_tokens == [EOC, IMAGE]
    # Special: never split, and dropped by `skip_special_tokens`.
    ids = tokenizer(f"{IMAGE}a cat{EOC}")["input_ids"]
    assert ids[0] == processor.image_token_id and ids[-1] == processor.eoc_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat"

    # Building a processor on a tokenizer that has the tokens already adds nothing.
    OpenFlamingoProcessor(tokenizer=tokenizer)
    assert len(tokenizer) == base + 3


def test_pad_token_added_only_when_missing():
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = EOS_TOKEN
    base = len(tokenizer)
    OpenFlamingoProcessor(tokenizer=tokenizer)
    assert len(tokenizer) == base + 2
    assert tokenizer.pad_token == EOS_TOKEN and PAD not in tokenizer.get_vocab()


def test_update_model_config(processor):
    config = small_config(vocab_size=64)
    num_embeddings = processor.update_model_config(config)
    assert num_embeddings == len(processor.tokenizer)
    assert config.media_token_id == processor.image_token_id
    assert config.eoc_token_id == processor.eoc_token_id
    assert config.text_config.pad_token_id == processor.tokenizer.pad_token_id
    assert config.text_config.vocab_size == 64  # a pretrained model is resized, its config is not edited

    processor.update_model_config(config, set_vocab_size=True)
    assert config.text_config.vocab_size == len(processor.tokenizer)
    bigger = small_config(vocab_size=1000)
    processor.update_model_config(bigger, set_vocab_size=True)
    assert bigger.text_config.vocab_size == 1000  # never shrunk

    reloaded = OpenFlamingoConfig.from_dict(config.to_dict())
    assert (reloaded.media_token_id, reloaded.eoc_token_id) == (processor.image_token_id, processor.eoc_token_id)


# ------------------------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------------------------


BATCH_TEXTS = [
    "A photo of a cat.",  # no image
    f"{IMAGE}Output: a dog",  # one image
    f"{IMAGE}Output:two birds{EOC}{IMAGE}Output:a cat{EOC}{IMAGE}Output:",  # three images
]


@pytest.mark.parametrize("padding_side", [None, "left", "right"])
def test_batch_matches_hand_built_expectation(processor, images, padding_side):
    rows = [[], [images[0]], [images[1], images[2], images[3]]]
    kwargs = {} if padding_side is None else {"padding_side": padding_side}
    out = processor(images=rows, text=BATCH_TEXTS, padding=True, return_tensors="pt", **kwargs)
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}

    # Text: each row tokenized by hand, padded on the requested side (left by default).
    pad_id = processor.tokenizer.pad_token_id
    unpadded = [expected_ids(processor, text) for text in BATCH_TEXTS]
    length = max(len(ids) for ids in unpadded)
    assert out["input_ids"].shape == (3, length)
    for row, ids in enumerate(unpadded):
        pad = [pad_id] * (length - len(ids))
        if padding_side == "right":
            expected, mask = ids + pad, [1] * len(ids) + [0] * len(pad)
        else:
            expected, mask = pad + ids, [0] * len(pad) + [1] * len(ids)
        assert out["input_ids"][row].tolist() == expected
        assert out["attention_mask"][row].tolist() == mask
    assert len(unpadded[0]) != len(unpadded[1]) != length  # padding actually happened on two rows

    # Images: (batch, max_images, 1 frame, 3, 224, 224), each image as CLIP preprocesses it, zeros after.
    pixel_values = out["pixel_values"]
    assert pixel_values.shape == (3, 3, 1, 3, 224, 224) and pixel_values.dtype == torch.float32
    reference = reference_image_processor()
    for row, row_images in enumerate(rows):
        for index in range(3):
            if index < len(row_images):
                expected = reference(row_images[index], return_tensors="pt")["pixel_values"][0]
                torch.testing.assert_close(pixel_values[row, index, 0], expected, rtol=0, atol=1e-6)
                assert pixel_values[row, index].abs().sum() > 0
            else:
                assert torch.count_nonzero(pixel_values[row, index]) == 0


def test_image_processor_defaults_are_openai_clip_224(processor):
    image_processor = processor.image_processor
    assert image_processor.size == {"shortest_edge": 224}
    assert image_processor.crop_size == {"height": 224, "width": 224}
    assert image_processor.do_resize and image_processor.do_center_crop and image_processor.do_normalize
    assert image_processor.resample == PILImageResampling.BICUBIC
    np.testing.assert_allclose(image_processor.image_mean, OPENAI_CLIP_MEAN)
    np.testing.assert_allclose(image_processor.image_std, OPENAI_CLIP_STD)


def test_text_only_has_no_pixel_values(processor):
    out = processor(text=["a cat", "a dog on the beach"], return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    out = processor(images=[[], []], text=["a cat", "a dog on the beach"], return_tensors="pt")
    assert "pixel_values" not in out


def test_return_types_follow_return_tensors(processor, images):
    out = processor(images=images[0], text="Output:", return_tensors="np")
    assert isinstance(out["input_ids"], np.ndarray) and isinstance(out["pixel_values"], np.ndarray)
    out = processor(images=[[images[0]], []], text=["Output:", "a cat sitting"], padding=False)
    assert out["input_ids"][1] == expected_ids(processor, "a cat sitting")  # ragged lists, unpadded
    assert out["pixel_values"].shape == (2, 1, 1, 3, 224, 224)


def test_text_without_marker_gets_markers_prepended(processor, images):
    out = processor(images=[images[0], images[1]], text="A cat", return_tensors="pt")
    assert out["input_ids"][0].tolist() == expected_ids(processor, f"{IMAGE}{IMAGE}A cat")
    assert out["pixel_values"].shape[:2] == (1, 2)
    # Per sample: a batch row without images is left alone.
    out = processor(images=[[images[0]], []], text=["A cat", "A dog"], padding_side="right", return_tensors="pt")
    assert out["input_ids"][0].tolist()[: len(expected_ids(processor, f"{IMAGE}A cat"))] == expected_ids(
        processor, f"{IMAGE}A cat"
    )
    assert processor.image_token_id not in out["input_ids"][1].tolist()


def test_images_without_text_get_one_marker_per_image(processor, images):
    single = processor(images=images[0], return_tensors="pt")
    assert single["input_ids"].tolist() == [[processor.image_token_id]]
    assert single["pixel_values"].shape == (1, 1, 1, 3, 224, 224)

    one_sample = processor(images=[images[0], images[1]], return_tensors="pt")
    assert one_sample["input_ids"].tolist() == [[processor.image_token_id] * 2]

    batch = processor(images=[[images[0]], [images[1], images[2]]], return_tensors="pt")
    pad_id = processor.tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[pad_id, processor.image_token_id], [processor.image_token_id] * 2]
    assert batch["pixel_values"].shape == (2, 2, 1, 3, 224, 224)


def test_flat_image_list_is_split_over_batch(processor, images):
    texts = [f"{IMAGE}a", f"b{IMAGE}c{IMAGE}"]
    flat = processor(images=images[:3], text=texts, return_tensors="pt")
    nested = processor(images=[[images[0]], [images[1], images[2]]], text=texts, return_tensors="pt")
    for key in nested:
        torch.testing.assert_close(flat[key], nested[key])
    # No markers and one image per text: each text gets its image (the pipeline's batched captioning call).
    one_each = processor(images=images[:2], text=["", ""], return_tensors="pt")
    assert one_each["input_ids"].tolist() == [[processor.image_token_id]] * 2


def test_image_input_types_give_the_same_pixels(processor, images, tmp_path):
    image = images[0]
    hwc = np.asarray(image)
    path = tmp_path / "image.png"
    image.save(path)
    reference = processor(images=image, text="x", return_tensors="pt")["pixel_values"]
    chw = hwc.transpose(2, 0, 1).copy()
    for variant in (hwc, chw, torch.from_numpy(chw), str(path), path):
        pixel_values = processor(images=variant, text="x", return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixel_values, reference, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------------


def test_count_mismatch_names_sample_and_counts(processor, images):
    with pytest.raises(ValueError, match=r"Sample 1 has 2 `<image>` markers in its text but 1 image\b"):
        processor(images=[[images[0]], [images[1]]], text=[f"{IMAGE}a", f"{IMAGE}{IMAGE}b"])
    with pytest.raises(ValueError, match=r"Sample 0 has 1 `<image>` marker in its text but 0 images"):
        processor(text=f"{IMAGE}a cat")
    with pytest.raises(ValueError, match=r"Sample 0 has 1 `<image>` marker in its text but 2 images"):
        processor(images=[images[0], images[1]], text=f"{IMAGE}a cat")
    with pytest.raises(ValueError, match=r"Sample 1 has 2 `<image>` markers but only 1 image left"):
        processor(images=images[:2], text=[f"{IMAGE}a", f"{IMAGE}{IMAGE}b"])
    with pytest.raises(ValueError, match=r"Got 3 lists of images for 2 texts"):
        processor(images=[[images[0]], [], []], text=["a", "b"])


def test_unsupported_image_type(processor):
    with pytest.raises(TypeError, match=r"Sample 0, image 0: unsupported image type builtins\.dict"):
        processor(images={"pixels": 1}, text="x")
    with pytest.raises(TypeError, match=r"Sample 1, image 0: unsupported image type builtins\.int"):
        processor(images=[[make_image(0)], [3]], text=["a", "b"])


def test_unreadable_image_path(processor, tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=r"Sample 0, image 0: there is no image file at .*missing\.png"):
        processor(images=str(missing), text="x")
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not pixels")
    with pytest.raises(ValueError, match=r"notes\.txt' exists but is not a readable image file"):
        processor(images=str(not_an_image), text="x")


def test_truncation_that_would_cut_a_marker_raises(processor, images):
    text = f"A photo of a man riding a horse on the beach.{IMAGE}Output:"
    full_length = len(expected_ids(processor, text))
    message = rf"sample 1: it is {full_length} tokens long .*`max_length >= {full_length}`"
    with pytest.raises(ValueError, match=message):
        processor(images=[[images[0]], [images[1]]], text=[f"{IMAGE}a", text], truncation=True, max_length=5)

    # Truncation that keeps every marker is fine.
    out = processor(images=images[0], text=f"{IMAGE}{text[:-len(IMAGE + 'Output:')]}", truncation=True, max_length=5)
    assert len(out["input_ids"][0]) == 5 and out["input_ids"][0][0] == processor.image_token_id


# ------------------------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", ["class", "auto"])
def test_save_and_load_round_trip(processor, images, tmp_path, loader):
    processor.save_pretrained(tmp_path)
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    if loader == "auto":
        reloaded = AutoProcessor.from_pretrained(tmp_path)
    else:
        reloaded = OpenFlamingoProcessor.from_pretrained(tmp_path)

    assert isinstance(reloaded, OpenFlamingoProcessor)
    assert len(reloaded.tokenizer) == len(processor.tokenizer)  # nothing added twice
    assert (reloaded.image_token_id, reloaded.eoc_token_id) == (processor.image_token_id, processor.eoc_token_id)
    assert reloaded.tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()

    rows = [[], [images[0]], [images[1], images[2], images[3]]]
    expected = processor(images=rows, text=BATCH_TEXTS, return_tensors="pt")
    actual = reloaded(images=rows, text=BATCH_TEXTS, return_tensors="pt")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])  # left padding still the default


# ------------------------------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------------------------------


def user(text: str, image=None) -> dict:
    block = {"type": "image"} if image is None else {"type": "image", "image": image}
    return {"role": "user", "content": [block, {"type": "text", "text": text}]}


def test_chat_template_zero_shot(processor):
    conversation = [user("Output:")]
    assert processor.apply_chat_template(conversation) == f"{IMAGE}Output:"
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == f"{IMAGE}Output:"
    assert processor.apply_chat_template([{"role": "user", "content": "Output:"}]) == "Output:"


def test_chat_template_few_shot(processor):
    conversation = [
        user("Output:"),
        {"role": "assistant", "content": "a cat"},
        user("Output:"),
        {"role": "assistant", "content": [{"type": "text", "text": "two birds"}]},
        user("Output:"),
    ]
    expected = f"{IMAGE}Output:a cat{EOC}{IMAGE}Output:two birds{EOC}{IMAGE}Output:"
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == expected
    # Prefilling the answer: the last assistant turn is left open.
    prefill = processor.apply_chat_template(conversation[:2], continue_final_message=True)
    assert prefill == f"{IMAGE}Output:a cat"


def test_chat_template_tokenized_with_images(processor, images, tmp_path):
    path = tmp_path / "query.png"
    images[1].save(path)
    conversation = [
        user("Output:", images[0]),
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Output:"}]},
    ]
    out = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    direct = processor(
        images=[images[0], images[1]], text=f"{IMAGE}Output:a cat{EOC}{IMAGE}Output:", return_tensors="pt"
    )
    assert set(out.keys()) == set(direct.keys())
    for key in direct:
        torch.testing.assert_close(out[key], direct[key])

    # Assistant masks cover the answer and its <|endofchunk|>, nothing else (for training).
    masked = processor.apply_chat_template(
        conversation[:2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = masked["input_ids"][0].tolist(), masked["assistant_masks"][0].tolist()
    assert [i for i, m in zip(ids, mask) if m] == expected_ids(processor, f"a cat{EOC}")


def test_chat_template_user_written_marker_is_plain_text_when_sanitized(processor, images):
    conversation = [user(f"look {IMAGE} Output:", images[0])]
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, sanitize_control_tokens=True, return_tensors="pt"
    )
    assert out["input_ids"][0].tolist().count(processor.image_token_id) == 1
    assert out["pixel_values"].shape == (1, 1, 1, 3, 224, 224)
    with pytest.raises(ValueError, match="Sample 0 has 2 `<image>` markers in its text but 1 image"):
        processor.apply_chat_template(conversation, tokenize=True, return_dict=True)


def test_custom_tokens_are_used_everywhere():
    tokenizer = build_tiny_tokenizer()
    processor = OpenFlamingoProcessor(tokenizer=tokenizer, image_token="<img>", eoc_token="<eoc>")
    assert tokenizer.extra_special_tokens == ["<eoc>", "<img>"]
    conversation = [user("Output:"), {"role": "assistant", "content": "a cat"}, user("Output:")]
    assert processor.apply_chat_template(conversation) == "<img>Output:a cat<eoc><img>Output:"
    out = processor(images=make_image(0), text="<img>Output:", return_tensors="pt")
    assert out["input_ids"][0, 0] == processor.image_token_id == tokenizer.convert_tokens_to_ids("<img>")


# ------------------------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------------------------


def test_post_processing(processor, images):
    prompts = [f"{IMAGE}Output:a cat{EOC}{IMAGE}Output:", f"{IMAGE}Output:"]
    inputs = processor(images=[[images[0], images[1]], [images[2]]], text=prompts, return_tensors="pt")
    answers = [" two birds", " a dog"]
    eoc, pad = processor.eoc_token_id, processor.tokenizer.pad_token_id
    new_tokens = [expected_ids(processor, answer) + [eoc] for answer in answers]
    new_tokens[1] += expected_ids(processor, " garbage") + [pad]  # kept generating after the stop token
    width = max(len(tokens) for tokens in new_tokens)
    new_tokens = [tokens + [pad] * (width - len(tokens)) for tokens in new_tokens]
    generated = torch.cat([inputs["input_ids"], torch.tensor(new_tokens)], dim=1)

    # The dedicated helper: prompt stripped, cut at <|endofchunk|>, the answer's leading space stripped.
    assert processor.post_process_generation(generated, inputs["input_ids"]) == ["two birds", "a dog"]
    assert processor.post_process_generation(generated, inputs["input_ids"].shape[1]) == ["two birds", "a dog"]

    # What the image-text-to-text pipeline does: decode both, strip the decoded prompt from the decoded output.
    decoded_outputs = processor.post_process_image_text_to_text(generated, skip_special_tokens=True)
    decoded_prompts = processor.post_process_image_text_to_text(inputs["input_ids"], skip_special_tokens=True)
    assert decoded_prompts == ["Output:a catOutput:", "Output:"]
    for output, prompt, answer in zip(decoded_outputs, decoded_prompts, answers):
        assert output.startswith(prompt) and output[len(prompt) :] == answer

    assert processor.post_process_image_text_to_text(generated[1]) == "Output: a dog"
    assert processor.batch_decode(generated, skip_special_tokens=True)[1] == "Output: a dog garbage"
    assert processor.decode(generated[0], skip_special_tokens=True) == decoded_outputs[0]


# ----------------------------------------------------------------------------------------------------------------------
# The OpenFlamingo protocol: prompt shapes and label masks (hand-written expectations)
# ----------------------------------------------------------------------------------------------------------------------


def _protocol_processor():
    return OpenFlamingoProcessor(tokenizer=build_tiny_tokenizer())


def test_protocol_prompt_shapes():
    processor = _protocol_processor()
    assert processor.few_shot_prompt(["Output:a cat."], "Output:") == (
        "<image>Output:a cat.<|endofchunk|><image>Output:"
    )
    assert processor.few_shot_prompt([], "Output:") == "<image>Output:"
    assert processor.pair_text("  a cat on a mat \n") == "<image>a cat on a mat<|endofchunk|><|endoftext|>"
    # Images on sentences 2, 0 and 2 again: markers in front of their sentences (two on sentence 2), the first
    # <|endofchunk|> dropped, spaces around markers removed, <|endofchunk|> + eos at the end.
    assert processor.interleaved_text(["A b.", "C d.", "E f."], [2, 0, 2]) == (
        "<image>A b. C d.<|endofchunk|><image><|endofchunk|><image>E f.<|endofchunk|><|endoftext|>"
    )
    assert processor.interleaved_text(["Intro.", "Pic here."], [1]) == (
        "Intro.<image>Pic here.<|endofchunk|><|endoftext|>"
    )


def test_protocol_pretraining_labels():
    processor = _protocol_processor()
    image, eoc, pad = processor.image_token_id, processor.eoc_token_id, processor.tokenizer.pad_token_id
    eos = processor.tokenizer.eos_token_id
    ids = torch.tensor([[5, 6, image, 7, 8, eoc, 9, 10, image, 11, eoc, eos, pad, pad]])
    mask = (ids != pad).long()
    x = -100
    # Pairs: only padding and <image> are masked (eos is trained, as the original's no-op line left it).
    assert processor.pretraining_labels(ids, mask).tolist() == [[5, 6, x, 7, 8, eoc, 9, 10, x, 11, eoc, eos, x, x]]
    # Interleaved: also before the first image and from after each <|endofchunk|> to the next <image>.
    assert processor.pretraining_labels(ids, mask, interleaved=True).tolist() == [
        [x, x, x, 7, 8, eoc, x, x, x, 11, eoc, x, x, x]
    ]
    assert processor.pretraining_labels(ids, mask, mask_eos=True).tolist() == [
        [5, 6, x, 7, 8, eoc, 9, 10, x, 11, eoc, x, x, x]
    ]
    # Without a mask, padding is found by id; a row with no image is all masked when interleaved.
    no_image = torch.tensor([[5, 6, eoc, 7, pad]])
    assert processor.pretraining_labels(no_image, interleaved=True).tolist() == [[x] * 5]
    assert processor.pretraining_labels(no_image).tolist() == [[5, 6, eoc, 7, x]]
