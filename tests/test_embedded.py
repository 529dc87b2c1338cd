"""The procedural world and the shipped embedded OpenFlamingo (trained by examples/train_embedded.py)."""


import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf import OpenFlamingoForConditionalGeneration
from openflamingo_hf.convert.convert_original import convert_original_state_dict, export_original_state_dict
from openflamingo_hf.embedded import (
    EMBEDDED_MODEL_DIR,
    answer,
    caption,
    default_caption_prompt,
    follows_format,
    in_context_format_following,
    load_embedded_model,
    make_examples,
    sample_captions,
    sample_examples,
    sample_image_paths,
)
from openflamingo_hf.embedded.world import (
    CHUNK_KINDS,
    COUNTS,
    FORMATS,
    HELD_OUT_SEED_START,
    chunk_texts,
    make_document,
    output_caption_text,
    text_corpus,
    vqa_text,
    write_world_shards,
)
from openflamingo_hf.trainer.data import build_interleaved_dataset, build_pair_dataset

HELD_OUT_SEED = HELD_OUT_SEED_START + 4242  # write_world_shards never trains on seeds from HELD_OUT_SEED_START on


# ----------------------------------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------------------------------


def test_examples_are_reproducible_and_consistent():
    first, again = make_examples(12, seed=7), make_examples(12, seed=7)
    for a, b in zip(first, again):
        assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [e.caption for e in make_examples(12, 7, draw_images=False)] == [e.caption for e in first]
    assert [e.caption for e in make_examples(12, 8)] != [e.caption for e in first]
    for example in first:
        plural = "s" if example.count > 1 else ""
        assert example.caption == f"{COUNTS[example.count]} {example.color} {example.shape}{plural}."
        assert example.answer in (example.color, example.shape, COUNTS[example.count])
        assert example.image.size == (96, 96) and example.image.mode == "RGB"
    assert {FORMATS[name]("circle", "red", 2) for name in FORMATS} == {"circle-red-2", "red/circle/2", "2 red circle"}


def test_world_shards_read_by_the_recipe(tmp_path):
    from openflamingo_hf.testing_utils import build_tiny_model_and_processor

    _, processor = build_tiny_model_and_processor("llama")
    shards = write_world_shards(tmp_path, num_pairs=6, num_documents=3, seed=3, shard_size=4)
    pairs = list(build_pair_dataset(shards["pairs"], processor, max_length=24))
    documents = list(build_interleaved_dataset(shards["docs"], processor, max_length=128))
    assert len(pairs) == 6 and len(documents) == 3
    assert not any(sample["skipped"] for sample in pairs + documents)
    for document in documents:
        markers = int((document["input_ids"] == processor.image_token_id).sum())
        assert markers == document["pixel_values"].shape[0] >= 3


def test_documents_keep_one_tag_format():
    rng = np.random.default_rng(0)
    documents = [make_document(make_examples(4, seed), rng) for seed in range(30)]
    tags = [d["text_list"] for d in documents if d["text_list"][0].startswith("Tag:")]
    assert tags
    for sentences in tags:
        formats = {name for s in sentences for name in FORMATS if follows_format(s[len("Tag: "):], name)}
        assert len(formats) == 1


def test_chunks_use_the_processors_prompt_shapes(embedded):
    _, processor = embedded
    example = make_examples(1, seed=3)[0]
    # The released models' prompts come from the processor's templates, with the answer and without (the query).
    assert chunk_texts(example, "output_caption") == processor.task_text("captioning", example.caption)
    assert output_caption_text() == processor.task_text("captioning")
    assert chunk_texts(example, "vqa") == processor.task_text("vqa", example.answer, question=example.question)
    assert vqa_text(example.question) == processor.task_text("vqa", question=example.question)
    assert chunk_texts(example, "caption") == example.caption
    with pytest.raises(ValueError, match="Unknown chunk kind 'story'; use one of caption, output_caption"):
        chunk_texts(example, "story")


def test_every_chunk_kind_is_in_the_documents_and_the_text_corpus():
    def kind_of(sentence: str) -> str:
        for prefix, kind in (("Output:", "output_caption"), ("Question:", "vqa"), ("Tag:", "tag")):
            if sentence.startswith(prefix):
                return kind
        return "caption"

    rng = np.random.default_rng(0)
    documents = [make_document(make_examples(3, seed), rng) for seed in range(40)]
    assert {kind_of(d["text_list"][0]) for d in documents} == set(CHUNK_KINDS)
    for document in documents:  # one kind per document
        assert len({kind_of(sentence) for sentence in document["text_list"]}) == 1
    assert {kind_of(text) for text in text_corpus(60, seed=1)} == set(CHUNK_KINDS)


def test_default_caption_prompt_is_the_released_few_shot_format(embedded):
    _, processor = embedded
    captions = sample_captions()
    expected = processor.task_prompt([processor.task_text("captioning", c) for c in captions[:2]],
                                     processor.task_text("captioning"))
    assert default_caption_prompt(processor, 3) == expected
    assert expected.startswith(f"<image>Output:{captions[0]}<|endofchunk|>") and expected.endswith("<image>Output:")


# ----------------------------------------------------------------------------------------------------------------------
# The shipped model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    return load_embedded_model()


def test_captions_and_answers_through_the_pipeline(embedded):
    model, processor = embedded
    examples = make_examples(40, HELD_OUT_SEED)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    images = [[e.image] for e in examples]
    caption_prompts = [processor.few_shot_prompt([], "")] * len(examples)  # "<image>": the recipe's pair text
    vqa_prompts = [processor.few_shot_prompt([], vqa_text(e.question)) for e in examples]
    greedy = {"return_full_text": False, "batch_size": 8, "generate_kwargs": {"max_new_tokens": 16, "do_sample": False}}
    captions = [r["generated_text"].strip() for r in pipe(images=images, text=caption_prompts, **greedy)]
    answers = [r["generated_text"].strip() for r in pipe(images=images, text=vqa_prompts, **greedy)]
    caption_accuracy = np.mean([c == e.caption for c, e in zip(captions, examples)])
    vqa_accuracy = np.mean([a == e.answer for a, e in zip(answers, examples)])
    assert caption_accuracy >= 0.9, list(zip(captions, [e.caption for e in examples]))
    assert vqa_accuracy >= 0.8, list(zip(answers, [e.answer for e in examples]))
    # The batched helpers give the same texts as the pipeline.
    assert caption([e.image for e in examples[:8]]) == captions[:8]
    assert answer([e.image for e in examples[:8]], [e.question for e in examples[:8]]) == answers[:8]


def test_in_context_learning_of_the_tag_format(embedded):
    model, processor = embedded
    scores = in_context_format_following(make_examples(30, HELD_OUT_SEED + 1), model, processor, shots=4,
                                         seed=HELD_OUT_SEED)
    assert scores["format_4shot"] - scores["format_0shot"] >= 0.3, scores


def test_folder_loads_by_path_like_any_model():
    model = AutoModelForImageTextToText.from_pretrained(EMBEDDED_MODEL_DIR)
    processor = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR)
    assert isinstance(model, OpenFlamingoForConditionalGeneration)
    # Stops at <|endofchunk|> (Trainer's token alignment adds the tokenizer's eos, the recipe's end of document).
    assert processor.eoc_token_id in model.generation_config.eos_token_id
    pipe = pipeline("image-text-to-text", model=EMBEDDED_MODEL_DIR)
    example = sample_examples()[0]
    out = pipe(images=[sample_image_paths()[0]], text="<image>", return_full_text=False,
               generate_kwargs={"max_new_tokens": 16, "do_sample": False})
    assert out[0]["generated_text"].strip() == example.caption


def test_samples_match_their_examples():
    paths, examples = sample_image_paths(), sample_examples()
    assert len(paths) == 6 and sample_captions() == [e.caption for e in examples]
    from PIL import Image

    for path, example in zip(paths, examples):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(example.image))


def test_converts_to_the_original_layout_and_back_with_identical_outputs(embedded):
    model, processor = embedded
    original = export_original_state_dict(model, full=True)
    converted = convert_original_state_dict(original, model.config)
    rebuilt = OpenFlamingoForConditionalGeneration.from_pretrained(None, config=model.config, state_dict=converted)
    rebuilt.eval()
    examples = sample_examples()[:3]
    inputs = processor(images=[[e.image for e in examples]], text=[processor.few_shot_prompt(
        [e.caption for e in examples[:-1]], "")], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs).logits, model(**inputs).logits)
    assert torch.equal(rebuilt.generate(**inputs, max_new_tokens=12), model.generate(**inputs, max_new_tokens=12))


def test_clips_move_their_shape_in_the_captioned_direction():
    from openflamingo_hf.embedded.world import COLORS, DIRECTIONS, make_clips

    clips = make_clips(12, seed=3)
    assert {c.direction for c in clips} <= set(DIRECTIONS) and len({c.direction for c in clips}) > 1
    for clip in clips:
        assert clip.caption == f"one {clip.color} {clip.shape} moving {clip.direction}."
        target = np.array(COLORS[clip.color])
        centres = []
        for frame in clip.frames:  # the shape's pixels: within 25 of its colour on every channel
            ys, xs = np.nonzero((np.abs(np.asarray(frame).astype(int) - target) <= 25).all(axis=-1))
            centres.append((xs.mean(), ys.mean()))
        dx, dy = np.subtract(centres[-1], centres[0])
        moved = np.sign(np.round([dx / 10, dy / 10])).tolist()
        assert moved == list(DIRECTIONS[clip.direction]), (clip.caption, dx, dy)
    again = make_clips(12, seed=3)
    assert all(np.array_equal(np.asarray(a.frames[2]), np.asarray(b.frames[2])) for a, b in zip(clips, again))
