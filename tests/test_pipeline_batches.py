"""pipeline("image-text-to-text") batches (batch_size > 1) whose rows hold different numbers of images answer exactly
as the rows run one by one: OpenFlamingoPipeline by itself, the stock pipeline with the processor padding every row to
the same image count (`processor_kwargs={"max_num_images": N}`). Real answers of the shipped model."""

import pytest
from transformers import pipeline

from openflamingo_hf.embedded import caption, load_embedded_model, make_examples
from openflamingo_hf.pipeline_openflamingo import OpenFlamingoPipeline

GREEDY = {"max_new_tokens": 12, "do_sample": False}


@pytest.fixture(scope="module")
def model_and_processor():
    return load_embedded_model()


@pytest.fixture(scope="module")
def examples():
    return make_examples(6, seed=1_000_101)


def few_shot_chat(examples):
    """User/assistant turns: every example but the last captioned, the last the query (one image per example)."""
    messages = []
    for demo in examples[:-1]:
        messages += [{"role": "user", "content": [{"type": "image", "image": demo.image}]},
                     {"role": "assistant", "content": demo.caption}]
    return messages + [{"role": "user", "content": [{"type": "image", "image": examples[-1].image}]}]


@pytest.fixture(scope="module")
def chats(examples):
    """Rows with 1, 2, 0 (text only) and 3 images."""
    return [
        few_shot_chat(examples[:1]),
        few_shot_chat(examples[1:3]),
        [{"role": "user", "content": [{"type": "text", "text": "Question:What color is it? Short answer:"}]}],
        few_shot_chat(examples[3:6]),
    ]


def answers(results):
    return [result[0]["generated_text"] for result in results]


PIPELINES = ["OpenFlamingoPipeline", "stock with max_num_images"]


def pipeline_and_call_kwargs(name):
    """Fresh dicts each time: transformers' apply_chat_template writes into the `processor_kwargs` it is given."""
    if name == "OpenFlamingoPipeline":
        return {"pipeline_class": OpenFlamingoPipeline}, {}
    return {}, {"processor_kwargs": {"max_num_images": 3}}


@pytest.mark.parametrize("name", PIPELINES)
def test_chats_with_1_2_0_and_3_images_batched_equal_one_by_one(name, model_and_processor, chats, examples):
    model, processor = model_and_processor
    pipeline_kwargs, call_kwargs = pipeline_and_call_kwargs(name)
    pipe = pipeline("image-text-to-text", model=model, processor=processor, **pipeline_kwargs)
    alone = [pipe(text=chat, generate_kwargs=GREEDY, return_full_text=False)[0]["generated_text"] for chat in chats]
    batched = pipe(text=chats, batch_size=4, generate_kwargs=GREEDY, return_full_text=False, **call_kwargs)
    assert answers(batched) == alone
    # Real answers: the zero-shot row is caption(), the few-shot rows caption their query image.
    assert alone[0] == caption([examples[0].image])[0]
    assert alone[1] == examples[2].caption and alone[3] == examples[5].caption


@pytest.mark.parametrize("name", PIPELINES)
def test_prompts_with_different_image_counts_batched_equal_one_by_one(name, model_and_processor, examples):
    model, processor = model_and_processor
    pipeline_kwargs, call_kwargs = pipeline_and_call_kwargs(name)
    pipe = pipeline("image-text-to-text", model=model, processor=processor, **pipeline_kwargs)
    rows = [
        {"images": [examples[0].image, examples[1].image],
         "text": processor.few_shot_prompt([examples[0].caption], "")},
        {"images": [examples[2].image], "text": "<image>"},
        {"images": [examples[3].image, examples[4].image, examples[5].image],
         "text": processor.few_shot_prompt([examples[3].caption, examples[4].caption], "")},
    ]
    alone = [pipe(row, generate_kwargs=GREEDY, return_full_text=False)[0]["generated_text"] for row in rows]
    # Rows streamed from a generator (as from a dataset; transformers reads a list of dicts as one chat), in batches
    # of 2: a full one, then a batch of one row.
    batched = pipe((row for row in rows), batch_size=2, generate_kwargs=GREEDY, return_full_text=False, **call_kwargs)
    assert answers(list(batched)) == alone
    assert alone == [examples[1].caption, caption([examples[2].image])[0], examples[5].caption]


def test_videos_images_and_text_in_one_batch(model_and_processor):
    """The video variant: a clip (4 frames), an image (1 frame) and a text-only row in one batch."""
    from openflamingo_hf.embedded import caption_clips, load_embedded_video_model, make_clips

    model, processor = load_embedded_video_model()
    clip = make_clips(1, seed=1_009_003)[0]
    image = make_examples(1, seed=1_000_131)[0].image
    chats = [
        [{"role": "user", "content": [{"type": "video", "video": clip.frames}]}],
        [{"role": "user", "content": [{"type": "image", "image": image}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Question:What shape is it? Short answer:"}]}],
    ]
    pipe = pipeline("image-text-to-text", model=model, processor=processor, pipeline_class=OpenFlamingoPipeline)
    generate = {"max_new_tokens": 24, "do_sample": False}
    alone = [pipe(text=chat, generate_kwargs=generate, return_full_text=False)[0]["generated_text"] for chat in chats]
    batched = pipe(text=chats, batch_size=3, generate_kwargs=generate, return_full_text=False)
    assert answers(batched) == alone
    assert alone[0] == caption_clips([clip])[0]


def test_stock_pipeline_needs_the_common_image_count(model_and_processor, chats):
    """Without `max_num_images` the stock collation concatenates rows' `pixel_values` and cannot batch these rows
    (transformers' own limitation); OpenFlamingoPipeline and the processor option above are the two ways around it.
    If this starts passing, transformers batches such rows by itself."""
    model, processor = model_and_processor
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    with pytest.raises((ValueError, RuntimeError)):
        pipe(text=chats, batch_size=4, generate_kwargs=GREEDY, return_full_text=False)
