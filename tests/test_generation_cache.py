"""Generation that continues from a filled cache (chat turns, assisted decoding), the cache's old keyword name, and
what `torch.compile` needs (issue 18: (a), (b) and the compile points).

Each property is checked against an uninterrupted computation (one `generate`, a forward without a cache, eager
execution), never against the code path under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import CompileConfig

from openflamingo_hf import OpenFlamingoForConditionalGeneration, OpenFlamingoModel
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image

GREEDY = dict(do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model_and_processor("llama", seed=0, gate=0.5)


def _batch(processor, images, texts):
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def _two_rows(processor):
    """Rows with different numbers of images (so a padding image slot) and lengths."""
    return _batch(
        processor,
        [[make_image(1), make_image(2)], [make_image(3)]],
        ["<image>A cat.<|endofchunk|><image>Output:", "<image>Output: two"],
    )


def _extend_mask(attention_mask, sequences):
    new = sequences.shape[1] - attention_mask.shape[1]
    return torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], new)], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# (a) Continuing from a filled cache with images
# ----------------------------------------------------------------------------------------------------------------------


def test_continuing_generate_from_a_filled_cache_equals_one_uninterrupted_generate(llama):
    model, processor = llama
    inputs = _two_rows(processor)
    uninterrupted = model.generate(**inputs, max_new_tokens=8, **GREEDY)
    first = model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True, **GREEDY)
    assert first.cache.get_seq_length() > inputs["input_ids"].shape[1]
    continued = model.generate(
        input_ids=first.sequences,
        attention_mask=_extend_mask(inputs["attention_mask"], first.sequences),
        pixel_values=inputs["pixel_values"],
        cache=first.cache,
        max_new_tokens=4,
        **GREEDY,
    )
    assert torch.equal(continued, uninterrupted)


def test_a_chat_turn_with_a_new_image_reuses_the_cache(llama):
    """The next turn of a chat adds text and an image to the conversation and continues from the cache of the
    previous turn: the tokens are those of generating from the whole conversation without a cache."""
    model, processor = llama
    turn_one = processor(images=[[make_image(1)]], text=["<image>Output:"], return_tensors="pt")
    first = model.generate(**turn_one, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    new_turn = processor.tokenizer("<|endofchunk|><image>Output:", return_tensors="pt", add_special_tokens=False)
    conversation = torch.cat([first.sequences, new_turn["input_ids"]], dim=1)
    both_images = processor(images=[[make_image(1), make_image(2)]], text=["<image><image>"], return_tensors="pt")
    common = dict(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                  pixel_values=both_images["pixel_values"], max_new_tokens=4, **GREEDY)
    continued = model.generate(cache=first.cache, **common)
    from_scratch = model.generate(**common)
    assert torch.equal(continued, from_scratch)


@pytest.mark.parametrize("draft_seed", [1, 0], ids=["other_draft", "self_draft"])
def test_assisted_decoding_gives_the_targets_greedy_tokens(llama, draft_seed):
    """Assisted (speculative) decoding continues both models from their caches with images: whatever the draft
    proposes, the tokens are the target's own greedy ones."""
    model, processor = llama
    draft = model if draft_seed == 0 else build_tiny_model_and_processor("llama", seed=draft_seed, gate=0.5)[0]
    inputs = processor(images=[[make_image(1), make_image(2)]], text=["<image>A cat.<|endofchunk|><image>Output:"],
                       return_tensors="pt")
    greedy = model.generate(**inputs, max_new_tokens=10, **GREEDY)
    assisted = model.generate(**inputs, max_new_tokens=10, assistant_model=draft, **GREEDY)
    assert torch.equal(assisted, greedy)


# ----------------------------------------------------------------------------------------------------------------------
# (b) past_key_values, the old name of cache
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [OpenFlamingoForConditionalGeneration, OpenFlamingoModel])
def test_past_key_values_is_the_cache(llama, model_class):
    model, processor = llama
    model = model if model_class is OpenFlamingoForConditionalGeneration else model.model
    inputs = _two_rows(processor)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    head = model_class is OpenFlamingoForConditionalGeneration
    output = lambda out: out.logits if head else out.last_hidden_state  # noqa: E731
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], pixel_values=inputs["pixel_values"],
                        use_cache=True)
        step = dict(input_ids=ids[:, -1:], attention_mask=mask, media_cache=prefill.media_cache,
                    media_index=model.get_media_index(ids)[:, -1:])
        by_new_name = model(cache=copy.deepcopy(prefill.cache), **step)
        by_old_name = model(past_key_values=copy.deepcopy(prefill.cache), **step)
        whole = model(**inputs)
    torch.testing.assert_close(output(by_old_name), output(by_new_name), rtol=0, atol=0)
    torch.testing.assert_close(output(by_old_name)[:, -1], output(whole)[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="past_key_values is the old name of cache"):
        model(cache=copy.deepcopy(prefill.cache), past_key_values=copy.deepcopy(prefill.cache), **step)


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------------


def test_can_compile_fullgraph_is_declared_on_the_classes():
    """transformers' compile and static-cache tests read the class attribute; an instance whose language model does
    not pass keyword arguments to its layers (transformers' MPT) declares itself not compilable."""
    assert OpenFlamingoForConditionalGeneration._can_compile_fullgraph is True
    assert OpenFlamingoModel._can_compile_fullgraph is True
    mpt, _ = build_tiny_model_and_processor("mpt")
    assert not mpt._can_compile_fullgraph and not mpt.model._can_compile_fullgraph


def test_compiled_decode_steps_do_not_recompile_with_static_shapes(llama):
    """With `dynamic=False` every decode step has the same shapes and strides, so the step compiles once (the
    media index of the new token used to be a slice of the growing sequence, whose stride grew at every step)."""
    model, processor = llama
    inputs = _two_rows(processor)
    eager = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # generate() compiles on GPUs only unless told otherwise
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = model.generate(**inputs, max_new_tokens=6, cache_implementation="static",
                                  compile_config=compile_config, **GREEDY)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        model.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    assert graphs == 1


@pytest.mark.parametrize("headless", [False, True], ids=["head_model", "headless_model"])
def test_a_prompt_forward_with_images_compiles_into_one_graph(llama, headless):
    """The whole prompt call, vision tower and Perceiver included, traces with `fullgraph=True`: input validation
    (host syncs) stays outside the compiled region."""
    model, processor = llama
    module = model.model if headless else model
    inputs = _two_rows(processor)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = module(**inputs)
            compiled = torch.compile(module, fullgraph=True, backend="eager")(**inputs)
    finally:
        torch._dynamo.reset()
    name = "last_hidden_state" if headless else "logits"
    torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-5)
