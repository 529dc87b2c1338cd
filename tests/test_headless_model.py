"""The headless `OpenFlamingoModel` (transformers' base model, `AutoModel`) beside
`OpenFlamingoForConditionalGeneration`, the one checkpoint layout both load, and the transformers-5 contracts of the
image features, `inputs_embeds`, strict / non-strict loading and attention switching (issue 18).

Every comparison is against another route to the same numbers (the head applied by hand, `input_ids` instead of
embeddings, a standalone backbone's own initialisation), never against the code path under test.
"""

from __future__ import annotations

import copy
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText, CLIPVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf import OpenFlamingoForConditionalGeneration, OpenFlamingoModel, export_for_hub
from openflamingo_hf.embedded import EMBEDDED_MODEL_DIR, EMBEDDED_VIDEO_MODEL_DIR
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image

# Language models whose output head is a module of its own (MosaicGPT multiplies by its input embedding, scaled).
FAMILIES_WITH_AN_OUTPUT_HEAD = ("llama", "gpt_neox", "mpt", "opt", "gpt2")
SHIPPED_MODEL_DIRS = {"embedded": EMBEDDED_MODEL_DIR, "embedded_video": EMBEDDED_VIDEO_MODEL_DIR}


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model_and_processor("llama", seed=0, gate=0.5)


def _batch(processor, images=None, texts=None):
    """A left-padded batch whose rows hold different numbers of images (so a padding image slot), text before the
    first image and text after the last."""
    images = images or [[make_image(1), make_image(2)], [make_image(3)]]
    texts = texts or ["<image>A cat.<|endofchunk|><image>Output: two", "Hi <image>Output:"]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def _logits_of_hidden_states(model, hidden_states):
    return model.get_output_embeddings()(hidden_states)


# ----------------------------------------------------------------------------------------------------------------------
# The base model: what `base_model_prefix` names
# ----------------------------------------------------------------------------------------------------------------------


def test_base_model_is_a_headless_model_over_the_same_modules(llama):
    """(f) `base_model` (what TRL's fused LM head, activation offloading and others call) is an `OpenFlamingoModel`
    whose weights are the head model's own: the same tensors under the same names, nothing saved twice."""
    model, _ = llama
    assert model.base_model_prefix == "model"
    assert model.base_model is model.model
    assert type(model.model) is OpenFlamingoModel
    assert model.model.config is model.config
    assert {k.split(".")[0] for k in model.state_dict()} == {
        "vision_model", "perceiver", "language_model", "gated_cross_attn_layers"
    }
    assert list(model.model.state_dict()) == list(model.state_dict())
    head_parameters = dict(model.named_parameters())
    assert all(p is head_parameters[name] for name, p in model.model.named_parameters())
    assert not any(module is model.model for module in model.modules())


def test_the_base_model_follows_changes_to_the_modules_and_the_mode():
    """A module put in place of a child (PEFT's `modules_to_save` wrapper, FSDP's) is the base model's too, and
    `train()` / `eval()` switch both."""
    model, _ = build_tiny_model_and_processor("llama")
    replacement = copy.deepcopy(model.perceiver)
    model.perceiver = replacement
    assert model.model.perceiver is replacement
    model.train()
    assert model.model.training and model.model.perceiver.training
    model.eval()
    assert not model.model.training and not model.language_model.training


@pytest.mark.parametrize("family", FAMILIES_WITH_AN_OUTPUT_HEAD)
def test_the_base_model_gives_the_input_of_the_output_head(family):
    """The language model's final hidden states with the images attended: the output head applied to them gives
    the head model's logits, on a left-padded batch with a padding image slot."""
    model, processor = build_tiny_model_and_processor(family, seed=1)
    inputs = _batch(processor)
    with torch.no_grad():
        full = model(**inputs, use_cache=True)
        headless = model.model(**inputs, use_cache=True)
    assert headless.last_hidden_state.shape == (*inputs["input_ids"].shape, model.config.text_config.hidden_size)
    torch.testing.assert_close(_logits_of_hidden_states(model, headless.last_hidden_state), full.logits)
    torch.testing.assert_close(headless.image_hidden_states, full.image_hidden_states)
    assert headless.cache is not None and headless.cache.get_seq_length() == inputs["input_ids"].shape[1]
    # The images matter: other images give other hidden states.
    other = _batch(processor, images=[[make_image(5), make_image(6)], [make_image(7)]])
    with torch.no_grad():
        assert not torch.allclose(model.model(**other).last_hidden_state, headless.last_hidden_state)


def test_the_headless_model_refuses_labels(llama):
    model, processor = llama
    inputs = _batch(processor)
    with pytest.raises(ValueError, match="OpenFlamingoModel has no output head"):
        model.model(**inputs, labels=inputs["input_ids"])


# ----------------------------------------------------------------------------------------------------------------------
# AutoModel and the checkpoint layout
# ----------------------------------------------------------------------------------------------------------------------


def _no_loading_problems(info: dict) -> bool:
    return not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))


# Loads an exported folder with AutoModel in a fresh interpreter where `openflamingo_hf` cannot be imported (its
# folder is taken off sys.path, as on a machine without the package), and saves the class and the hidden states.
HIDDEN_PACKAGE_RUNNER = textwrap.dedent(
    """
    import importlib.util, os, sys
    folder, inputs_path, out_path, package_root = sys.argv[1:]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.realpath(package_root)]
    assert importlib.util.find_spec("openflamingo_hf") is None, "openflamingo_hf is still importable"
    import torch
    from transformers import AutoModel
    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        hidden = model(**torch.load(inputs_path)).last_hidden_state
    torch.save({"class": type(model).__module__ + "." + type(model).__name__, "hidden": hidden}, out_path)
    """
)


def test_automodel_loads_the_plain_and_the_exported_folder(llama, tmp_path):
    model, processor = llama
    inputs = dict(_batch(processor))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess computes with one thread: the same reduction order
    try:
        with torch.no_grad():
            expected = model.model(**inputs).last_hidden_state
        model.save_pretrained(tmp_path / "plain")
        plain, info = AutoModel.from_pretrained(tmp_path / "plain", output_loading_info=True)
        assert type(plain) is OpenFlamingoModel and _no_loading_problems(info)
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(**inputs).last_hidden_state, expected, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)

    export_for_hub(model, processor, tmp_path / "hub")
    torch.save(inputs, tmp_path / "inputs.pt")
    package_root = Path(openflamingo_hf.__file__).resolve().parent.parent
    if package_root in map(Path, site.getsitepackages()):
        pytest.skip("openflamingo_hf is installed into site-packages, which cannot be hidden from a subprocess")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    completed = subprocess.run(
        [sys.executable, "-c", HIDDEN_PACKAGE_RUNNER, str(tmp_path / "hub"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt"), str(package_root)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stderr
    result = torch.load(tmp_path / "out.pt")
    # The class of the folder's own code, what a machine without this package runs.
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith(".OpenFlamingoModel")
    torch.testing.assert_close(result["hidden"], expected, rtol=0, atol=0)


def test_a_saved_headless_model_loads_as_the_head_model_and_back(llama, tmp_path):
    model, processor = llama
    inputs = _batch(processor)
    model.model.save_pretrained(tmp_path / "headless")
    head_model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "headless", output_loading_info=True)
    assert type(head_model) is OpenFlamingoForConditionalGeneration and _no_loading_problems(info)
    with torch.no_grad():
        torch.testing.assert_close(head_model.eval()(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SHIPPED_MODEL_DIRS))
def test_shipped_checkpoints_load_unchanged_and_save_the_same_layout(name, tmp_path):
    """The embedded models (saved before the headless model existed) load into both classes without a missing,
    unexpected or mismatched weight, and saving writes exactly the weight names they were shipped with."""
    folder = SHIPPED_MODEL_DIRS[name]
    with safe_open(f"{folder}/model.safetensors", framework="pt") as file:
        shipped_keys = set(file.keys())
    for auto_class in (AutoModelForImageTextToText, AutoModel):
        loaded, info = auto_class.from_pretrained(folder, output_loading_info=True)
        assert _no_loading_problems(info), (auto_class.__name__, info)
        loaded.save_pretrained(tmp_path / auto_class.__name__)
        with safe_open(tmp_path / auto_class.__name__ / "model.safetensors", framework="pt") as file:
            assert set(file.keys()) == shipped_keys, auto_class.__name__


@pytest.mark.parametrize("family", ["mosaic_gpt", "gpt_neox", "llama"])
def test_converted_release_weights_load_into_both_classes(family, tmp_path):
    """A full original `open_flamingo` state dict (the layout of the releases: MPT-1B / MosaicGPT, RedPajama /
    GPT-NeoX) converted by `convert_original_state_dict` is exactly the state dict of either class, and the folder
    it is saved in loads into both Auto classes without a missing or unexpected weight."""
    from openflamingo_hf.convert import convert_original_state_dict, export_original_state_dict

    model, processor = build_tiny_model_and_processor(family, seed=3)
    converted = convert_original_state_dict(export_original_state_dict(model, full=True), model.config)
    OpenFlamingoModel(model.config).load_state_dict(converted, strict=True)
    head_model = OpenFlamingoForConditionalGeneration(model.config)
    head_model.load_state_dict(converted, strict=True)
    head_model.save_pretrained(tmp_path)
    inputs = _batch(processor)
    for auto_class in (AutoModelForImageTextToText, AutoModel):
        loaded, info = auto_class.from_pretrained(tmp_path, output_loading_info=True)
        assert _no_loading_problems(info), (auto_class.__name__, info)
        with torch.no_grad():
            output = loaded.eval()(**inputs)
            expected = model(**inputs) if auto_class is AutoModelForImageTextToText else model.model(**inputs)
        name = "logits" if auto_class is AutoModelForImageTextToText else "last_hidden_state"
        torch.testing.assert_close(output[name], expected[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Loading: strict by default, transformers' behaviour when asked
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auto_class", [AutoModelForImageTextToText, AutoModel], ids=lambda c: c.__name__)
def test_a_wrong_cross_attention_interval_still_raises(auto_class):
    """Strict loading stays the default for the weights a checkpoint must have (gated blocks, Perceiver): an
    interval that moves the gated blocks raises, for the headless model too."""
    with pytest.raises(ValueError, match="do not fit the model's config.*gated_cross_attn_layers"):
        auto_class.from_pretrained(EMBEDDED_MODEL_DIR, cross_attn_every_n_layers=2)


def test_output_loading_info_returns_the_report_instead_of_raising():
    """transformers' contract: with `output_loading_info=True` the caller gets the report to judge."""
    model, info = AutoModelForImageTextToText.from_pretrained(
        EMBEDDED_MODEL_DIR, cross_attn_every_n_layers=2, output_loading_info=True
    )
    assert isinstance(model, OpenFlamingoForConditionalGeneration)
    assert any(key.startswith("gated_cross_attn_layers.") for key in info["unexpected_keys"])
    with pytest.raises(ValueError, match="do not fit"):
        AutoModelForImageTextToText.from_pretrained(
            EMBEDDED_MODEL_DIR, cross_attn_every_n_layers=2, output_loading_info=True, strict=True
        )


def test_from_pretrained_takes_a_state_dict_without_a_folder(llama):
    model, processor = llama
    for cls in (OpenFlamingoForConditionalGeneration, OpenFlamingoModel):
        loaded = cls.from_pretrained(None, config=model.config, state_dict=model.state_dict())
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_strict_false_initialises_missing_vision_weights_as_the_vision_model_does(tmp_path):
    """(e) A checkpoint without its vision tower, loaded with `strict=False`: each missing weight is drawn as
    `CLIPVisionModel` draws it (CLIP scales its projections by width and depth), not with the generic std 0.02."""
    folder = tmp_path / "no_vision"
    shutil.copytree(EMBEDDED_MODEL_DIR, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("vision_model.")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(folder, strict=False)
    reference = dict(CLIPVisionModel(model.config.vision_config).named_parameters())
    checked = 0
    for name, module in model.vision_model.named_modules():
        if isinstance(module, nn.Linear):
            expected = reference[f"{name}.weight"].std().item()
            assert module.weight.std().item() == pytest.approx(expected, rel=0.1), name
            checked += 1
    assert checked > 0
    # What strict=False is for: the rest is the checkpoint's.
    assert torch.equal(model.perceiver.latents, weights["perceiver.latents"])


# ----------------------------------------------------------------------------------------------------------------------
# Image features, inputs_embeds, attention implementation
# ----------------------------------------------------------------------------------------------------------------------


def test_get_image_features_returns_the_transformers_output_when_asked():
    """(c) `return_dict=True`: transformers-5's `BaseModelOutputWithPooling`, the vision tower's outputs with the
    Perceiver latents (what the gated blocks read) as `pooler_output`; the forward outputs carry it too."""
    model, processor = build_tiny_model_and_processor("llama")
    model.set_attn_implementation("eager")  # attention weights are returned by eager attention only
    inputs = _batch(processor)
    pixel_values = inputs["pixel_values"]
    with torch.no_grad():
        latents = model.get_image_features(pixel_values)
        output = model.get_image_features(
            pixel_values, return_dict=True, output_hidden_states=True, output_attentions=True
        )
        forward = model(**inputs)
        headless = model.model(**inputs)
    assert isinstance(output, BaseModelOutputWithPooling)
    torch.testing.assert_close(output.pooler_output, latents, rtol=0, atol=0)
    batch, num_images = pixel_values.shape[:2]
    num_layers = model.config.vision_config.num_hidden_layers
    tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    assert output.last_hidden_state.shape == (batch * num_images, tokens, model.config.vision_hidden_size)
    assert len(output.hidden_states) == num_layers + 1 and len(output.attentions) == num_layers
    for out in (forward, headless):
        assert isinstance(out.image_outputs, BaseModelOutputWithPooling)
        torch.testing.assert_close(out.image_outputs.pooler_output, latents, rtol=0, atol=0)
        torch.testing.assert_close(out.image_hidden_states, latents, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_inputs_embeds_with_images_equal_input_ids_with_images(family):
    """(d) `<image>` tokens are found in the embeddings (the `<image>` row), as transformers' VLMs find their image
    placeholders: loss, logits and hidden states equal those of `input_ids`, on a left-padded batch with a padding
    image slot and text before the first image."""
    model, processor = build_tiny_model_and_processor(family, seed=2)
    inputs = _batch(processor)
    ids = inputs.pop("input_ids")
    labels = ids.masked_fill(inputs["attention_mask"] == 0, -100)
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        by_ids = model(input_ids=ids, labels=labels, **inputs)
        by_embeds = model(inputs_embeds=embeds, labels=labels, **inputs)
        headless_ids = model.model(input_ids=ids, **inputs).last_hidden_state
        headless_embeds = model.model(inputs_embeds=embeds, **inputs).last_hidden_state
    torch.testing.assert_close(by_embeds.logits, by_ids.logits)
    torch.testing.assert_close(by_embeds.loss, by_ids.loss)
    torch.testing.assert_close(headless_embeds, headless_ids)


def test_set_attn_implementation_switches_every_level_of_the_config():
    model, _ = build_tiny_model_and_processor("llama")
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
    assert model.model.config._attn_implementation == "eager"
