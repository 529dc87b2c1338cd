"""Quantized loading (`from_pretrained(..., quantization_config=...)`) of the embedded model, on CPU.

Backends of the `quant` extra: torchao int8 weight-only (the default; it saves and reloads) and optimum-quanto
int8/int4 (in `dev` too, so CI runs those). A test that needs a backend skips, naming it, where that backend is not
installed.
"""

import sys

import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig, pipeline

from openflamingo_hf import OpenFlamingoForConditionalGeneration
from openflamingo_hf.embedded import (
    EMBEDDED_MODEL_DIR,
    answer,
    caption,
    load_embedded_model,
    make_examples,
    sample_image_paths,
)
from openflamingo_hf.embedded.world import HELD_OUT_SEED_START
from openflamingo_hf.quantization import default_quantization_config, modules_to_not_convert, weight_bytes

NUM_EXAMPLES = 40  # held-out images: 40 captions and 40 short answers
MIN_AGREEMENT = 0.9


def _require(module: str, backend: str):
    """Skips the test, naming the backend, when its library is missing."""
    return pytest.importorskip(
        module, reason=f"{backend} is not installed (pip install 'openflamingo-hf[quant]'): {backend} cannot run"
    )


def _agreement(got: list[str], expected: list[str]) -> float:
    return sum(a == b for a, b in zip(got, expected, strict=True)) / len(expected)


@torch.no_grad()
def _greedy_tokens(model, inputs) -> torch.Tensor:
    """(batch, seq_len) argmax next tokens under teacher forcing."""
    return model(**inputs).logits.argmax(-1)


@pytest.fixture(scope="module")
def held_out():
    """Held-out examples, and what the fp32 model makes of them: greedy captions, greedy short answers, and the
    teacher-forced greedy tokens of prompt + true caption."""
    model, processor = load_embedded_model()
    examples = make_examples(NUM_EXAMPLES, HELD_OUT_SEED_START + 31337)
    images, questions = [e.image for e in examples], [e.question for e in examples]
    prompts = [processor.few_shot_prompt([], "") + e.caption for e in examples]
    inputs = processor(images=[[image] for image in images], text=prompts, return_tensors="pt", padding=True)
    return {
        "images": images,
        "questions": questions,
        "captions": caption(images, model, processor),
        "answers": answer(images, questions, model, processor),
        "inputs": inputs,
        "tokens": _greedy_tokens(model, inputs),
        "fp32_bytes": weight_bytes(model),
        "processor": processor,
    }


@pytest.fixture(scope="module")
def torchao_model():
    _require("torchao", "torchao")
    config = default_quantization_config(EMBEDDED_MODEL_DIR, backend="torchao", weights="int8")
    return OpenFlamingoForConditionalGeneration.from_pretrained(EMBEDDED_MODEL_DIR, quantization_config=config).eval()


def test_torchao_int8_quantizes_every_linear_but_the_tied_lm_head(torchao_model, held_out):
    from torchao.quantization import Int8Tensor

    skipped = modules_to_not_convert(EMBEDDED_MODEL_DIR)
    linears = {name: module for name, module in torchao_model.named_modules() if isinstance(module, nn.Linear)}
    quantized = {name for name, module in linears.items() if isinstance(module.weight, Int8Tensor)}
    assert quantized == set(linears) - set(skipped)
    # Vision tower, Perceiver, gated blocks and LM layers all quantized; the LM head kept, still tied.
    assert {name.split(".")[0] for name in quantized} == {
        "vision_model",
        "perceiver",
        "gated_cross_attn_layers",
        "language_model",
    }
    lm = torchao_model.language_model
    assert type(lm.lm_head.weight) is nn.Parameter and lm.lm_head.weight is lm.model.embed_tokens.weight
    assert torchao_model.is_quantized
    assert weight_bytes(torchao_model) < 0.35 * held_out["fp32_bytes"]  # measured: 2.85 MB of 10.08 MB


def test_torchao_int8_greedy_outputs_agree_with_fp32_on_held_out(torchao_model, held_out):
    processor, images = held_out["processor"], held_out["images"]
    caption_agreement = _agreement(caption(images, torchao_model, processor), held_out["captions"])
    vqa_agreement = _agreement(answer(images, held_out["questions"], torchao_model, processor), held_out["answers"])
    assert caption_agreement >= MIN_AGREEMENT and vqa_agreement >= MIN_AGREEMENT, (caption_agreement, vqa_agreement)


def test_quanto_int8_greedy_outputs_agree_with_fp32_on_held_out_also_through_the_pipeline(held_out):
    """The backend CI installs (`dev` holds optimum-quanto; torchao, the default, is in the `quant` extra only,
    because transformers then imports it in every process that loads a model, with CUDA-library warnings)."""
    _require("optimum.quanto", "optimum-quanto")
    from optimum.quanto import QLinear

    config = default_quantization_config(EMBEDDED_MODEL_DIR, backend="quanto", weights="int8")
    model = OpenFlamingoForConditionalGeneration.from_pretrained(EMBEDDED_MODEL_DIR, quantization_config=config).eval()
    assert isinstance(model.language_model.model.layers[0].mlp.up_proj, QLinear)
    processor, images = held_out["processor"], held_out["images"]
    caption_agreement = _agreement(caption(images, model, processor), held_out["captions"])
    vqa_agreement = _agreement(answer(images, held_out["questions"], model, processor), held_out["answers"])
    assert caption_agreement >= MIN_AGREEMENT and vqa_agreement >= MIN_AGREEMENT, (caption_agreement, vqa_agreement)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    image = sample_image_paths()[0]
    out = pipe(images=image, text="<image>", max_new_tokens=16)
    assert out[0]["generated_text"].removeprefix("<image>").strip() == caption([image])[0]  # the fp32 caption


def test_pipeline_generates_from_quantized_model(torchao_model, held_out):
    pipe = pipeline("image-text-to-text", model=torchao_model, processor=held_out["processor"])
    image = sample_image_paths()[0]
    out = pipe(images=image, text="<image>", max_new_tokens=16)
    assert out[0]["generated_text"].removeprefix("<image>").strip() == caption([image])[0]  # the fp32 caption


def test_torchao_quantized_model_saves_and_reloads(torchao_model, held_out, tmp_path):
    from torchao.quantization import Int8Tensor

    torchao_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size < 0.4 * held_out["fp32_bytes"]
    # Pre-quantized weights load through the strict `from_pretrained` (no missing or unexpected keys).
    reloaded = OpenFlamingoForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.language_model.model.layers[0].mlp.up_proj.weight, Int8Tensor)
    assert torch.equal(_greedy_tokens(reloaded, held_out["inputs"]), _greedy_tokens(torchao_model, held_out["inputs"]))


def test_quanto_int4_keeps_the_vision_tower_and_agrees_with_fp32(held_out):
    _require("optimum.quanto", "optimum-quanto")
    from optimum.quanto import QLinear

    config = default_quantization_config(EMBEDDED_MODEL_DIR, backend="quanto", weights="int4")
    model = OpenFlamingoForConditionalGeneration.from_pretrained(EMBEDDED_MODEL_DIR, quantization_config=config)
    qlinear_parts = {name.split(".")[0] for name, module in model.named_modules() if isinstance(module, QLinear)}
    assert qlinear_parts == {"perceiver", "gated_cross_attn_layers", "language_model"}  # below 8 bits: vision kept
    assert weight_bytes(model) < 0.4 * held_out["fp32_bytes"]  # measured: 3.42 MB of 10.08 MB
    # Teacher-forced greedy tokens of each caption (one forward pass; generation is what the torchao test checks).
    mask = held_out["inputs"]["attention_mask"].bool()
    same = (_greedy_tokens(model.eval(), held_out["inputs"]) == held_out["tokens"]) | ~mask
    assert same.all(-1).float().mean() >= MIN_AGREEMENT


def test_bitsandbytes_config_keeps_the_tied_head_and_below_8_bits_the_vision_tower():
    # bitsandbytes runs on CPU too but is no extra, so only the config is checked here.
    _require("bitsandbytes", "bitsandbytes")
    config = default_quantization_config(EMBEDDED_MODEL_DIR, backend="bitsandbytes", weights="int4")
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit
    assert {"language_model.lm_head", "vision_model"} <= set(config.llm_int8_skip_modules)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "gptq"}, "Unknown quantization backend 'gptq'"),
        # Through transformers alone this fails inside loading ("issues during automatic conversion").
        ({"backend": "torchao", "weights": "int4"}, "Use backend='quanto' for int4 weights"),
        ({"backend": "quanto", "weights": "int3"}, "it offers int8, int4, int2"),
    ],
)
def test_unsupported_requests_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        default_quantization_config(EMBEDDED_MODEL_DIR, **kwargs)


def test_modules_to_keep_must_exist():
    with pytest.raises(ValueError, match="names modules the model does not have: vision. .*vision_model, perceiver"):
        modules_to_not_convert(EMBEDDED_MODEL_DIR, keep=("vision",))


def test_missing_backend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # makes `import optimum.quanto` fail
    with pytest.raises(ImportError, match=r"pip install 'openflamingo-hf\[quant\]'"):
        default_quantization_config(EMBEDDED_MODEL_DIR, backend="quanto")


def test_weight_bytes_counts_tied_weights_once():
    model, _ = load_embedded_model()
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)] + list(model.buffers())
    tied = model.language_model.lm_head.weight
    assert (
        weight_bytes(model) == sum(t.numel() * t.element_size() for t in tensors) - tied.numel() * tied.element_size()
    )
