"""Correctness invariants that no code path may silently break, and the errors every bad input must get.

Every reference here is built independently of the model under test: language models have their own config objects,
created before the OpenFlamingo model exists, so a bug that alters the backbone's config cannot also alter the
reference it is compared with.
"""

import json
import os

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, Trainer, TrainingArguments

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf import OpenFlamingoConfig, OpenFlamingoForConditionalGeneration
from openflamingo_hf.releases import RELEASES, get_release_config
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image
from openflamingo_hf.tiny_models import (
    TEXT_FAMILIES,
    TINY_EOC_TOKEN_ID,
    TINY_MEDIA_TOKEN_ID,
    TINY_PAD_TOKEN_ID,
    tiny_openflamingo_config,
    tiny_text_config,
    tiny_vision_config,
)

IMG, EOC, PAD = TINY_MEDIA_TOKEN_ID, TINY_EOC_TOKEN_ID, TINY_PAD_TOKEN_ID
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", None)  # None: the default each backbone picks for itself
SMALL_BLOCKS = dict(perceiver_depth=1, perceiver_num_heads=2, perceiver_head_dim=16, perceiver_num_latents=4,
                    cross_attn_num_heads=2, cross_attn_head_dim=16)


def _skip_unsupported(family, attn_implementation):
    if family == "mpt" and attn_implementation == "sdpa":
        pytest.skip("transformers' MptForCausalLM has no SDPA attention")


def _language_model(family, attn_implementation, seed=0):
    """A standalone LM with its own config object (built before, and independently of, any OpenFlamingo model)."""
    torch.manual_seed(seed)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return AutoModelForCausalLM.from_config(tiny_text_config(family), **kwargs).eval()


def _set_gates(model, value=0.7):
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)
    return model


def _from_backbones(family, attn_implementation, seed=0):
    language_model = _language_model(family, attn_implementation, seed)
    vision_model = AutoModel.from_config(tiny_vision_config())
    return OpenFlamingoForConditionalGeneration.from_backbones(
        vision_model, language_model, cross_attn_every_n_layers=2, media_token_id=IMG, eoc_token_id=EOC,
        **SMALL_BLOCKS,
    ).eval()


def _from_config(family, attn_implementation, seed=0):
    """Through the config constructor: a text config object that carries its own attention implementation."""
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    config = OpenFlamingoConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(family, **kwargs),
        cross_attn_every_n_layers=2, media_token_id=IMG, eoc_token_id=EOC, **SMALL_BLOCKS,
    )
    torch.manual_seed(seed)
    return OpenFlamingoForConditionalGeneration(config).eval()


BUILDERS = {"from_backbones": _from_backbones, "config": _from_config}


# ----------------------------------------------------------------------------------------------------------------------
# 1. Causality and the independent bare-LM reference
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("builder", sorted(BUILDERS))
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_changing_a_later_token_never_changes_earlier_logits(family, builder, attn_implementation):
    _skip_unsupported(family, attn_implementation)
    model = _set_gates(BUILDERS[builder](family, attn_implementation))  # images matter too
    ids = torch.tensor([[5, IMG, 6, 7, 8, 9, EOC, IMG, 10, 11, 12]])
    pixel_values = torch.randn(1, 2, 1, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values).logits
        for position in (3, ids.shape[1] - 1):
            changed = ids.clone()
            changed[0, position] = 40
            changed_logits = model(input_ids=changed, pixel_values=pixel_values).logits
            torch.testing.assert_close(changed_logits[:, :position], logits[:, :position], atol=1e-5, rtol=0)
            assert not torch.allclose(changed_logits[:, position:], logits[:, position:])


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_from_backbones_with_zero_gates_equals_an_independently_built_lm(family, attn_implementation):
    _skip_unsupported(family, attn_implementation)
    reference = _language_model(family, attn_implementation, seed=3)  # same seed: same weights, separate objects
    model = _from_backbones(family, attn_implementation, seed=3)
    ids = torch.tensor([[5, 6, IMG, 7, 8, EOC, IMG, 9, 10, 11], [12, IMG, 13, 14, 15, 16, 17, 18, 19, 20]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = model(input_ids=ids, pixel_values=torch.randn(2, 2, 1, 3, 30, 30)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["llama", "mpt", "gpt2"])
def test_from_backbones_leaves_the_callers_configs_as_they_were(family, attn_implementation):
    _skip_unsupported(family, attn_implementation)
    language_model = _language_model(family, attn_implementation)
    vision_model = AutoModel.from_config(tiny_vision_config())
    before = [(m.config._attn_implementation, m.config.to_json_string()) for m in (language_model, vision_model)]
    OpenFlamingoForConditionalGeneration.from_backbones(
        vision_model, language_model, media_token_id=IMG, eoc_token_id=EOC, **SMALL_BLOCKS
    )
    after = [(m.config._attn_implementation, m.config.to_json_string()) for m in (language_model, vision_model)]
    assert after == before


def test_config_constructor_copies_sub_configs_and_keeps_their_attention():
    text_config = tiny_text_config("llama", attn_implementation="eager")
    config = OpenFlamingoConfig(vision_config=tiny_vision_config(), text_config=text_config)
    assert text_config._attn_implementation == "eager"  # the caller's object is untouched
    assert config.text_config is not text_config and config.text_config._attn_implementation == "eager"
    # An explicit request still applies to every sub-config, as in transformers.
    config = OpenFlamingoConfig(text_config=tiny_text_config("llama"), attn_implementation="sdpa")
    assert config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mpt"])
def test_model_from_backbones_is_the_same_after_save_and_load(family, tmp_path):
    model = _set_gates(_from_backbones(family, None))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, IMG, 6, 7, 8, EOC, IMG, 9, 10]])
    pixel_values = torch.randn(1, 2, 1, 3, 30, 30)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, pixel_values=pixel_values).logits,
            model(input_ids=ids, pixel_values=pixel_values).logits, atol=1e-5, rtol=0,
        )


# ----------------------------------------------------------------------------------------------------------------------
# 2. Generation config: stops at <|endofchunk|> on every path
# ----------------------------------------------------------------------------------------------------------------------


def test_generation_config_stops_at_eoc_and_pads_on_every_path(tmp_path):
    from openflamingo_hf import OpenFlamingoProcessor
    from openflamingo_hf.testing_utils import build_tiny_tokenizer

    processor = OpenFlamingoProcessor(tokenizer=build_tiny_tokenizer())
    language_model = AutoModelForCausalLM.from_config(tiny_text_config("llama", vocab_size=320, eos_token_id=0))
    model = OpenFlamingoForConditionalGeneration.from_backbones(
        AutoModel.from_config(tiny_vision_config()), language_model, processor=processor, **SMALL_BLOCKS
    )
    pad = processor.tokenizer.pad_token_id
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (processor.eoc_token_id, pad)

    # Built from a config alone.
    fresh = OpenFlamingoForConditionalGeneration(tiny_openflamingo_config("llama"))
    assert fresh.generation_config.eos_token_id == EOC and fresh.generation_config.pad_token_id == PAD

    # Saved, and loaded from a folder with and without generation_config.json.
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == processor.eoc_token_id
    os.remove(tmp_path / "generation_config.json")
    loaded = OpenFlamingoForConditionalGeneration.from_pretrained(tmp_path)
    assert (loaded.generation_config.eos_token_id, loaded.generation_config.pad_token_id) == (
        processor.eoc_token_id, pad
    )

    # A user's own setting survives save and load.
    model.generation_config.eos_token_id = [processor.eoc_token_id, 0]
    model.save_pretrained(tmp_path / "custom")
    loaded = OpenFlamingoForConditionalGeneration.from_pretrained(tmp_path / "custom")
    assert loaded.generation_config.eos_token_id == [processor.eoc_token_id, 0]


def test_generate_stops_at_eoc_without_being_told():
    model, processor = build_tiny_model_and_processor("llama", gate=0.5)
    # Make <|endofchunk|> the most likely next token everywhere.
    with torch.no_grad():
        model.get_output_embeddings().weight[processor.eoc_token_id] += 100
    inputs = processor(images=[make_image(0)], text=["<image>Output:"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 1 and out[0, -1] == processor.eoc_token_id


# ----------------------------------------------------------------------------------------------------------------------
# 3. Trainer evaluation and prediction
# ----------------------------------------------------------------------------------------------------------------------


def test_trainer_evaluate_and_predict_with_compute_metrics(tmp_path):
    model, processor = build_tiny_model_and_processor("llama")
    rows = []
    for seed, caption in enumerate(["a cat", "a dog on a mat", "two birds", "a red car"]):
        batch = processor(images=[make_image(seed)], text=[f"<image>Output: {caption}<|endofchunk|>"],
                          return_tensors="pt", padding="max_length", max_length=16, padding_side="right")
        row = {key: value[0] for key, value in batch.items()}
        row["labels"] = row["input_ids"].masked_fill(row["attention_mask"] == 0, -100)
        rows.append(row)
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        logits = torch.as_tensor(prediction.predictions)[:, :-1]
        labels = torch.as_tensor(prediction.label_ids)[:, 1:]
        known = labels != -100
        return {"token_accuracy": float((logits.argmax(-1) == labels)[known].float().mean())}

    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=3, report_to=[], use_cpu=True)
    trainer = Trainer(model, args, eval_dataset=rows, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert "eval_token_accuracy" in metrics and metrics["eval_loss"] > 0
    prediction = trainer.predict(rows)
    assert seen[-1] == (4, 16, model.config.text_config.vocab_size)  # the logits, nothing else
    # The Trainer's loss is the model's own loss on the same rows.
    with torch.no_grad():
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        expected = model(**batch).loss
    assert prediction.metrics["test_loss"] == pytest.approx(float(expected), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Bad model inputs: a ValueError that names the argument
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model_and_processor("llama")


def _with_last_token(input_ids, token_id):
    input_ids = input_ids.clone()
    input_ids[-1, -1] = token_id
    return input_ids


def _inputs(processor):
    return processor(images=[[make_image(0)], [make_image(1)]], text=["<image>Output: a", "<image>Output: a cat"],
                     return_tensors="pt")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x: x.update(attention_mask=x["attention_mask"][:, 1:]), r"attention_mask must have shape"),
        (lambda x: x.update(attention_mask=torch.cat([x["attention_mask"]] * 2, dim=1)), r"attention_mask must"),
        (lambda x: x.update(attention_mask=x["attention_mask"][:1]), r"attention_mask must have shape"),
        (lambda x: x.update(labels=x["input_ids"][:, :-1]), r"labels must have the shape of input_ids"),
        (lambda x: x.update(input_ids=_with_last_token(x["input_ids"], 10_000)), r"input_ids hold token id 10000"),
        (lambda x: x.update(input_ids=_with_last_token(x["input_ids"], -3)), r"input_ids hold token id -3"),
        (lambda x: x.update(input_ids=x["input_ids"][:, :0], attention_mask=x["attention_mask"][:, :0]), r"empty"),
        (lambda x: x.update(input_ids=x["input_ids"][:0], attention_mask=x["attention_mask"][:0],
                            pixel_values=x["pixel_values"][:0]), r"empty"),
        (lambda x: x.update(input_ids=x["input_ids"].tolist()), r"input_ids must be a torch.Tensor.*return_tensors"),
        (lambda x: x.update(pixel_values=x["pixel_values"].numpy()), r"pixel_values must be a torch.Tensor"),
        (lambda x: x.update(pixel_values=x["pixel_values"].index_fill(3, torch.tensor([0]), float("nan"))), r"NaN"),
        (lambda x: x.update(pixel_values=x["pixel_values"] * float("inf")), r"infinite"),
    ],
    ids=["mask-short", "mask-long", "mask-batch", "labels-shape", "id-too-large", "id-negative", "empty-seq",
         "empty-batch", "list-ids", "numpy-pixels", "nan-pixels", "inf-pixels"],
)
def test_bad_model_inputs_raise_a_value_error_naming_the_argument(tiny, change, match):
    model, processor = tiny
    inputs = dict(_inputs(processor))
    change(inputs)
    with pytest.raises(ValueError, match=match):
        model(**inputs)
    if "labels" not in inputs:  # generate validates the same inputs
        with pytest.raises(ValueError, match=match):
            model.generate(**inputs, max_new_tokens=2)


def test_processor_output_without_return_tensors_is_explained(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(0)], text=["<image>Output:"])  # lists, not tensors
    with pytest.raises(ValueError, match=r"must be a torch.Tensor.*return_tensors='pt'"):
        model(**inputs)


def test_image_features_of_the_wrong_rank_or_width(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    features = model.get_image_features(inputs["pixel_values"])
    for bad in (features[:, 0], features[..., :-1], features[None]):
        with pytest.raises(ValueError, match=r"image_features must have shape \(batch=2, num_images, num_latents"):
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], image_features=bad)


def test_images_without_media_token_id_are_an_error():
    model, processor = build_tiny_model_and_processor("llama")
    model.config.media_token_id = None
    inputs = _inputs(processor)
    for call in (model, lambda **kw: model.generate(**kw, max_new_tokens=2)):
        with pytest.raises(ValueError, match="media_token_id is not set"):
            call(**inputs)


def test_attention_mask_must_cover_cached_tokens(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        next_ids = out.logits[:, -1:].argmax(-1)
        media_index = model.get_media_index(torch.cat([inputs["input_ids"], next_ids], 1))[:, -1:]
        full_mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], 1)
        model(input_ids=next_ids, attention_mask=full_mask, cache=out.cache, media_cache=out.media_cache,
              media_index=media_index)  # right: cached + new
        with pytest.raises(ValueError, match=r"cached \+ new tokens.*\(\d+ cached \+ 1 new tokens\)"):
            model(input_ids=next_ids, attention_mask=torch.ones_like(next_ids), cache=out.cache,
                  media_cache=out.media_cache, media_index=media_index)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Position limit
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_top_level_config_exposes_the_lm_position_limit(family):
    assert tiny_openflamingo_config(family).max_position_embeddings == 256


@pytest.mark.parametrize("family", ["gpt2", "opt", "mpt"])
def test_too_long_prompt_is_an_error_where_the_lm_would_index_out_of_range(family):
    model = OpenFlamingoForConditionalGeneration(tiny_openflamingo_config(family)).eval()
    ids = torch.randint(0, 60, (1, 257))
    with pytest.raises(ValueError, match=r"257 tokens long .* at most 256 positions"):
        model(input_ids=ids)
    model(input_ids=ids[:, :256])  # at the limit: fine


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mosaic_gpt"])
def test_too_long_prompt_warns_where_the_lm_extrapolates(family, caplog):
    model = OpenFlamingoForConditionalGeneration(tiny_openflamingo_config(family)).eval()
    ids = torch.randint(0, 60, (1, 260))
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"), torch.no_grad():
            model(input_ids=ids)
    finally:
        hf_logging.disable_propagation()
    assert "at most 256 positions" in caplog.text


def test_generate_caps_the_default_length_at_the_position_limit():
    model = OpenFlamingoForConditionalGeneration(tiny_openflamingo_config("gpt2")).eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, 60, (1, 250))
    out = model.generate(input_ids=ids, do_sample=False)  # default: 20 new tokens, capped at 256 in all
    assert out.shape[1] == 256


# ----------------------------------------------------------------------------------------------------------------------
# 6. Loading: weights that do not fit, unreadable files
# ----------------------------------------------------------------------------------------------------------------------


def test_loading_with_another_cross_attention_interval_raises(tmp_path):
    model, _ = build_tiny_model_and_processor("llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"do not fit the model's config.*gated_cross_attn_layers\.0\..*strict=False"):
        AutoModelForImageTextToText.from_pretrained(tmp_path, cross_attn_every_n_layers=1)
    # The escape hatch: new blocks initialised anew, the trained ones kept.
    loaded = OpenFlamingoForConditionalGeneration.from_pretrained(tmp_path, cross_attn_every_n_layers=1, strict=False)
    torch.testing.assert_close(loaded.gated_cross_attn_layers["1"].attn.to_q.weight,
                               model.gated_cross_attn_layers["1"].attn.to_q.weight)


def test_truncated_safetensors_file_is_named(tmp_path):
    model, _ = build_tiny_model_and_processor("llama")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=rf"Cannot read {shards[-1]} .*truncated"):
        AutoModelForImageTextToText.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_generate_decodes_from_the_cache_even_when_the_lm_config_says_not_to(family):
    """MptConfig defaults to use_cache=False (the 9B release's LM): generate must still decode from the cache, with
    the tokens of a full recomputation at every step."""
    model, processor = build_tiny_model_and_processor(family)
    assert family != "mpt" or model.config.text_config.use_cache is False  # the LM's own default
    model = _set_gates(model.eval())
    assert model.generation_config.use_cache is True
    inputs = processor(images=[[make_image(0)]], text=["<image>Output: a"], return_tensors="pt")
    lengths = []
    hook = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
    hook.remove()
    assert lengths[1:] == [1] * (len(lengths) - 1)  # after the prefill, one new token per step
    full = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_every_release_generates_from_the_cache(name):
    """The release configs (the 9B one's LM config says use_cache=False) give generation settings that decode from
    the cache; built on the meta device, so no weights are made."""
    with torch.device("meta"):
        model = OpenFlamingoForConditionalGeneration(get_release_config(name))
    assert model.generation_config.use_cache is True
    assert model.generation_config.eos_token_id == model.config.eoc_token_id
