"""Tests of the pretraining data pipeline (`openflamingo_hf.trainer.data`, `shard_reading`, `shard_writing`), on tiny data written in the tests."""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from transformers.testing_utils import CaptureLogger

from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image
from openflamingo_hf.trainer import data, shard_reading
from openflamingo_hf.trainer.collator import SKIPPED_KEY, OpenFlamingoDataCollator
from openflamingo_hf.trainer.data import (
    build_interleaved_dataset,
    build_pair_dataset,
    preprocess_interleaved,
    preprocess_pair,
)
from openflamingo_hf.trainer.shard_reading import SkipSample, expand_shards
from openflamingo_hf.trainer.shard_writing import (
    encode_image,
    encode_image_base64,
    write_interleaved_shard,
    write_pair_shard,
)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model_and_processor()[1]


class FixedRng:
    """An rng whose `random()` returns the given values in order (flip draw first, then the single-image draw)."""

    def __init__(self, *values: float):
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


NO_FLIP = 0.9  # a draw >= 0.5: no flip / single-image document kept
FLIP = 0.1  # a draw < 0.5: flip / single-image document dropped


def big_png(seed: int) -> bytes:
    """64x64 RGB noise: about 12.4 KB as PNG, above the 10 KB rule."""
    encoded = encode_image(make_image(seed, (64, 64)))
    assert len(encoded) // 1000 > 10
    return encoded


def small_png(seed: int) -> bytes:
    """16x16 RGB noise: under 1 KB."""
    return encode_image(make_image(seed, (16, 16)))


def mmc4(sentences, images, similarity_matrix) -> dict:
    """An MMC4 document; an image given as None has no `image_base64`."""
    info = [{} if image is None else {"image_base64": encode_image_base64(image)} for image in images]
    return {"text_list": sentences, "image_info": info, "similarity_matrix": similarity_matrix}


def text_of(sample, processor) -> str:
    ids = sample["input_ids"][sample["attention_mask"].bool()]
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def pixels(processor, encoded_images, flip=False) -> torch.Tensor:
    """The expected (num_images, 1, 3, H, W) pixel values: the images the text uses, no padding slots."""
    images = [Image.open(io.BytesIO(image)).convert("RGB") for image in encoded_images]
    expected = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    expected = expected.flip(-1) if flip else expected
    return expected.unsqueeze(1)


def tokens(processor):
    return processor.image_token, processor.eoc_token, processor.tokenizer.eos_token


# ------------------------------------------------------------------------------------------------------------------
# Shard lists
# ------------------------------------------------------------------------------------------------------------------


def test_expand_shards_list_string_glob_and_braces(tmp_path):
    paths = [tmp_path / f"shard-{index:04d}.tar" for index in range(4)]
    for path in paths:
        path.write_bytes(b"")
    names = [str(path) for path in paths]
    assert expand_shards(names[:2]) == names[:2]
    assert expand_shards(f"{names[0]}, {names[1]} {names[2]}") == names[:3]
    assert expand_shards(str(tmp_path / "shard-*.tar")) == names
    assert expand_shards(str(tmp_path / "shard-{0001..0003}.tar")) == names[1:]
    # Commas inside braces are alternatives, not separators.
    assert expand_shards(str(tmp_path / "shard-{0000,0002}.tar")) == [names[0], names[2]]
    assert expand_shards([str(tmp_path / "shard-000[01].tar"), names[0]]) == names[:2]  # no duplicates


def test_expand_shards_nothing_matches_names_the_spec(tmp_path):
    (tmp_path / "shard-0000.tar").write_bytes(b"")
    spec = str(tmp_path / "nope-*.tar")
    with pytest.raises(FileNotFoundError, match=re.escape(spec)):
        expand_shards(spec)
    with pytest.raises(FileNotFoundError, match="shard-0001.tar"):
        expand_shards(str(tmp_path / "shard-{0000..0001}.tar"))
    with pytest.raises(FileNotFoundError):
        expand_shards("")


# ------------------------------------------------------------------------------------------------------------------
# Pairs
# ------------------------------------------------------------------------------------------------------------------


def test_preprocess_pair(processor):
    image, eoc, eos = tokens(processor)
    encoded = big_png(0)
    sample = preprocess_pair(encoded, "  a cat on a mat ", processor, max_length=16, rng=FixedRng(NO_FLIP))
    assert text_of(sample, processor) == f"{image}a cat on a mat{eoc}{eos}"
    assert sample["input_ids"].shape == sample["attention_mask"].shape == sample["labels"].shape == (16,)
    assert sample["attention_mask"][-1] == 0  # right padding
    expected_labels = processor.pretraining_labels(sample["input_ids"][None], sample["attention_mask"][None])[0]
    assert torch.equal(sample["labels"], expected_labels)
    assert sample["labels"][0] == -100 and (sample["labels"][sample["attention_mask"] == 0] == -100).all()
    eos_position = int(sample["attention_mask"].sum()) - 1
    assert sample["labels"][eos_position] == processor.tokenizer.eos_token_id  # trained, as in the original
    masked = preprocess_pair(encoded, "a cat on a mat", processor, max_length=16, rng=FixedRng(NO_FLIP),
                             mask_eos=True)
    assert masked["labels"][eos_position] == -100
    torch.testing.assert_close(sample["pixel_values"], pixels(processor, [encoded]))
    assert sample["pixel_values"].shape[:2] == (1, 1)
    # A PIL image gives the same; truncation to max_length.
    short = preprocess_pair(Image.open(io.BytesIO(encoded)), "a cat on a mat", processor,
                            max_length=4, rng=FixedRng(NO_FLIP))
    assert short["input_ids"].shape == (4,) and short["attention_mask"].all()
    assert torch.equal(short["input_ids"], sample["input_ids"][:4])


def test_preprocess_pair_flip_follows_rng(processor):
    encoded = big_png(1)
    flipped = preprocess_pair(encoded, "x", processor, rng=FixedRng(FLIP))
    torch.testing.assert_close(flipped["pixel_values"], pixels(processor, [encoded], flip=True))
    # Seeded generators: the image is flipped exactly when the first draw is below 0.5.
    for seed in range(6):
        flip = random.Random(seed).random() < 0.5
        sample = preprocess_pair(encoded, "x", processor, rng=random.Random(seed))
        torch.testing.assert_close(sample["pixel_values"], pixels(processor, [encoded], flip=flip))
        sample = preprocess_pair(encoded, "x", processor, rng=np.random.default_rng(seed))
        flip = np.random.default_rng(seed).random() < 0.5
        torch.testing.assert_close(sample["pixel_values"], pixels(processor, [encoded], flip=flip))


def test_preprocess_pair_undecodable_image(processor):
    with pytest.raises(SkipSample) as raised:
        preprocess_pair(b"not an image" * 100, "x", processor)
    assert raised.value.reason == shard_reading.UNDECODABLE_IMAGE


def test_caption_protocol_tokens_are_removed(processor):
    image, eoc, eos = tokens(processor)
    sample = preprocess_pair(big_png(0), f"a {image}cat{eoc}", processor, rng=FixedRng(NO_FLIP))
    assert text_of(sample, processor) == f"{image}a cat{eoc}{eos}"


# ------------------------------------------------------------------------------------------------------------------
# MMC4 documents
# ------------------------------------------------------------------------------------------------------------------


def test_argmax_assignment_two_images_on_one_sentence(processor):
    image, eoc, eos = tokens(processor)
    images = [big_png(0), big_png(1)]
    # Both images are most similar to sentence 1 (a one-to-one matching would move one of them).
    document = mmc4(["A cat.", "A dog.", "Two birds."], images, [[0.3, 0.5, 0.1], [0.2, 0.9, 0.4]])
    sample = preprocess_interleaved(document, processor, max_num_images=3, max_length=40, rng=FixedRng(NO_FLIP))
    assert text_of(sample, processor) == f"A cat.{image}{eoc}{image}A dog. Two birds.{eoc}{eos}"
    torch.testing.assert_close(sample["pixel_values"], pixels(processor, images))
    assert sample[SKIPPED_KEY] == {}


def test_similarity_threshold(processor):
    image, eoc, eos = tokens(processor)
    images = [big_png(0), big_png(1), big_png(2)]
    document = mmc4(["S0.", "S1.", "S2."], images, [[0.23, 0.1, 0.0], [0.0, 0.24, 0.1], [0.1, 0.0, 0.3]])
    sample = preprocess_interleaved(document, processor, sim_threshold=0.24, max_length=40, rng=FixedRng(NO_FLIP))
    # Image 0 (best 0.23 < 0.24) is dropped; 0.24 itself is kept.
    assert text_of(sample, processor) == f"S0.{image}S1.{eoc}{image}S2.{eoc}{eos}"
    torch.testing.assert_close(sample["pixel_values"], pixels(processor, images[1:]))
    assert sample[SKIPPED_KEY] == {shard_reading.IMAGE_BELOW_THRESHOLD: 1}


def test_ten_kb_rule(processor):
    image, eoc, eos = tokens(processor)
    base = encode_image(make_image(3, (60, 60)))  # PNG under 11000 bytes; trailing bytes after IEND are ignored
    assert len(base) < 10999
    at_10999 = base + b"\0" * (10999 - len(base))  # 10999 // 1000 = 10 <= 10: dropped
    at_11000 = base + b"\0" * (11000 - len(base))  # kept
    document = mmc4(["S0.", "S1.", "S2."], [small_png(0), at_10999, at_11000],
                    [[0.9, 0.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 0.9]])
    sample = preprocess_interleaved(document, processor, max_length=40, rng=FixedRng(NO_FLIP, NO_FLIP))
    assert text_of(sample, processor) == f"S0. S1.{image}S2.{eoc}{eos}"
    torch.testing.assert_close(sample["pixel_values"][:1], pixels(processor, [at_11000]))
    assert sample[SKIPPED_KEY] == {shard_reading.IMAGE_TOO_SMALL: 2}


def test_missing_image_base64_keeps_rows_aligned(processor):
    image, eoc, eos = tokens(processor)
    kept = big_png(5)
    # Row 0 belongs to the image without base64; the kept image uses row 1 (sentence 1), not row 0.
    document = mmc4(["S0.", "S1."], [None, kept], [[0.9, 0.1], [0.1, 0.8]])
    sample = preprocess_interleaved(document, processor, max_length=40, rng=FixedRng(NO_FLIP, NO_FLIP))
    assert text_of(sample, processor) == f"S0.{image}S1.{eoc}{eos}"
    assert sample[SKIPPED_KEY] == {shard_reading.IMAGE_MISSING_BASE64: 1}


def test_undecodable_image_is_dropped_and_counted(processor):
    image, eoc, eos = tokens(processor)
    garbage = b"not an image" * 1000
    document = mmc4(["S0.", "S1.", "S2."], [garbage, big_png(0), big_png(1)],
                    [[0.9, 0.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 0.9]])
    sample = preprocess_interleaved(document, processor, max_length=40, rng=FixedRng(NO_FLIP))
    assert text_of(sample, processor) == f"S0.{image}S1.{eoc}{image}S2.{eoc}{eos}"
    assert sample[SKIPPED_KEY] == {shard_reading.IMAGE_UNDECODABLE: 1}
    with pytest.raises(SkipSample) as raised:
        preprocess_interleaved(mmc4(["S0."], [garbage], [[0.9]]), processor)
    assert raised.value.reason == shard_reading.NO_IMAGES and raised.value.counts == {shard_reading.IMAGE_UNDECODABLE: 1}


def test_images_are_ordered_by_sentence(processor):
    image, eoc, eos = tokens(processor)
    images = [big_png(0), big_png(1), big_png(2)]
    # image_info order: sentence 2, sentence 0, sentence 2 -> marker order: image 1, image 0, image 2.
    document = mmc4(["S0.", "S1.", "S2."], images, [[0.1, 0.2, 0.9], [0.8, 0.1, 0.1], [0.0, 0.1, 0.7]])
    sample = preprocess_interleaved(document, processor, max_length=40, rng=FixedRng(NO_FLIP))
    assert text_of(sample, processor) == f"{image}S0. S1.{eoc}{image}{eoc}{image}S2.{eoc}{eos}"
    torch.testing.assert_close(sample["pixel_values"],
                               pixels(processor, [images[1], images[0], images[2]]))


def test_max_num_images_keeps_the_first_images(processor):
    image, eoc, eos = tokens(processor)
    images = [big_png(seed) for seed in range(4)]
    eye = np.eye(4)[::-1].tolist()  # image k -> sentence 3 - k
    document = mmc4(["S0.", "S1.", "S2.", "S3."], images, eye)
    sample = preprocess_interleaved(document, processor, max_num_images=2, max_length=40, rng=FixedRng(NO_FLIP))
    assert text_of(sample, processor) == f"{image}S0.{eoc}{image}S1. S2. S3.{eoc}{eos}"
    assert sample["pixel_values"].shape[:2] == (2, 1)
    torch.testing.assert_close(sample["pixel_values"], pixels(processor, [images[3], images[2]]))


def test_first_eoc_removed_and_labels(processor):
    image, eoc, eos = tokens(processor)
    document = mmc4(["Intro.", "A cat.", "More.", "A dog."], [big_png(0), big_png(1)],
                    [[0.0, 0.9, 0.0, 0.0], [0.0, 0.0, 0.0, 0.9]])
    sample = preprocess_interleaved(document, processor, max_length=48, rng=FixedRng(NO_FLIP))
    assert text_of(sample, processor) == f"Intro.{image}A cat. More.{eoc}{image}A dog.{eoc}{eos}"
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert labels == processor.pretraining_labels(sample["input_ids"][None], sample["attention_mask"][None],
                                                  interleaved=True)[0].tolist()
    # Hand-checked: loss on the text after each image up to and including its <|endofchunk|>; none before the
    # first image, on the images, on the eos after the last <|endofchunk|> (no image introduces it), on padding.
    first_image, second_image = [k for k, token in enumerate(ids) if token == processor.image_token_id]
    first_eoc = ids.index(processor.eoc_token_id)
    length = int(sample["attention_mask"].sum())
    assert ids[length - 2: length] == [processor.eoc_token_id, processor.tokenizer.eos_token_id]
    assert all(label == -100 for label in labels[: first_image + 1])
    assert labels[first_image + 1: first_eoc + 1] == ids[first_image + 1: first_eoc + 1]
    assert labels[second_image] == -100
    assert labels[second_image + 1: length - 1] == ids[second_image + 1: length - 1]
    assert all(label == -100 for label in labels[length - 1:])


def _first_index(processor, text: str, token_id: int, occurrence: int) -> int:
    ids = processor.tokenizer(text)["input_ids"]
    return [k for k, token in enumerate(ids) if token == token_id][occurrence]


def test_truncation_drops_images(processor):
    images = [big_png(seed) for seed in range(3)]
    sentences = ["One two three.", "Four five six.", "Seven eight nine."]
    document = mmc4(sentences, images, np.eye(3).tolist())
    full = processor.interleaved_text(sentences, [0, 1, 2])
    cut = _first_index(processor, full, processor.image_token_id, 2)  # the third <image> falls off
    sample = preprocess_interleaved(document, processor, max_length=cut, rng=FixedRng(NO_FLIP))
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == 2
    torch.testing.assert_close(sample["pixel_values"], pixels(processor, images[:2]))
    with pytest.raises(SkipSample) as raised:
        preprocess_interleaved(document, processor, min_num_images=3, max_length=cut, rng=FixedRng(NO_FLIP))
    assert raised.value.reason == shard_reading.TOO_FEW_IMAGES


def test_min_num_images(processor):
    document = mmc4(["S0.", "S1."], [big_png(0), big_png(1)], [[0.9, 0.0], [0.0, 0.9]])
    assert preprocess_interleaved(document, processor, min_num_images=2, rng=FixedRng(NO_FLIP)) is not None
    with pytest.raises(SkipSample) as raised:
        preprocess_interleaved(document, processor, min_num_images=3, rng=FixedRng(NO_FLIP))
    assert raised.value.reason == shard_reading.TOO_FEW_IMAGES
    with pytest.raises(SkipSample) as raised:
        preprocess_interleaved(mmc4(["S0."], [big_png(0)], [[0.1]]), processor)
    assert raised.value.reason == shard_reading.NO_IMAGES and raised.value.counts == {shard_reading.IMAGE_BELOW_THRESHOLD: 1}


def test_single_image_rule_follows_the_seeded_rng(processor):
    document = mmc4(["S0.", "S1."], [big_png(0)], [[0.0, 0.9]])
    # Draws: the flip, then the single-image coin (dropped when below 0.5).
    keep_seed = next(seed for seed in range(100) if _second_draw(seed) >= 0.5)
    drop_seed = next(seed for seed in range(100) if _second_draw(seed) < 0.5)
    sample = preprocess_interleaved(document, processor, rng=random.Random(keep_seed))
    flip = random.Random(keep_seed).random() < 0.5
    torch.testing.assert_close(sample["pixel_values"][:1], pixels(processor, [big_png(0)], flip=flip))
    with pytest.raises(SkipSample) as raised:
        preprocess_interleaved(document, processor, rng=random.Random(drop_seed))
    assert raised.value.reason == shard_reading.SINGLE_IMAGE_DROPPED
    # About half of the documents are kept.
    rng = np.random.default_rng(0)
    kept = 0
    for _ in range(200):
        try:
            preprocess_interleaved(document, processor, max_length=16, rng=rng)
            kept += 1
        except SkipSample:
            pass
    assert 70 < kept < 130


def _second_draw(seed: int) -> float:
    rng = random.Random(seed)
    rng.random()
    return rng.random()


def test_single_image_at_the_end_is_rejected(processor):
    sentences = ["One two three four five six.", "Seven."]
    document = mmc4(sentences, [big_png(0)], [[0.0, 0.9]])
    end = _first_index(processor, processor.interleaved_text(sentences, [1]), processor.image_token_id, 0) + 1
    with pytest.raises(SkipSample) as raised:
        preprocess_interleaved(document, processor, max_length=end, rng=FixedRng(NO_FLIP, NO_FLIP))
    assert raised.value.reason == shard_reading.SINGLE_IMAGE_AT_END
    sample = preprocess_interleaved(document, processor, max_length=end + 1, rng=FixedRng(NO_FLIP, NO_FLIP))
    assert sample["input_ids"][-2] == processor.image_token_id


def test_same_flip_for_all_images(processor):
    images = [big_png(0), big_png(1)]
    document = mmc4(["S0.", "S1."], images, [[0.9, 0.0], [0.0, 0.9]])
    flipped = preprocess_interleaved(document, processor, max_num_images=2, rng=FixedRng(FLIP))
    torch.testing.assert_close(flipped["pixel_values"], pixels(processor, images, flip=True))
    plain = preprocess_interleaved(document, processor, max_num_images=2, rng=FixedRng(NO_FLIP))
    torch.testing.assert_close(plain["pixel_values"], pixels(processor, images))


@pytest.mark.parametrize(
    "document, reason",
    [
        ({"text_list": ["a"], "image_info": []}, shard_reading.MISSING_FIELDS),
        ({"text_list": "a", "image_info": [], "similarity_matrix": []}, shard_reading.MALFORMED_FIELDS),
        ({"text_list": ["a", "b"], "image_info": [{}], "similarity_matrix": [[0.5]]}, shard_reading.MALFORMED_FIELDS),
        ({"text_list": ["a"], "image_info": [{}, {}], "similarity_matrix": [[0.5]]}, shard_reading.MALFORMED_FIELDS),
        ({"text_list": ["a"], "image_info": [{}], "similarity_matrix": [["x"]]}, shard_reading.MALFORMED_FIELDS),
        ({"is_gpt": True, "example": "a"}, shard_reading.MISSING_FIELDS),
    ],
)
def test_malformed_documents(processor, document, reason):
    with pytest.raises(SkipSample) as raised:
        preprocess_interleaved(document, processor)
    assert raised.value.reason == reason


# ------------------------------------------------------------------------------------------------------------------
# ChatGPT-generated documents
# ------------------------------------------------------------------------------------------------------------------


def gpt_document(example: str, images: dict) -> dict:
    return {"is_gpt": True, "example": example,
            "image_map": {f"_!_IMAGE{k}_!_": {"base64_image": encode_image_base64(image)} for k, image in
                          images.items()}}


def original_gpt_text(example: str, processor) -> str:
    """open_flamingo 2.0.1's regex construction (without its cut at max_num_images)."""
    image, eoc, eos = tokens(processor)
    text = re.sub(r"_!_IMAGE\d+_!_", f"{eoc}{image}", example)
    text = text.replace(eoc, "", 1)
    text = text.replace(f" {eoc}", eoc).replace(f"{image} ", image).replace(f" {image}", image)
    return f"{text}{eoc}{eos}"


@pytest.mark.parametrize(
    "example",
    [
        "Intro text _!_IMAGE1_!_ first chunk. _!_IMAGE2_!_ second.",
        "_!_IMAGE1_!_A cat.  _!_IMAGE2_!_\nA dog. ",
        "Two  spaces  _!_IMAGE1_!_  _!_IMAGE2_!_  end",
    ],
)
def test_gpt_document_matches_the_original_text(processor, example):
    images = {1: big_png(1), 2: big_png(2)}
    sample = preprocess_interleaved(gpt_document(example, images), processor, max_length=64, rng=FixedRng(NO_FLIP))
    assert text_of(sample, processor) == original_gpt_text(example, processor)
    torch.testing.assert_close(sample["pixel_values"], pixels(processor, [images[1], images[2]]))


def test_gpt_document_hand_computed(processor):
    image, eoc, eos = tokens(processor)
    images = {1: big_png(1), 2: big_png(2), 3: small_png(3)}  # no size rule for these documents
    example = "Intro text _!_IMAGE2_!_ first chunk. _!_IMAGE1_!_ second. _!_IMAGE3_!_ third."
    document = gpt_document(example, images)
    sample = preprocess_interleaved(document, processor, max_length=64, rng=FixedRng(FLIP))
    assert text_of(sample, processor) == (
        f"Intro text{image}first chunk.{eoc}{image}second.{eoc}{image}third.{eoc}{eos}")
    # Each marker's own image, in text order; all flipped.
    torch.testing.assert_close(sample["pixel_values"],
                               pixels(processor, [images[2], images[1], images[3]], flip=True))
    # At most max_num_images markers; the text stops before the next one.
    capped = preprocess_interleaved(document, processor, max_num_images=2, max_length=64, rng=FixedRng(NO_FLIP))
    assert text_of(capped, processor) == f"Intro text{image}first chunk.{eoc}{image}second.{eoc}{eos}"
    torch.testing.assert_close(capped["pixel_values"], pixels(processor, [images[2], images[1]]))
    # Fewer than min_num_images after truncation.
    full = processor.interleaved_text(["Intro text", "first chunk.", "second.", "third."], [1, 2, 3])
    cut = _first_index(processor, full, processor.image_token_id, 1)
    with pytest.raises(SkipSample) as raised:
        preprocess_interleaved(document, processor, min_num_images=2, max_length=cut, rng=FixedRng(NO_FLIP))
    assert raised.value.reason == shard_reading.TOO_FEW_IMAGES
    one = preprocess_interleaved(document, processor, max_length=cut, rng=FixedRng(NO_FLIP))  # no 50% rule here
    torch.testing.assert_close(one["pixel_values"], pixels(processor, [images[2]]))
    # A marker without its image rejects the document.
    with pytest.raises(SkipSample) as raised:
        preprocess_interleaved(gpt_document("a _!_IMAGE4_!_ b", images), processor)
    assert raised.value.reason == shard_reading.MISSING_FIELDS


def test_gpt_text_equals_the_original_on_random_examples(processor):
    rng = random.Random(0)
    pieces = ["a", "b.", " ", "  ", "\n", "_!_IMAGE1_!_"]
    for _ in range(500):
        example = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        markers = data.GPT_IMAGE_MARKER.findall(example)
        parts = data.GPT_IMAGE_MARKER.split(example)
        sentences = [data._drop_one_trailing_space(part) if k < len(markers) else part
                     for k, part in enumerate(parts)]
        text = processor.interleaved_text(sentences, list(range(1, len(markers) + 1)))
        assert text == original_gpt_text(example, processor), example


# ------------------------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------------------------


def truncate_inside(path, member_name: str) -> None:
    """Cuts the tar file in the middle of a member's data."""
    with tarfile.open(path) as archive:
        member = archive.getmember(member_name)
    raw = path.read_bytes()
    path.write_bytes(raw[: member.offset_data + member.size // 2])


def corrupt_header(path, member_name: str) -> None:
    with tarfile.open(path) as archive:
        member = archive.getmember(member_name)
    raw = bytearray(path.read_bytes())
    raw[member.offset: member.offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(raw))


def captions(samples, processor) -> list[str]:
    image, eoc, eos = tokens(processor)
    return [text_of(sample, processor).replace(image, "").replace(eoc + eos, "") for sample in samples]


def summed_skips(samples) -> dict:
    total = Counter()
    for sample in samples:
        total.update(sample[SKIPPED_KEY])
    return dict(total)


def pair_examples(prefix: str, count: int, start: int = 0):
    return [{"image": make_image(start + k, (24, 24)), "caption": f"{prefix} {start + k}"} for k in range(count)]


def test_pair_dataset_skips_and_counts_bad_data(processor, tmp_path):
    good = tmp_path / "good.tar"
    examples = pair_examples("good", 2)
    examples.insert(1, {"image": b"not an image", "caption": "corrupt", "image_ext": "jpg"})
    examples.append({"image": make_image(9, (24, 24)), "caption": "jpeg one", "image_ext": "jpeg"})
    write_pair_shard(good, examples)
    with wds_writer(tmp_path / "missing.tar") as writer:
        writer.write({"__key__": "only-image", "png": encode_image(make_image(0, (8, 8)))})
        writer.write({"__key__": "only-text", "txt": b"no image"})
        writer.write({"__key__": "fine", "png": encode_image(make_image(1, (8, 8))), "txt": b"fine"})
    truncated = tmp_path / "truncated.tar"
    write_pair_shard(truncated, pair_examples("truncated", 4))
    truncate_inside(truncated, "000000002.png")
    bad_header = tmp_path / "bad_header.tar"
    write_pair_shard(bad_header, pair_examples("header", 3))
    corrupt_header(bad_header, "000000001.png")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is no tar file " * 100)

    # The junk shard yields nothing: its count travels with the next sample this process yields.
    shards = [str(junk), str(good), str(tmp_path / "missing.tar"), str(truncated), str(bad_header)]
    samples = list(build_pair_dataset(shards, processor, seed=0, shuffle=False))
    assert captions(samples, processor) == [
        "good 0", "good 1", "jpeg one", "fine", "truncated 0", "truncated 1", "header 0"]
    assert summed_skips(samples) == {shard_reading.UNDECODABLE_IMAGE: 1, shard_reading.MISSING_FIELDS: 2, shard_reading.TRUNCATED_TAR: 1,
                                     shard_reading.CORRUPT_TAR: 2}
    for sample in samples:
        assert sample["pixel_values"].shape == (1, 1, 3, 30, 30)
        assert set(sample) == {"input_ids", "attention_mask", "labels", "pixel_values", SKIPPED_KEY}


def wds_writer(path):
    import webdataset as wds

    return wds.TarWriter(str(path), encoder=False)


def test_pair_dataset_jsonl_and_folder(processor, tmp_path):
    (tmp_path / "images").mkdir()
    make_image(0, (24, 24)).save(tmp_path / "images" / "a.png")
    lines = [
        json.dumps({"image": "images/a.png", "caption": "from jsonl"}),
        "{not json",
        json.dumps({"image": "images/a.png"}),
        json.dumps({"image": "images/missing.png", "caption": "x"}),
        "",
        json.dumps({"image": str(tmp_path / "images" / "a.png"), "caption": "absolute path"}),
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    make_image(1, (24, 24)).save(folder / "x.jpg")
    (folder / "x.txt").write_text("from folder")
    make_image(2, (24, 24)).save(folder / "y.png")  # no caption
    (folder / "z.txt").write_text("no image")
    (folder / "README.md").write_text("ignored")
    samples = list(build_pair_dataset([str(tmp_path / "pairs.jsonl"), str(folder)], processor, shuffle=False))
    assert captions(samples, processor) == ["from jsonl", "absolute path", "from folder"]
    assert summed_skips(samples) == {shard_reading.BAD_JSON: 1, shard_reading.MISSING_FIELDS: 3, shard_reading.MISSING_IMAGE_FILE: 1}


def test_interleaved_dataset_skips_and_counts_bad_data(processor, tmp_path):
    def document(name: str, seed: int) -> dict:
        return mmc4([f"{name} one.", f"{name} two."], [big_png(seed), big_png(seed + 1)], [[0.9, 0.0], [0.0, 0.9]])

    good = tmp_path / "docs.tar"
    write_interleaved_shard(good, [
        document("first", 0),
        "{not json",
        {"text_list": ["no images"], "similarity_matrix": []},
        mmc4(["corrupt image."], [b"not an image" * 1000], [[0.9]]),
        document("second", 2),
        gpt_document("gpt _!_IMAGE1_!_ one _!_IMAGE2_!_ two", {1: big_png(4), 2: big_png(5)}),
    ])
    with wds_writer(tmp_path / "no_json.tar") as writer:
        writer.write({"__key__": "x", "txt": b"no json member"})
    truncated = tmp_path / "truncated.tar"
    write_interleaved_shard(truncated, [document("third", 6), document("cut", 8)])
    truncate_inside(truncated, "000000001.json")

    dataset = build_interleaved_dataset([str(good), str(tmp_path / "no_json.tar"), str(truncated)], processor,
                                        max_num_images=2, max_length=64, shuffle=False)
    samples = list(dataset)
    image, eoc, eos = tokens(processor)
    assert [text_of(sample, processor) for sample in samples] == [
        f"{image}first one.{eoc}{image}first two.{eoc}{eos}",
        f"{image}second one.{eoc}{image}second two.{eoc}{eos}",
        f"gpt{image}one{eoc}{image}two{eoc}{eos}",
        f"{image}third one.{eoc}{image}third two.{eoc}{eos}",
    ]
    assert summed_skips(samples) == {shard_reading.BAD_JSON: 1, shard_reading.MISSING_FIELDS: 2, shard_reading.NO_IMAGES: 1,
                                     shard_reading.IMAGE_UNDECODABLE: 1, shard_reading.TRUNCATED_TAR: 1}
    assert all(sample["pixel_values"].shape == (2, 1, 3, 30, 30) for sample in samples)


def test_warnings_are_rate_limited(processor, tmp_path, monkeypatch):
    monkeypatch.setattr(shard_reading, "_warned", Counter())
    shard = tmp_path / "bad.tar"
    below_threshold = mmc4(["no."], [big_png(0)], [[0.1]])
    good = mmc4(["S0.", "S1."], [big_png(1), big_png(2)], [[0.9, 0.0], [0.0, 0.9]])
    write_interleaved_shard(shard, ["{bad"] * 5 + [below_threshold, good])
    with CaptureLogger(shard_reading.logger) as captured:
        samples = list(build_interleaved_dataset(str(shard), processor, max_length=32))
    assert summed_skips(samples) == {shard_reading.BAD_JSON: 5, shard_reading.NO_IMAGES: 1, shard_reading.IMAGE_BELOW_THRESHOLD: 1}
    assert captured.out.count("bad_json") == 3 and "further such warnings are not shown" in captured.out
    assert "no_images" not in captured.out and "below_threshold" not in captured.out  # recipe rejections


@pytest.fixture(scope="module")
def four_pair_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    shards = []
    for index in range(4):
        path = folder / f"shard-{index:04d}.tar"
        write_pair_shard(path, pair_examples(f"s{index}", 3, start=10 * index))
        shards.append(str(path))
    return shards


def test_workers_and_nodes_see_disjoint_samples(processor, four_pair_shards):
    dataset = build_pair_dataset(four_pair_shards, processor, seed=3)
    samples = list(dataset)
    single = {caption: sample["pixel_values"] for caption, sample in zip(captions(samples, processor), samples)}
    everything = {f"s{index} {10 * index + k}" for index in range(4) for k in range(3)}
    assert set(single) == everything

    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    from_workers = list(loader)
    worker_captions = captions(from_workers, processor)
    assert sorted(worker_captions) == sorted(everything)  # each sample exactly once
    # The flips depend on the shard, not on the worker that read it.
    for caption, sample in zip(worker_captions, from_workers):
        torch.testing.assert_close(sample["pixel_values"], single[caption])

    nodes = [captions(list(split_dataset_by_node(dataset, rank, 2)), processor) for rank in range(2)]
    assert not set(nodes[0]) & set(nodes[1])
    assert sorted(nodes[0] + nodes[1]) == sorted(everything)


def test_repeat_and_shuffling(processor, four_pair_shards):
    dataset = build_pair_dataset(four_pair_shards[:2], processor, repeat=True, shuffle=False)
    seen = captions(list(itertools.islice(dataset, 10)), processor)
    assert seen == ["s0 0", "s0 1", "s0 2", "s1 10", "s1 11", "s1 12"] + ["s0 0", "s0 1", "s0 2", "s1 10"]
    shuffled = captions(list(build_pair_dataset(four_pair_shards, processor, shuffle_buffer_size=8)), processor)
    in_order = captions(list(build_pair_dataset(four_pair_shards, processor, shuffle=False)), processor)
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    # A buffer of 0 shuffles the shards only: each shard's samples stay together and in order.
    shards_only = captions(list(build_pair_dataset(four_pair_shards, processor, shuffle_buffer_size=0)), processor)
    assert shards_only != in_order and sorted(shards_only) == sorted(in_order)
    chunks = lambda names: sorted(names[i:i + 3] for i in range(0, 12, 3))  # noqa: E731
    assert chunks(shards_only) == chunks(in_order)
    with pytest.raises(ValueError, match="shuffle_buffer_size must be >= 0"):
        build_pair_dataset(four_pair_shards, processor, shuffle_buffer_size=-1)


def test_skip_counts_reach_the_collator_through_workers(processor, tmp_path):
    shards = []
    for index in range(2):
        path = tmp_path / f"shard-{index}.tar"
        examples = pair_examples(f"s{index}", 3)
        examples.insert(1, {"image": b"broken", "caption": "broken"})
        examples.append({"image": b"broken", "caption": "broken at the end"})
        write_pair_shard(path, examples)
        shards.append(str(path))
    collator = OpenFlamingoDataCollator(pad_token_id=processor.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(build_pair_dataset(shards, processor), batch_size=2, num_workers=2,
                                         collate_fn=collator)
    total, count = Counter(), 0
    for batch in loader:
        total.update(batch.get(SKIPPED_KEY, {}))
        count += batch["input_ids"].shape[0]
    assert count == 6 and total == {shard_reading.UNDECODABLE_IMAGE: 4}


def test_seeds_make_results_reproducible(processor, four_pair_shards):
    def flips(seed):
        return [sample["pixel_values"] for sample in build_pair_dataset(four_pair_shards, processor, seed=seed)]

    first, again, other = flips(0), flips(0), flips(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_unexpected_preprocessing_errors_are_skipped(processor, tmp_path, monkeypatch):
    original = data.preprocess_pair

    def failing(image, caption, *args, **kwargs):
        if caption == "boom":
            raise RuntimeError("image processor failure")
        return original(image, caption, *args, **kwargs)

    monkeypatch.setattr(data, "preprocess_pair", failing)
    shard = tmp_path / "shard.tar"
    write_pair_shard(shard, pair_examples("ok", 1) + [{"image": make_image(5, (24, 24)), "caption": "boom"}])
    samples = list(build_pair_dataset(str(shard), processor, shuffle=False))
    assert captions(samples, processor) == ["ok 0"]
    assert summed_skips(samples) == {shard_reading.PREPROCESS_ERROR: 1}
