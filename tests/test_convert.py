"""Conversion of original OpenFlamingo state dicts, the `openflamingo-convert` CLI and the release configs (tiny, offline)."""

import copy
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionModel,
    MptForCausalLM,
    PreTrainedTokenizerFast,
    pipeline,
)

from transformers.utils import logging as transformers_logging

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf.pipeline_openflamingo import OpenFlamingoPipeline
from openflamingo_hf import OpenFlamingoConfig, OpenFlamingoForConditionalGeneration
from openflamingo_hf.convert import (
    ConversionError,
    base_state_dict_from_backbones,
    convert_original_state_dict,
    export_original_state_dict,
    infer_cross_attn_every_n_layers,
)
from openflamingo_hf.cli.convert import main
from openflamingo_hf.modeling.configuration_mosaic_gpt import MosaicGPTConfig
from openflamingo_hf.processing.processing_openflamingo import OpenFlamingoProcessor, default_image_processor
from openflamingo_hf.releases import RELEASES, get_release_config
from openflamingo_hf.testing_utils import build_tiny_tokenizer, make_image
from openflamingo_hf.tiny_models import (
    TINY_EOC_TOKEN_ID,
    TINY_MEDIA_TOKEN_ID,
    TINY_PAD_TOKEN_ID,
    TINY_VOCAB_SIZE,
    tiny_openflamingo_config,
    tiny_text_config,
    tiny_vision_config,
)

# "mpt7b": the 9B release's LM, MPT-7B, as this package builds it (MosaicGPT without q/k LayerNorm, whose original
# checkpoints use MPT's names); "mpt": transformers' MptForCausalLM, a backbone users may still choose.
FAMILIES = ("mosaic_gpt", "mpt7b", "mpt", "gpt_neox", "llama")
IMG, EOC = TINY_MEDIA_TOKEN_ID, TINY_EOC_TOKEN_ID
# The original checkpoint layout of each family: decoder-layer list and the LM keys a trainable-only file holds.
LAYERS = {"mosaic_gpt": "transformer.blocks", "mpt7b": "transformer.blocks", "mpt": "transformer.blocks",
          "gpt_neox": "gpt_neox.layers", "llama": "model.layers"}
EMBEDDINGS = {
    "mosaic_gpt": ["lang_encoder.transformer.wte.weight"],
    "mpt7b": ["lang_encoder.transformer.wte.weight"],
    "mpt": ["lang_encoder.transformer.wte.weight"],
    "gpt_neox": ["lang_encoder.gpt_neox.embed_in.weight", "lang_encoder.embed_out.weight"],
    "llama": ["lang_encoder.model.embed_tokens.weight"],
}


def text_config(family, vocab_size=TINY_VOCAB_SIZE):
    if family == "mosaic_gpt":
        return MosaicGPTConfig(d_model=64, n_heads=4, n_layers=4, mlp_ratio=2, max_seq_len=256, vocab_size=vocab_size,
                               pad_token_id=TINY_PAD_TOKEN_ID, eos_token_id=0, bos_token_id=0)
    if family == "mpt7b":  # as the 9B release config builds MPT-7B (expansion_ratio 4, as MPT-7B and MptForCausalLM)
        return MosaicGPTConfig.from_mpt_config(tiny_text_config("mpt", vocab_size=vocab_size, expansion_ratio=4))
    return tiny_text_config(family, vocab_size=vocab_size)


def build(family, seed=0, interval=2, config=None):
    """A tiny model with every weight random, gates included (zero gates would hide the gated blocks)."""
    torch.manual_seed(seed)
    config = config or tiny_openflamingo_config(cross_attn_every_n_layers=interval, text_config=text_config(family))
    model = OpenFlamingoForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "norm" in name or "layer_norm" in name or "ln_" in name or "layrnorm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "gate" in name or "bias" in name else 1.0))
    return model


def base_language_model(model, family):
    """
    The standalone LM as published, before the original resized its embeddings: same decoder weights, but its own
    (here: larger, random) embedding matrices, like MPT's 50432 rows versus the checkpoint's 50280. For Llama the
    original saved only the input embedding, so the output head must come from the base and keep the model's size.
    """
    grow = 0 if family == "llama" else 8
    lm = AutoModelForCausalLM.from_config(text_config(family, TINY_VOCAB_SIZE + grow)).eval()
    source = model.language_model.state_dict()
    state = lm.state_dict()
    embedding = lm.get_input_embeddings().weight
    for key, value in state.items():
        if value.shape == source[key].shape and not (family == "llama" and key == "model.embed_tokens.weight"):
            state[key] = source[key].clone()
    lm.load_state_dict(state)
    assert not torch.equal(embedding[:TINY_VOCAB_SIZE], model.language_model.get_input_embeddings().weight)
    return lm


def inputs(batch=2, seed=0):
    ids = torch.tensor([[5, 6, IMG, 7, 8, EOC, IMG, 9, 10, 11], [12, IMG, 13, 14, 15, 16, 17, 18, 19, 20]])[:batch]
    pixel_values = torch.randn(batch, 2, 1, 3, 30, 30, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, pixel_values=pixel_values)


def assert_same_model(converted_state_dict, model):
    reference = model.state_dict()
    assert list(converted_state_dict) == list(reference)
    for key, tensor in reference.items():
        assert torch.equal(converted_state_dict[key], tensor), key
    fresh = OpenFlamingoForConditionalGeneration(model.config).eval()
    fresh.load_state_dict(converted_state_dict, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs()).logits, model(**inputs()).logits)


# ----------------------------------------------------------------------------------------------------------------------
# 1. Round trips through the original layout
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_only_round_trip(family):
    model = build(family)
    original = export_original_state_dict(model, full=False)
    # The layout of a released checkpoint.pt: Perceiver, wrapped gated blocks, embeddings; nothing else.
    layers = LAYERS[family]
    lm_keys = sorted(k for k in original if k.startswith("lang_encoder.") and ".gated_cross_attn_layer." not in k)
    assert lm_keys == sorted(EMBEDDINGS[family])
    assert "perceiver.layers.1.1.3.weight" in original and "perceiver.layers.0.0.to_kv.weight" in original
    assert f"lang_encoder.{layers}.1.gated_cross_attn_layer.ff.0.weight" in original
    assert f"lang_encoder.{layers}.3.gated_cross_attn_layer.attn_gate" in original
    assert not any(k.startswith("vision_encoder.") for k in original)

    lm = base_language_model(model, family)
    base = base_state_dict_from_backbones(lm, model.vision_model)
    converted, report = convert_original_state_dict(original, model.config, base_state_dict=base, return_report=True)
    assert_same_model(converted, model)
    # The checkpoint's (resized) embeddings win over the base's, and the report says so.
    embedding_key = "language_model." + {"mosaic_gpt": "transformer.wte.weight", "mpt7b": "transformer.wte.weight",
                                         "mpt": "transformer.wte.weight", "gpt_neox": "gpt_neox.embed_in.weight",
                                         "llama": "model.embed_tokens.weight"}[family]
    assert report.sources[embedding_key] == ["lang_encoder." + embedding_key[len("language_model."):]]
    assert "overridden by the checkpoint" in report.ignored["base:" + embedding_key]
    assert report.sources["vision_model.post_layernorm.weight"] == ["base:vision_model.post_layernorm.weight"]
    assert set(report.sources) == set(converted)
    if family == "gpt_neox":  # renamed since the original: embed_out -> lm_head
        assert report.sources["language_model.lm_head.weight"] == ["lang_encoder.embed_out.weight"]
    if family == "mpt":  # tied output: filled from the input embedding, base copy ignored
        assert report.sources["language_model.lm_head.weight"] == ["tied:language_model.transformer.wte.weight"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_round_trip(family):
    model = build(family)
    original = export_original_state_dict(model, full=True)
    layers = LAYERS[family]
    # Wrapped decoder layers and both duplicate lists, as in the original model's state_dict().
    assert any(k.startswith(f"lang_encoder.{layers}.0.decoder_layer.") for k in original)
    assert any(k.startswith("lang_encoder.old_decoder_blocks.0.") for k in original)
    assert "lang_encoder.gated_cross_attn_layers.1.ff.3.weight" in original
    assert "lang_encoder.gated_cross_attn_layers.0.ff.3.weight" not in original  # no block before layer 0 (N = 2)
    assert "vision_encoder.transformer.resblocks.1.attn.in_proj_weight" in original
    # A tied head is not written (the original MPTs have no lm_head); an untied one is a real weight.
    assert any(k.startswith("lang_encoder.lm_head.") for k in original) == (family == "llama")

    converted, report = convert_original_state_dict(original, model.config, return_report=True)
    assert_same_model(converted, model)
    duplicate = next(k for k in original if k.startswith("lang_encoder.old_decoder_blocks."))
    assert report.ignored[duplicate].startswith("duplicate of")


def test_training_checkpoint_wrappers_and_stale_buffers():
    """`model_state_dict`, DDP `module.`, `._checkpoint_wrapped_module` and buffers of old transformers versions."""
    model = build("gpt_neox")
    original = export_original_state_dict(model, full=True)
    wrapped = {}
    for key, value in original.items():
        key = key.replace(".decoder_layer.", ".decoder_layer._checkpoint_wrapped_module.")
        wrapped["module." + key] = value
    stale = {
        "module.lang_encoder.gpt_neox.layers.0.decoder_layer.attention.bias": torch.ones(1, 1, 8, 8, dtype=torch.bool),
        "module.lang_encoder.gpt_neox.layers.0.decoder_layer.attention.masked_bias": torch.tensor(-1e9),
        "module.lang_encoder.gpt_neox.layers.0.decoder_layer.attention.rotary_emb.inv_freq": torch.ones(8),
        "module.vision_encoder.proj": torch.randn(32, 16),
    }
    checkpoint = {"model_state_dict": {**wrapped, **stale}, "epoch": 3, "optimizer_state_dict": {"state": {}}}
    converted, report = convert_original_state_dict(checkpoint, model.config, return_report=True)
    assert_same_model(converted, model)
    for key in stale:
        assert key in report.ignored
    assert "joint image-text space" in report.ignored["module.vision_encoder.proj"]
    assert report.ignored["epoch"].startswith("training state")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd: sd.__setitem__("perceiver.layers.0.0.to_v.weight", torch.zeros(32, 32)),
         "perceiver.layers.0.0.to_v.weight"),
        (lambda sd: sd.__setitem__("lang_encoder.model.layers.1.gated_cross_attn_layer.ff.2.weight", torch.zeros(1)),
         "lang_encoder.model.layers.1.gated_cross_attn_layer.ff.2.weight"),
        (lambda sd: sd.__setitem__("something_else.weight", torch.zeros(1)), "something_else.weight"),
        (lambda sd: sd.pop("perceiver.layers.1.1.3.weight"), "perceiver.layers.1.ff.fc2.weight"),
        # (Both copies: the duplicate alone would be used, see test_duplicate_alone_is_used.)
        (lambda sd: (sd.pop("lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate"),
                     sd.pop("lang_encoder.gated_cross_attn_layers.3.attn_gate")),
         "gated_cross_attn_layers.3.attn_gate"),
        (lambda sd: sd.pop("vision_encoder.transformer.resblocks.0.attn.in_proj_bias"),
         "vision_model.encoder.layers.0.self_attn.q_proj.bias"),
        (lambda sd: sd.pop("lang_encoder.model.norm.weight"), "language_model.model.norm.weight"),
    ],
    ids=["extra-perceiver", "extra-gated", "extra-unknown", "missing-perceiver", "missing-gate", "missing-qkv-bias",
         "missing-lm"],
)
def test_extra_or_missing_key_fails_naming_it(mutate, message):
    model = build("llama")
    original = export_original_state_dict(model, full=True)
    mutate(original)
    with pytest.raises(ConversionError, match=message.replace(".", r"\.")):
        convert_original_state_dict(original, model.config)


def test_duplicate_alone_is_used():
    """A state dict holding only the `gated_cross_attn_layers` / `old_decoder_blocks` copy is still complete."""
    model = build("llama")
    original = export_original_state_dict(model, full=True)
    original.pop("lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate")
    original.pop("lang_encoder.model.layers.2.decoder_layer.mlp.up_proj.weight")
    converted, report = convert_original_state_dict(original, model.config, return_report=True)
    assert_same_model(converted, model)
    assert report.sources["gated_cross_attn_layers.3.attn_gate"] == ["lang_encoder.gated_cross_attn_layers.3.attn_gate"]
    assert report.sources["language_model.model.layers.2.mlp.up_proj.weight"] == [
        "lang_encoder.old_decoder_blocks.2.mlp.up_proj.weight"]


def test_error_messages_say_what_to_do():
    model = build("mpt")
    trainable = export_original_state_dict(model, full=False)
    with pytest.raises(ConversionError, match="base_state_dict=base_state_dict_from_backbones"):
        convert_original_state_dict(trainable, model.config)

    full = export_original_state_dict(model, full=True)
    bigger = copy.deepcopy(model.config)
    bigger.text_config.vocab_size = TINY_VOCAB_SIZE + 4
    with pytest.raises(ConversionError, match=r"lang_encoder\.transformer\.wte\.weight.*vocab_size"):
        convert_original_state_dict(full, bigger)

    inconsistent = dict(full)
    key = next(k for k in full if k.startswith("lang_encoder.old_decoder_blocks."))
    inconsistent[key] = full[key] + 1
    with pytest.raises(ConversionError, match="holds different values"):
        convert_original_state_dict(inconsistent, model.config)

    every_layer = copy.deepcopy(model.config)
    every_layer.cross_attn_every_n_layers = 4
    with pytest.raises(ConversionError, match="cross_attn_every_n_layers"):
        convert_original_state_dict(full, every_layer)
    assert infer_cross_attn_every_n_layers(full) == 2

    # A MosaicGPT (MPT-1B) checkpoint cannot go into transformers' MPT: the error points to the right text config.
    mosaic = export_original_state_dict(build("mosaic_gpt"), full=True)
    with pytest.raises(ConversionError, match="mosaic_gpt"):
        convert_original_state_dict(mosaic, model.config)


# ----------------------------------------------------------------------------------------------------------------------
# 1b. The 9B release: MPT-7B's parameter names onto MosaicGPT
# ----------------------------------------------------------------------------------------------------------------------

# Our MosaicGPT names -> MPT-7B's (the original 9B checkpoint, transformers' MptForCausalLM).
MPT_NAMES = {".ln_1.": ".norm_1.", ".ln_2.": ".norm_2.", ".mlp.mlp_up.": ".ffn.up_proj.",
             ".mlp.mlp_down.": ".ffn.down_proj.", "transformer.ln_f.": "transformer.norm_f."}


def to_mpt_names(key):
    for ours, theirs in MPT_NAMES.items():
        key = key.replace(ours, theirs)
    return key


def test_9b_layout_uses_mpt_names_both_ways():
    model = build("mpt7b")
    full = export_original_state_dict(model, full=True)
    lm_keys = [k for k in full if k.startswith("lang_encoder.") and "gated_cross_attn_layer" not in k]
    for key in ("lang_encoder.transformer.blocks.0.decoder_layer.norm_1.weight",
                "lang_encoder.transformer.blocks.3.decoder_layer.ffn.down_proj.weight",
                "lang_encoder.old_decoder_blocks.2.ffn.up_proj.weight", "lang_encoder.transformer.norm_f.weight",
                "lang_encoder.transformer.blocks.1.decoder_layer.attn.Wqkv.weight"):
        assert key in full, key
    assert not any(re.search(r"\.(ln_1|ln_2|ln_f|mlp_up|mlp_down|q_ln|k_ln)\.", k) for k in lm_keys)
    assert not any("lm_head" in k for k in full)  # MPT-7B has none: the output projection is the embedding

    converted, report = convert_original_state_dict(full, model.config, return_report=True)
    assert_same_model(converted, model)
    assert report.sources["language_model.transformer.blocks.1.ln_2.weight"] == [
        "lang_encoder.transformer.blocks.1.decoder_layer.norm_2.weight"]
    assert report.sources["language_model.transformer.ln_f.weight"] == ["lang_encoder.transformer.norm_f.weight"]
    # Never invented, never dropped: a missing MPT weight is named under our name, an extra one under its own.
    incomplete = {k: v for k, v in full.items()
                  if ".2.decoder_layer.norm_1." not in k and ".old_decoder_blocks.2.norm_1." not in k}
    with pytest.raises(ConversionError, match=r"language_model\.transformer\.blocks\.2\.ln_1\.weight"):
        convert_original_state_dict(incomplete, model.config)
    with pytest.raises(ConversionError, match=r"decoder_layer\.attn\.q_ln\.weight"):
        convert_original_state_dict({**full, "lang_encoder.transformer.blocks.0.decoder_layer.attn.q_ln.weight":
                                     torch.ones(64)}, model.config)


def test_9b_released_checkpoint_with_mpt_7b_as_base(tmp_path):
    """The released checkpoint.pt (trainable-only) completed by MPT-7B as published: transformers' MptForCausalLM
    (MPT names, a tied lm_head, 8 more embedding rows), given as a module or loaded the way the CLI loads it."""
    from openflamingo_hf.convert.release_conversion import load_language_model

    model = build("mpt7b")
    checkpoint = export_original_state_dict(model, full=False)
    mpt_config = tiny_text_config("mpt", vocab_size=TINY_VOCAB_SIZE + 8, expansion_ratio=4)
    mpt = MptForCausalLM(mpt_config).eval()
    ours = model.language_model.state_dict()
    state = mpt.state_dict()
    for key in state:
        if key != "lm_head.weight" and "wte" not in key:
            state[key] = ours[next(k for k in ours if to_mpt_names(k) == key)].clone()
    mpt.load_state_dict(state)

    base = base_state_dict_from_backbones(mpt, model.vision_model)
    converted, report = convert_original_state_dict(checkpoint, model.config, base_state_dict=base, return_report=True)
    assert_same_model(converted, model)
    assert report.sources["language_model.transformer.blocks.0.mlp.mlp_up.weight"] == [
        "base:language_model.transformer.blocks.0.ffn.up_proj.weight"]
    assert report.ignored["base:language_model.lm_head.weight"].startswith("tied copy of")

    mpt.save_pretrained(tmp_path / "mpt-7b")
    lm = load_language_model(str(tmp_path / "mpt-7b"), model.config.text_config)
    assert type(lm).__name__ == "MosaicGPTForCausalLM" and lm.config.checkpoint_layout == "mpt"
    converted = convert_original_state_dict(checkpoint, model.config,
                                            base_state_dict=base_state_dict_from_backbones(lm, model.vision_model))
    assert_same_model(converted, model)

    # A base whose "tied" head differs from its embedding is not a tied MPT: refused by name.
    untied = dict(base, **{"language_model.lm_head.weight": base["language_model.lm_head.weight"] + 1})
    with pytest.raises(ConversionError, match=r"base:language_model\.lm_head\.weight"):
        convert_original_state_dict(checkpoint, model.config, base_state_dict=untied)


def test_9b_converted_onto_mosaic_gpt_equals_transformers_mpt():
    """An OpenFlamingo on transformers' MptForCausalLM (how the 9B release ran) and the same original weights
    converted onto the release config's MosaicGPT give the same logits."""
    mpt_text = tiny_text_config("mpt", expansion_ratio=4)
    reference = build("mpt", config=tiny_openflamingo_config(cross_attn_every_n_layers=2, text_config=mpt_text))
    with torch.no_grad():  # O(1) weights in the LM, so that attention (ALiBi) is far from uniform
        for name, p in reference.language_model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * (1.5 if "Wqkv" in name else 1.0))
    ours_config = tiny_openflamingo_config(cross_attn_every_n_layers=2,
                                           text_config=MosaicGPTConfig.from_mpt_config(mpt_text))
    converted = convert_original_state_dict(export_original_state_dict(reference, full=True), ours_config)
    ours = OpenFlamingoForConditionalGeneration(ours_config).eval()
    ours.load_state_dict(converted, strict=True)
    assert type(ours.language_model).__name__ == "MosaicGPTForCausalLM"
    with torch.no_grad():
        expected = reference(**inputs()).logits
        logits = ours(**inputs()).logits
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 2. open_clip vision keys
# ----------------------------------------------------------------------------------------------------------------------


def open_clip_state_dict(width=32, layers=2, patch=10, image=30, mlp=64, embed_dim=16, seed=0):
    """Random weights of an open_clip `VisionTransformer`, under the original `vision_encoder.` prefix."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.2: torch.randn(*shape, generator=g) * scale  # noqa: E731
    sd = {
        "conv1.weight": r(width, 3, patch, patch),
        "class_embedding": r(width, scale=1.0),
        "positional_embedding": r((image // patch) ** 2 + 1, width, scale=1.0),
        "ln_pre.weight": 1 + r(width), "ln_pre.bias": r(width),
        "ln_post.weight": 1 + r(width), "ln_post.bias": r(width),
        "proj": r(width, embed_dim),
    }
    for j in range(layers):
        p = f"transformer.resblocks.{j}."
        sd.update({
            p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
            p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
            p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
            p + "mlp.c_fc.weight": r(mlp, width), p + "mlp.c_fc.bias": r(mlp),
            p + "mlp.c_proj.weight": r(width, mlp), p + "mlp.c_proj.bias": r(width),
        })
    return {"vision_encoder." + k: v for k, v in sd.items()}


def reference_open_clip_tokens(sd, pixel_values, heads=4, layers=2, patch=10):
    """open_clip's ViT forward (2.16-2.20, OpenAI weights: QuickGELU), returning the patch tokens before ln_post."""
    w = lambda name: sd["vision_encoder." + name]  # noqa: E731
    width = w("class_embedding").shape[0]
    x = F.conv2d(pixel_values, w("conv1.weight"), stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([w("class_embedding").expand(x.shape[0], 1, width), x], dim=1) + w("positional_embedding")
    x = F.layer_norm(x, (width,), w("ln_pre.weight"), w("ln_pre.bias"))
    for j in range(layers):
        p = f"transformer.resblocks.{j}."
        h = F.layer_norm(x, (width,), w(p + "ln_1.weight"), w(p + "ln_1.bias")).transpose(0, 1)  # (seq, batch, width)
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, w(p + "attn.in_proj_weight"), w(p + "attn.in_proj_bias"), None, None, False, 0.0,
            w(p + "attn.out_proj.weight"), w(p + "attn.out_proj.bias"), training=False, need_weights=False,
        )
        x = x + attn.transpose(0, 1)
        h = F.layer_norm(x, (width,), w(p + "ln_2.weight"), w(p + "ln_2.bias"))
        h = F.linear(h, w(p + "mlp.c_fc.weight"), w(p + "mlp.c_fc.bias"))
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, w(p + "mlp.c_proj.weight"), w(p + "mlp.c_proj.bias"))
    return x[:, 1:]


def test_open_clip_vision_keys_convert_to_clip_vision_model():
    model = build("llama")
    original = {k: v for k, v in export_original_state_dict(model, full=True).items()
                if not k.startswith("vision_encoder.")}
    clip = open_clip_state_dict()
    converted, report = convert_original_state_dict({**original, **clip}, model.config, return_report=True)

    # q, k, v are the thirds of the stacked in_proj, in that order.
    for j in range(2):
        stacked = clip[f"vision_encoder.transformer.resblocks.{j}.attn.in_proj_weight"]
        stacked_bias = clip[f"vision_encoder.transformer.resblocks.{j}.attn.in_proj_bias"]
        for n, name in enumerate("qkv"):
            target = f"vision_model.encoder.layers.{j}.self_attn.{name}_proj"
            assert torch.equal(converted[target + ".weight"], stacked[32 * n: 32 * (n + 1)])
            assert torch.equal(converted[target + ".bias"], stacked_bias[32 * n: 32 * (n + 1)])
            assert report.sources[target + ".weight"] == [f"vision_encoder.transformer.resblocks.{j}.attn.in_proj_weight"]
    assert torch.equal(converted["vision_model.post_layernorm.weight"], clip["vision_encoder.ln_post.weight"])
    assert "vision_encoder.proj" in report.ignored

    vision = CLIPVisionModel(tiny_vision_config()).eval()
    vision.load_state_dict({k[len("vision_model."):]: v for k, v in converted.items() if k.startswith("vision_model.")})
    pixel_values = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = vision(pixel_values=pixel_values).last_hidden_state[:, 1:]
        reference = reference_open_clip_tokens(clip, pixel_values)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)

    # The full model's image features start from exactly these tokens.
    fresh = OpenFlamingoForConditionalGeneration(model.config).eval()
    fresh.load_state_dict(converted)
    with torch.no_grad():
        features = fresh.get_image_features(pixel_values[None, :, None])
        expected = fresh.perceiver(reference[None, :, None])
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# 3. The CLI on local tiny files
# ----------------------------------------------------------------------------------------------------------------------


def write_local_release(tmp_path, family):
    """A tiny 'release' on disk: checkpoint.pt (trainable-only), the base LM, the vision tower, the raw tokenizer."""
    processor = OpenFlamingoProcessor(tokenizer=build_tiny_tokenizer())  # adds the tokens as the original did
    vocab = len(processor.tokenizer)
    torch.manual_seed(0)
    config = tiny_openflamingo_config(family, text_config=tiny_text_config(
        family, vocab_size=vocab, pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=0, bos_token_id=0))
    processor.update_model_config(config)
    model = OpenFlamingoForConditionalGeneration(config).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)

    torch.save(export_original_state_dict(model), tmp_path / "checkpoint.pt")
    # The published LM has a larger, padded vocabulary and never saw OpenFlamingo's tokens.
    lm = AutoModelForCausalLM.from_config(tiny_text_config(family, vocab_size=vocab + 13, eos_token_id=0,
                                                           bos_token_id=0, pad_token_id=None))
    state = lm.state_dict()
    state.update({k: v for k, v in model.language_model.state_dict().items() if v.shape == state[k].shape})
    lm.load_state_dict(state)
    lm.save_pretrained(tmp_path / "lm")
    model.vision_model.save_pretrained(tmp_path / "vision")
    image_processor = default_image_processor()
    image_processor.size = {"shortest_edge": 30}
    image_processor.crop_size = {"height": 30, "width": 30}
    image_processor.save_pretrained(tmp_path / "vision")
    build_tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    overrides = {"perceiver_num_heads": 2, "perceiver_head_dim": 16, "cross_attn_num_heads": 2,
                 "cross_attn_head_dim": 16}
    args = ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--language-model", str(tmp_path / "lm"),
            "--vision-model", str(tmp_path / "vision"), "--tokenizer", str(tmp_path / "tokenizer"),
            "--config-overrides", json.dumps(overrides)]
    return model, processor, args


@pytest.mark.parametrize("family", ["mpt", "gpt_neox"])
def test_cli_converts_local_files(tmp_path, family, capsys):
    model, processor, args = write_local_release(tmp_path, family)
    out = tmp_path / "converted"
    assert main([*args, "--output", str(out), "--max-shard-size", "300KB", "--report", str(tmp_path / "r.json")]) == 0

    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    for name in ("config.json", "generation_config.json", "README.md", "processor_config.json"):
        assert (out / name).exists(), name
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sources"]["perceiver.latents"] == ["perceiver.latents"]

    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    loaded_processor = AutoProcessor.from_pretrained(out)
    assert isinstance(loaded, OpenFlamingoForConditionalGeneration)
    assert isinstance(loaded_processor, OpenFlamingoProcessor)
    reference = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
    # Token ids: the ones the checkpoint was trained with, in the tokenizer, the config and the generation config.
    assert loaded_processor.image_token_id == processor.image_token_id == loaded.config.media_token_id
    assert loaded_processor.eoc_token_id == processor.eoc_token_id == loaded.config.eoc_token_id
    assert len(loaded_processor.tokenizer) == loaded.config.text_config.vocab_size
    assert loaded.generation_config.eos_token_id == processor.eoc_token_id
    assert loaded.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    assert loaded_processor.chat_template

    images = [make_image(1), make_image(2)]
    prompt = "<image>Output:a cat.<|endofchunk|><image>Output:"
    batch = loaded_processor(images=[images], text=[prompt], return_tensors="pt")
    assert batch["pixel_values"].shape[-2:] == (30, 30)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
        generated = loaded.generate(**batch, max_new_tokens=5, do_sample=False)
    expected = loaded_processor.post_process_generation(generated, batch["input_ids"])

    pipe = pipeline("image-text-to-text", model=str(out))
    result = pipe(images=images, text=prompt, generate_kwargs=dict(max_new_tokens=5, do_sample=False),
                  return_full_text=False)
    assert result[0]["generated_text"] == expected[0]

    # Zero-shot captioning of an image alone, the "image-to-text" task (see OpenFlamingoPipeline).
    zero_shot = loaded_processor(images=[[images[0]]], text=["<image>"], return_tensors="pt")
    with torch.no_grad():
        expected = loaded_processor.post_process_generation(
            loaded.generate(**zero_shot, max_new_tokens=5, do_sample=False), zero_shot["input_ids"]
        )
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # transformers 5.24's "image-to-text" redirect warning is malformed
    try:
        captioner = pipeline("image-to-text", model=str(out), pipeline_class=OpenFlamingoPipeline)
    finally:
        transformers_logging.set_verbosity(verbosity)
    caption = captioner(images[0], generate_kwargs=dict(max_new_tokens=5, do_sample=False))
    assert caption[0]["generated_text"] == expected[0]

    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "<|endofchunk|>" in card


def test_cli_errors_name_the_problem(tmp_path, capsys):
    model, _, args = write_local_release(tmp_path, "mpt")
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    checkpoint["perceiver.unexpected"] = torch.zeros(2)
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    # A checkpoint that does not fit the architecture: one error line, exit status 2.
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "perceiver.unexpected" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # Usage problems: argparse's exit status 2 (see tests/test_cli_errors.py for every kind).
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", str(tmp_path / "out2")])
    assert exit_info.value.code == 2
    assert "--release NAME" in capsys.readouterr().err
    # Offline, a release cannot be downloaded: the error says how to give the checkpoint instead.
    with pytest.raises(SystemExit) as exit_info:
        main(["--release", "OpenFlamingo-3B-vitl-mpt1b", "--output", str(tmp_path / "out3"), "--local-files-only"])
    assert exit_info.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_attention_sizes_are_read_from_the_checkpoint():
    """Head counts (query width / head width) and feed-forward multipliers of the Perceiver and the gated blocks come
    from the shapes, so a checkpoint with non-default sizes converts without overrides of them."""
    from openflamingo_hf.convert.release_conversion import _infer_attention_sizes

    config = tiny_openflamingo_config("llama", perceiver_num_heads=3, perceiver_head_dim=16, perceiver_ff_mult=2,
                                      cross_attn_num_heads=5, cross_attn_head_dim=8, cross_attn_ff_mult=3)
    state_dict = export_original_state_dict(OpenFlamingoForConditionalGeneration(config))
    head_dims = {"perceiver_head_dim": 16, "cross_attn_head_dim": 8}
    assert _infer_attention_sizes(state_dict, head_dims) == {
        "perceiver_num_heads": 3, "perceiver_ff_mult": 2, "cross_attn_num_heads": 5, "cross_attn_ff_mult": 3,
    }
    # Given overrides win over what the shapes say.
    assert "perceiver_num_heads" not in _infer_attention_sizes(state_dict, {**head_dims, "perceiver_num_heads": 1})


def test_cli_converts_non_default_sizes_and_names_the_override_it_cannot_infer(tmp_path, capsys):
    model, _, args = write_local_release(tmp_path, "gpt_neox")
    # Only the head widths (not in the shapes): the head counts come from the checkpoint.
    index = args.index("--config-overrides")
    args[index + 1] = json.dumps({"perceiver_head_dim": 16, "cross_attn_head_dim": 16})
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    loaded = OpenFlamingoForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert (loaded.config.perceiver_num_heads, loaded.config.cross_attn_num_heads) == (2, 2)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    # Without them, the default head width (64) does not divide the tiny model's 32-wide attention: one short line
    # that says which overrides to pass, instead of a list of every mismatched tensor.
    del args[index : index + 2]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--output", str(tmp_path / "out2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and len(err) < 400, err
    assert "perceiver_head_dim and perceiver_num_heads" in err


def test_cli_help_lists_every_release():
    command = [sys.executable, "-m", "openflamingo_hf.cli.convert"]  # the console script may be another checkout's
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, check=True)
    help_text = result.stdout
    for name, release in RELEASES.items():
        assert name in help_text
        assert release.language_model in help_text
    for option in ("--release", "--checkpoint", "--language-model", "--vision-model", "--tokenizer",
                   "--cross-attn-every-n-layers", "--output"):
        assert option in help_text


# ----------------------------------------------------------------------------------------------------------------------
# 4. Release configs
# ----------------------------------------------------------------------------------------------------------------------

# From the OpenFlamingo v2 releases' architecture and the language models' public configs:
# (text model_type, layers, width, heads, MLP width, tied output, cross-attention interval). Both MPTs (MPT-1B's
# MosaicGPT, with q/k LayerNorm, and MPT-7B, without) are built as this package's MosaicGPT.
PUBLISHED = {
    "OpenFlamingo-3B-vitl-mpt1b": ("mosaic_gpt", 24, 2048, 16, 8192, True, 1),
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct": ("mosaic_gpt", 24, 2048, 16, 8192, True, 1),
    "OpenFlamingo-4B-vitl-rpj3b": ("gpt_neox", 32, 2560, 32, 10240, False, 2),
    "OpenFlamingo-4B-vitl-rpj3b-langinstruct": ("gpt_neox", 32, 2560, 32, 10240, False, 2),
    "OpenFlamingo-9B-vitl-mpt7b": ("mosaic_gpt", 32, 4096, 32, 16384, True, 4),
}
# The MosaicGPT releases: (q/k LayerNorm, parameter names of the original checkpoints).
MOSAIC_GPT_FLAVOUR = {
    "OpenFlamingo-3B-vitl-mpt1b": (True, "mosaic_gpt"),
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct": (True, "mosaic_gpt"),
    "OpenFlamingo-9B-vitl-mpt7b": (False, "mpt"),
}
SCORES = {  # COCO 4-shot CIDEr, VQAv2 4-shot accuracy
    "OpenFlamingo-3B-vitl-mpt1b": (77.3, 45.8),
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct": (82.7, 45.7),
    "OpenFlamingo-4B-vitl-rpj3b": (81.8, 49.0),
    "OpenFlamingo-4B-vitl-rpj3b-langinstruct": (85.8, 49.0),
    "OpenFlamingo-9B-vitl-mpt7b": (89.0, 54.8),
}


def gpt_neox_sized_tokenizer():
    """A stand-in with the GPT-NeoX-20B tokenizer's size (50277 entries, no pad token), built offline."""
    vocab = {f"t{i}": i for i in range(50276)} | {"<|endoftext|>": 50276}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_configs_have_the_published_architecture(name):
    model_type, layers, width, heads, mlp_width, tied, interval = PUBLISHED[name]
    release = RELEASES[name]
    assert release.checkpoint_repo == f"openflamingo/{name}" and release.checkpoint_file == "checkpoint.pt"
    assert release.vision_model == "openai/clip-vit-large-patch14" and release.tokenizer == release.language_model
    assert (release.coco_cider_4shot, release.vqav2_accuracy_4shot) == SCORES[name]

    config = get_release_config(name)
    assert isinstance(config, OpenFlamingoConfig)
    assert config.cross_attn_every_n_layers == interval
    assert (config.media_token_id, config.eoc_token_id) == (50278, 50277)
    vision = config.vision_config
    assert (vision.model_type, vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.intermediate_size, vision.patch_size, vision.image_size, vision.hidden_act) == (
        "clip_vision_model", 1024, 24, 16, 4096, 14, 224, "quick_gelu")
    text = config.text_config
    assert (text.model_type, text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (
        model_type, layers, width, heads)
    assert text.vocab_size == 50280  # 50277 tokenizer entries + <|endofchunk|>, <image>, <PAD>
    if model_type == "gpt_neox":
        assert text.intermediate_size == mlp_width and text.use_parallel_residual is False
        assert text.rope_parameters["partial_rotary_factor"] == 1.0 and text.max_position_embeddings == 2048
    else:
        assert text.mlp_ratio * width == mlp_width and text.alibi and text.alibi_bias_max == 8 and text.no_bias
        assert (text.attn_qk_ln, text.checkpoint_layout) == MOSAIC_GPT_FLAVOUR[name]
        assert text.use_cache  # (MPT-7B's own config says false)

    with torch.device("meta"):
        model = OpenFlamingoForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(map(int, model.gated_cross_attn_layers)) == [i for i in range(layers) if (i + 1) % interval == 0]
    assert len(model.gated_cross_attn_layers) == layers // interval
    block = f"gated_cross_attn_layers.{interval - 1}."
    assert shapes[block + "attn.to_q.weight"] == (512, width) and shapes[block + "attn.to_kv.weight"] == (1024, 1024)
    assert shapes[block + "ff.fc1.weight"] == (4 * width, width) and shapes[block + "attn_gate"] == (1,)
    assert shapes["perceiver.latents"] == (64, 1024) and len(model.perceiver.layers) == 6
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (257, 1024)  # 256 patches + CLS
    assert tuple(model.language_model.get_input_embeddings().weight.shape) == (50280, width)
    if model_type == "gpt_neox":
        assert shapes["language_model.lm_head.weight"] == (50280, width)
    assert not model.all_tied_weights_keys  # MosaicGPT has no lm_head at all; GPT-NeoX's is untied
    assert any(".attn.q_ln." in k for k in shapes) == MOSAIC_GPT_FLAVOUR.get(name, (False,))[0]

    # The special-token ids follow from the tokenizer and the original's order of additions.
    processor = OpenFlamingoProcessor(tokenizer=gpt_neox_sized_tokenizer())
    assert len(processor.tokenizer) == text.vocab_size
    assert (processor.eoc_token_id, processor.image_token_id, processor.tokenizer.pad_token_id) == (
        config.eoc_token_id, config.media_token_id, text.pad_token_id)
