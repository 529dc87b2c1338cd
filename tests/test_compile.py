"""Static cache, torch.compile and the one-image decode step (issue 11).

Every comparison is against the eager dynamic-cache model, or against a full recomputation of the sequence, never
against the code path under test.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from transformers import CompileConfig, StaticCache

from openflamingo_hf.modeling.modeling_openflamingo import OpenFlamingoCrossAttention
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image
from openflamingo_hf.tiny_models import TEXT_FAMILIES

# Language models whose decoder layers receive keyword arguments, so the gated blocks trace into one graph.
COMPILABLE_FAMILIES = ("llama", "gpt_neox", "mosaic_gpt")


def _batch(processor, num_images=(2, 1)):
    """A left-padded batch: rows with different numbers of images (so padding image slots) and lengths."""
    texts = ["<image>A cat.<|endofchunk|>" * (n - 1) + "<image>Output:" + " two" * row for row, n in enumerate(num_images)]
    images = [[make_image(10 * row + i) for i in range(n)] for row, n in enumerate(num_images)]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def _greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_static_cache_generation_equals_dynamic_cache_generation(family):
    model, processor = build_tiny_model_and_processor(family)
    inputs = _batch(processor)
    dynamic = _greedy(model, inputs)
    assert torch.equal(_greedy(model, inputs, cache_implementation="static"), dynamic)
    beams = dict(num_beams=3, num_return_sequences=2)
    assert torch.equal(
        _greedy(model, inputs, cache_implementation="static", **beams), _greedy(model, inputs, **beams)
    )


def _decode_step_inputs(model, inputs):
    """A prefill into a `StaticCache`, and the inputs of the next one-token step, as generate() builds them."""
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=64)
    prefill = model(**inputs, cache=cache, use_cache=True)
    next_token = prefill.logits[:, -1:].argmax(-1)
    full_ids = torch.cat([inputs["input_ids"], next_token], dim=1)
    step = dict(
        input_ids=next_token,
        attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=1),
        media_index=model.get_media_index(full_ids)[:, -1:],
        media_cache=prefill.media_cache,
        cache=cache,
        use_cache=True,
    )
    return step, full_ids


@pytest.mark.parametrize("family", COMPILABLE_FAMILIES)
def test_the_decode_step_traces_into_one_graph(family):
    model, processor = build_tiny_model_and_processor(family)
    assert model._can_compile_fullgraph
    step, _ = _decode_step_inputs(model, _batch(processor))
    explanation = torch._dynamo.explain(model)(**step)
    reasons = [str(reason.reason).splitlines()[0] for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("family", COMPILABLE_FAMILIES)
def test_compiled_static_cache_generation_equals_eager_generation(family):
    model, processor = build_tiny_model_and_processor(family)
    inputs = _batch(processor)
    eager = _greedy(model, inputs)
    # aot_eager traces exactly what inductor would compile (same graph, fullgraph=True refuses any break), without
    # the minutes of C++ compilation on CPU; benchmarks/ time inductor.
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # generate() compiles on GPUs only unless told otherwise
    torch._dynamo.reset()
    compiled = _greedy(model, inputs, cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call"), "generate() did not compile the decode step"
    assert torch.equal(compiled, eager)


def test_compiling_a_language_model_that_drops_layer_keyword_arguments_is_an_error():
    """transformers' MPT does not hand keyword arguments to its blocks: under compile the gated blocks would be
    skipped silently, so the model refuses instead."""
    model, processor = build_tiny_model_and_processor("mpt")
    assert not model._can_compile_fullgraph
    step, _ = _decode_step_inputs(model, _batch(processor))
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="does not pass keyword arguments on to its decoder layers"):
        torch.compile(model, backend="eager")(**step)


def _key_lengths(model):
    """Records the key length every cross-attention call sees."""
    lengths = []
    handles = [
        module.register_forward_hook(lambda module, args, output: lengths.append(args[1].shape[2]))
        for module in model.modules()
        if isinstance(module, OpenFlamingoCrossAttention)
    ]
    return lengths, handles


@pytest.mark.parametrize("next_token", ["text", "<image>"])
def test_a_decode_step_attends_to_one_image_and_equals_the_masked_attention(next_token):
    """With immediate media a decoding token reads only its own image's latents (not all images' under a mask), and
    gets the logits of the masked path: the last two tokens decoded in one call after a prefill of the rest (and, for
    a text token, of recomputing the whole sequence). Also when the new token is an <image> beyond the images given
    (it then sees none), and for a row with a padding image slot."""
    model, processor = build_tiny_model_and_processor("llama", perceiver_num_latents=4)
    inputs = _batch(processor, num_images=(3, 1))
    step, _ = _decode_step_inputs(model, inputs)
    if next_token == "<image>":
        step["input_ids"] = torch.full_like(step["input_ids"], model.config.media_token_id)
    full_ids = torch.cat([inputs["input_ids"], step["input_ids"]], dim=1)
    step["media_index"] = model.get_media_index(full_ids)[:, -1:]

    lengths, handles = _key_lengths(model)
    decoded = model(**step).logits[:, -1]
    for handle in handles:
        handle.remove()
    assert set(lengths) == {model.config.perceiver_num_latents}  # one image's latents, not 3 images'

    # The masked path: prefill all but the last prompt token, then decode it and the new token in one call.
    head = {"input_ids": inputs["input_ids"][:, :-1], "attention_mask": inputs["attention_mask"][:, :-1]}
    prefill = model(**head, pixel_values=inputs["pixel_values"], use_cache=True)
    masked = model(
        input_ids=full_ids[:, -2:],
        attention_mask=step["attention_mask"],
        media_index=model.get_media_index(full_ids)[:, -2:],
        media_cache=prefill.media_cache,
        cache=prefill.cache,
    ).logits[:, -1]
    torch.testing.assert_close(decoded, masked, atol=1e-5, rtol=1e-5)
    if next_token == "text":
        full = model(
            input_ids=full_ids, pixel_values=inputs["pixel_values"], attention_mask=step["attention_mask"]
        ).logits[:, -1]
        torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


def test_decode_steps_after_many_shots_read_as_many_latents_as_after_one():
    model, processor = build_tiny_model_and_processor("llama")
    lengths_by_shots = {}
    for shots in (1, 8):
        text = "<image>A cat.<|endofchunk|>" * shots + "<image>Output:"
        images = [[make_image(i) for i in range(shots + 1)]]
        inputs = processor(images=images, text=[text], return_tensors="pt")
        lengths, handles = _key_lengths(model)
        _greedy(model, inputs)
        for handle in handles:
            handle.remove()
        prefill_calls = len(model.gated_cross_attn_layers)
        lengths_by_shots[shots] = set(lengths[prefill_calls:])
    assert lengths_by_shots[1] == lengths_by_shots[8] == {model.config.perceiver_num_latents}


def test_decode_compile_config_per_device():
    from openflamingo_hf import decode_compile_config

    cpu = decode_compile_config("cpu")
    assert cpu.fullgraph and cpu.mode is None and cpu.options == {"cpp_wrapper": True}
    assert cpu._compile_all_devices  # else generate() would not compile on CPU at all
    gpu = decode_compile_config(torch.device("cuda", 0))
    assert gpu.fullgraph and gpu.mode == "reduce-overhead" and not gpu.options


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
def test_inductor_cpp_wrapper_generation_equals_eager_generation():
    """The CPU configuration the benchmarks time (real inductor, C++ wrapper: ~30 s of C++ compilation, once) gives
    the eager tokens on a left-padded batch with padding image slots."""
    from openflamingo_hf import decode_compile_config

    model, processor = build_tiny_model_and_processor("llama")
    inputs = _batch(processor)
    eager = _greedy(model, inputs)
    torch._dynamo.reset()
    compiled = _greedy(model, inputs, cache_implementation="static", compile_config=decode_compile_config("cpu"))
    assert hasattr(model, "_compiled_call"), "generate() did not compile the decode step"
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_image_runs_equal_the_masked_cross_attention_in_loss_and_gradients(family, monkeypatch):
    """With immediate media, many-token calls (training, prefill) let each image's run of tokens attend that image's
    latents alone. Loss, logits and every gradient equal the masked attention over all images (the path taken when
    `_image_runs` declines), on a left-padded batch with padding image slots, text before the first image and an
    <image> token beyond the images given."""
    from openflamingo_hf import OpenFlamingoForConditionalGeneration

    model, processor = build_tiny_model_and_processor(family, perceiver_num_latents=4)
    texts = ["Hi <image>A cat.<|endofchunk|><image>A dog.<|endofchunk|><image>Two", "<image>One bird then",
             "<image>A<|endofchunk|><image>B"]
    images = [[make_image(i) for i in range(3)], [make_image(5)], [make_image(7), make_image(8)]]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    inputs["input_ids"][1, -3] = model.config.media_token_id  # an <image> beyond the one image given: sees none
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    media_index = model.get_media_index(inputs["input_ids"])
    runs = model._image_runs(media_index, 3)
    assert runs is not None and runs.shape[:2] == (3, 3) and runs.shape[2] < inputs["input_ids"].shape[1]

    def loss_and_grads():
        model.zero_grad()
        out = model(**inputs, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), out.loss.detach(), grads

    by_image = loss_and_grads()
    monkeypatch.setattr(OpenFlamingoForConditionalGeneration, "_image_runs", staticmethod(lambda *args: None))
    masked = loss_and_grads()
    torch.testing.assert_close(by_image[0], masked[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_image[1], masked[1], atol=1e-6, rtol=1e-6)
    assert by_image[2].keys() == masked[2].keys() and any("gated_cross_attn" in n for n in masked[2])
    for name, grad in masked[2].items():
        torch.testing.assert_close(by_image[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_image_runs_decline_a_media_index_that_is_not_contiguous():
    from openflamingo_hf import OpenFlamingoForConditionalGeneration

    runs = OpenFlamingoForConditionalGeneration._image_runs
    assert runs(torch.tensor([[0, 1, 1, 2, 2, 2]]), 2).tolist() == [[[1, 2, 6], [3, 4, 5]]]
    assert runs(torch.tensor([[1, 2, 1]]), 2) is None  # image 1's tokens are not one run
    assert runs(torch.tensor([[0, 0]]), 2) is None  # no token sees an image
