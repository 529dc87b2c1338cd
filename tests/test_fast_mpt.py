"""The one fast MPT (`MosaicGPTForCausalLM`): MPT-7B-style checkpoints load exactly, "eager" = "sdpa", a StaticCache
and a compiled decode give the tokens of eager dynamic-cache generation, and the decode step has no graph break.
Tiny random configs, CPU, fp32."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CompileConfig, MptConfig, MptForCausalLM, StaticCache

from openflamingo_hf.modeling.configuration_mosaic_gpt import MosaicGPTConfig
from openflamingo_hf.modeling.modeling_mosaic_gpt import (
    MosaicGPTForCausalLM,
    build_alibi_slopes,
    register,
)
from openflamingo_hf.modeling.modeling_openflamingo import OpenFlamingoForConditionalGeneration
from openflamingo_hf.releases import get_release_config
from openflamingo_hf.tiny_models import TINY_MEDIA_TOKEN_ID, tiny_openflamingo_config, tiny_text_config

register()

VOCAB = 100
ATOL = 1e-5
NEW_TOKENS = 8


def randomize_(model, seed=0):
    """Weights large enough that attention is far from uniform and the logits are O(1): a real test of ALiBi."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # LayerNorm weight
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) * (1.5 if "Wqkv" in name else 1.0))
    return model.eval()


def tiny_mpt(seed=0, d_model=64, n_heads=4, **attn_config):
    """A random transformers `MptForCausalLM` with the MPT-7B settings: no biases, no q/k LayerNorm, ALiBi (max 8)."""
    config = MptConfig(
        d_model=d_model, n_heads=n_heads, n_layers=3, expansion_ratio=4, max_seq_len=64, vocab_size=VOCAB,
        no_bias=True, attn_config={"alibi": True, "alibi_bias_max": 8, "qk_ln": False, **attn_config},
    )
    return randomize_(MptForCausalLM(config), seed)


def tiny_mosaic_gpt(seed=0, **kwargs):
    """The MPT-1B (MosaicGPT) flavour: q/k LayerNorm on."""
    config = MosaicGPTConfig(**{"d_model": 64, "n_heads": 4, "n_layers": 3, "vocab_size": VOCAB, "max_seq_len": 64,
                                **kwargs})
    return randomize_(MosaicGPTForCausalLM(config), seed)


def padded_batch(seed=0, length=11, pad=4):
    ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, attention_mask


def greedy(model, ids, attention_mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, eos_token_id=None, **kwargs)


@pytest.fixture(scope="module")
def mpt_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mpt")
    mpt = tiny_mpt(seed=1)
    mpt.save_pretrained(folder)
    return mpt, folder


# --------------------------------------------------------------------------------------------------------------------
# MPT-7B weights load exactly
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_mpt_for_causal_lm_folder_loads_and_matches(mpt_folder, attn_implementation):
    mpt, folder = mpt_folder
    ours, info = MosaicGPTForCausalLM.from_pretrained(
        folder, attn_implementation=attn_implementation, output_loading_info=True
    )
    ours.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    config = ours.config
    assert (config.model_type, config.attn_qk_ln, config.mlp_ratio, config.checkpoint_layout) == (
        "mosaic_gpt", False, 4, "mpt")
    assert config._attn_implementation == attn_implementation
    # The MPT folder says use_cache false (MptConfig's default); this model decodes from its cache.
    assert config.use_cache and ours.generation_config.use_cache
    assert "transformer.blocks.0.ln_1.weight" in ours.state_dict() and "transformer.blocks.0.attn.q_ln.weight" not in (
        ours.state_dict())
    assert torch.equal(ours.transformer.blocks[1].mlp.mlp_up.weight, mpt.transformer.blocks[1].ffn.up_proj.weight)

    ids, attention_mask = padded_batch(seed=2)
    with torch.no_grad():
        expected = mpt(ids, attention_mask=attention_mask, use_cache=False).logits
        logits = ours(ids, attention_mask=attention_mask).logits
    assert expected.abs().max() > 1.0  # the comparison has teeth
    real = attention_mask.bool()
    assert (logits - expected)[real].abs().max() < ATOL
    torch.testing.assert_close(logits[real], expected[real], atol=ATOL, rtol=0)

    # Greedy decoding (left-padded batch): transformers' MPT recomputes every step, ours decodes from its cache.
    assert torch.equal(greedy(ours, ids, attention_mask), greedy(mpt, ids, attention_mask, use_cache=False))


def test_mosaicml_remote_code_layout_loads(mpt_folder, tmp_path):
    """MosaicML's `mpt` repos (MPT-7B, `anas-awadalla/mpt-7b`): their config.json, the MPT weight names, no lm_head."""
    mpt, _ = mpt_folder
    config = {  # the keys of mpt-7b's config.json, with a tiny model's sizes
        "architectures": ["MPTForCausalLM"],
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                        "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                        "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
        "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig",
                     "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
        "d_model": 64, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
        "init_config": {"init_div_is_residual": True, "init_nonlinearity": "relu", "init_std": 0.02,
                        "name": "kaiming_normal_"},
        "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 64, "model_type": "mpt",
        "n_heads": 4, "n_layers": 3, "no_bias": True, "norm_type": "low_precision_layernorm", "resid_pdrop": 0,
        "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "float32", "transformers_version": "4.28.1",
        "use_cache": False, "verbose": 0, "vocab_size": VOCAB,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in mpt.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    ours, info = MosaicGPTForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not hasattr(ours.config, "auto_map")  # never points back to MosaicML's remote code
    ids, attention_mask = padded_batch(seed=3)
    with torch.no_grad():
        expected = mpt(ids, attention_mask=attention_mask).logits
        logits = ours.eval()(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits[attention_mask.bool()], expected[attention_mask.bool()], atol=ATOL, rtol=0)

    # Saved as transformers saves any renamed checkpoint: in the names it was read with; both layouts reload.
    ours.save_pretrained(tmp_path / "resaved")
    assert "transformer.blocks.0.norm_1.weight" in load_file(str(tmp_path / "resaved" / "model.safetensors"))
    ours.save_pretrained(tmp_path / "ours", save_original_format=False)
    assert "transformer.blocks.0.ln_1.weight" in load_file(str(tmp_path / "ours" / "model.safetensors"))
    for name in ("resaved", "ours"):
        reloaded = MosaicGPTForCausalLM.from_pretrained(tmp_path / name).eval()
        assert json.loads((tmp_path / name / "config.json").read_text())["model_type"] == "mosaic_gpt"
        with torch.no_grad():
            assert torch.equal(reloaded(ids, attention_mask=attention_mask).logits,
                               ours(ids, attention_mask=attention_mask).logits)


def test_non_power_of_two_heads_follow_mpt():
    """MPT interleaves the slopes of the next power of two; MosaicGPT spaced them over n_heads."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for n_heads in (6, 12, 16):
        mpt_slopes = -build_mpt_alibi_tensor(n_heads, 2, alibi_bias_max=8)[:, 0, 0]  # slope * (0 - 1)
        torch.testing.assert_close(build_alibi_slopes(n_heads, 8, interleave=True), mpt_slopes)
    assert not torch.equal(build_alibi_slopes(6, 8), build_alibi_slopes(6, 8, interleave=True))

    mpt = tiny_mpt(seed=4, d_model=48, n_heads=6)
    ours = MosaicGPTForCausalLM(MosaicGPTConfig.from_mpt_config(mpt.config)).eval()
    assert ours.config.alibi_interleave_slopes
    missing, unexpected = ours.load_state_dict(_renamed(mpt.state_dict()), strict=False)
    assert not missing and unexpected == ["lm_head.weight"]
    ids, attention_mask = padded_batch(seed=4)
    with torch.no_grad():
        expected = mpt(ids, attention_mask=attention_mask).logits
        logits = ours(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits[attention_mask.bool()], expected[attention_mask.bool()], atol=ATOL, rtol=0)


def _renamed(state_dict):
    import re

    from openflamingo_hf.modeling.modeling_mosaic_gpt import MPT_KEY_MAPPING

    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in MPT_KEY_MAPPING.items():
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def test_mpt_config_translation():
    # (A config.json's dict: transformers' MptAttentionConfig types attn_pdrop as an int.)
    mpt = MptConfig(d_model=96, n_heads=8, n_layers=5, expansion_ratio=2, max_seq_len=128, vocab_size=300,
                    no_bias=True, logit_scale=0.5, layer_norm_epsilon=1e-6, emb_pdrop=0.1, resid_pdrop=0.2,
                    attn_config={"alibi_bias_max": 16, "clip_qkv": 6.0, "softmax_scale": 0.3, "qk_ln": True},
                    pad_token_id=1, eos_token_id=2).to_dict()
    mpt["attn_config"]["attn_pdrop"] = 0.05
    config = MosaicGPTConfig.from_mpt_config(mpt, vocab_size=320)
    fields = ("d_model", "n_heads", "n_layers", "mlp_ratio", "max_seq_len", "vocab_size", "no_bias", "logit_scale",
              "layer_norm_epsilon", "emb_pdrop", "resid_pdrop", "alibi", "alibi_bias_max", "attn_clip_qkv",
              "softmax_scale", "attn_qk_ln", "attn_pdrop", "pad_token_id", "eos_token_id", "use_cache",
              "checkpoint_layout", "alibi_interleave_slopes")
    assert {f: getattr(config, f) for f in fields} == {
        "d_model": 96, "n_heads": 8, "n_layers": 5, "mlp_ratio": 2, "max_seq_len": 128, "vocab_size": 320,
        "no_bias": True, "logit_scale": 0.5, "layer_norm_epsilon": 1e-6, "emb_pdrop": 0.1, "resid_pdrop": 0.2,
        "alibi": True, "alibi_bias_max": 16, "attn_clip_qkv": 6.0, "softmax_scale": 0.3, "attn_qk_ln": True,
        "attn_pdrop": 0.05, "pad_token_id": 1, "eos_token_id": 2, "use_cache": True, "checkpoint_layout": "mpt",
        "alibi_interleave_slopes": True,
    }
    # MPT variants that are not implemented here are refused, not approximated.
    for attn_config in ({"attn_type": "multiquery_attention"}, {"prefix_lm": True}):
        with pytest.raises(ValueError, match="does not implement"):
            MosaicGPTConfig.from_mpt_config(MptConfig(attn_config=attn_config))
    with pytest.raises(Exception, match="ALiBi"):
        MosaicGPTConfig.from_mpt_config(MptConfig(attn_config={"alibi": False}))


# --------------------------------------------------------------------------------------------------------------------
# eager = sdpa, static = dynamic, compiled = eager
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["mpt7b"])
def test_eager_equals_sdpa_prefill_and_decode(flavour):
    outputs = {}
    ids, attention_mask = padded_batch(seed=5, length=12)
    for attn_implementation in ("eager", "sdpa"):
        kwargs = {"attn_qk_ln": False} if flavour == "mpt7b" else {}
        model = tiny_mosaic_gpt(seed=5, **kwargs)
        model.set_attn_implementation(attn_implementation)
        assert model.config._attn_implementation == attn_implementation
        with torch.no_grad():
            prefill = model(ids[:, :8], attention_mask=attention_mask[:, :8])
            steps = [prefill.logits]
            for t in range(8, 12):
                steps.append(model(ids[:, t : t + 1], attention_mask=attention_mask[:, : t + 1],
                                   cache=prefill.cache).logits)
        outputs[attn_implementation] = torch.cat(steps, dim=1)
    real = attention_mask.bool()
    torch.testing.assert_close(outputs["sdpa"][real], outputs["eager"][real], atol=ATOL, rtol=0)
    assert torch.isfinite(outputs["sdpa"]).all() and torch.isfinite(outputs["eager"]).all()


@pytest.mark.parametrize("flavour, attn_implementation", [("mpt7b", "sdpa"), ("mpt1b", "eager")])
def test_static_cache_generate_equals_dynamic(flavour, attn_implementation):
    model = tiny_mosaic_gpt(seed=6, **({"attn_qk_ln": False} if flavour == "mpt7b" else {}))
    model.set_attn_implementation(attn_implementation)
    ids, attention_mask = padded_batch(seed=6)
    dynamic = greedy(model, ids, attention_mask, return_dict_in_generate=True)
    static = greedy(model, ids, attention_mask, cache_implementation="static", return_dict_in_generate=True)
    assert type(static.cache) is StaticCache and type(dynamic.cache) is not StaticCache
    assert torch.equal(static.sequences, dynamic.sequences)
    # Both equal recomputing the whole sequence at every step.
    assert torch.equal(dynamic.sequences, greedy(model, ids, attention_mask, use_cache=False))


def test_compiled_static_generate_equals_eager_dynamic():
    # `aot_eager` traces and functionalizes exactly what inductor would compile (the in-place StaticCache updates
    # included) in seconds on a CPU; fullgraph=True fails on any graph break. Inductor itself: see the GPU test.
    model = tiny_mosaic_gpt(seed=7, attn_qk_ln=False)
    ids, attention_mask = padded_batch(seed=7)
    expected = greedy(model, ids, attention_mask)
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # generate compiles only on accelerators otherwise
    compiled = greedy(model, ids, attention_mask, cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # generate really took the compiled path
    assert torch.equal(compiled, expected)


def test_decode_step_has_no_graph_break():
    model = tiny_mosaic_gpt(seed=8, attn_qk_ln=False)
    ids, attention_mask = padded_batch(seed=8)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        prefill = model(ids, attention_mask=attention_mask, cache=cache)
        next_ids = torch.cat([ids, prefill.logits[:, -1:].argmax(-1)], dim=1)
        full_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        # Exactly what generate feeds the decode step (a 4D mask prepared for the static cache) ...
        step = model.prepare_inputs_for_generation(next_ids, next_sequence_length=1, cache=cache,
                                                   attention_mask=full_mask, use_cache=True)
        assert step["attention_mask"].ndim == 4 and step["input_ids"].shape == (2, 1)
        explanation = torch._dynamo.explain(model)(**step)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        # ... and a plain call with the 2D padding mask.
        explanation = torch._dynamo.explain(model)(input_ids=next_ids[:, -1:], attention_mask=full_mask, cache=cache)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    assert MosaicGPTForCausalLM._can_compile_fullgraph and MosaicGPTForCausalLM._supports_sdpa


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inductor_cuda_graphs_generate_equals_eager_on_gpu():
    model = tiny_mosaic_gpt(seed=9, attn_qk_ln=False).cuda()
    ids, attention_mask = (t.cuda() for t in padded_batch(seed=9))
    expected = greedy(model, ids, attention_mask)
    compiled = greedy(model, ids, attention_mask, cache_implementation="static",
                      compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
    assert torch.equal(compiled, expected)


# --------------------------------------------------------------------------------------------------------------------
# Generic-code contract and the 9B release
# --------------------------------------------------------------------------------------------------------------------


def test_forward_kwargs_reach_every_block():
    """OpenFlamingo hands its per-call inputs to the decoder layers as a keyword argument that a forward pre-hook
    on each block consumes; the model's forward must pass it through to all of them."""
    model = tiny_mosaic_gpt(seed=10)
    seen = []

    def consume(module, args, kwargs):
        seen.append(kwargs.pop("flamingo_inputs"))
        return args, kwargs

    for block in model.transformer.blocks:
        block.register_forward_pre_hook(consume, with_kwargs=True)
    ids, attention_mask = padded_batch(seed=10)
    with torch.no_grad():
        model(ids, attention_mask=attention_mask, flamingo_inputs="per-call")
    assert seen == ["per-call"] * model.config.n_layers


def test_release_9b_builds_mosaic_gpt():
    text_config = get_release_config("OpenFlamingo-9B-vitl-mpt7b").text_config
    assert isinstance(text_config, MosaicGPTConfig)
    assert (text_config.d_model, text_config.n_heads, text_config.n_layers, text_config.mlp_ratio) == (4096, 32, 32, 4)
    assert not text_config.attn_qk_ln and text_config.alibi and text_config.alibi_bias_max == 8
    assert text_config.no_bias and text_config.tie_word_embeddings and text_config.use_cache
    assert text_config.checkpoint_layout == "mpt" and text_config.vocab_size == 50280
    with torch.device("meta"):
        lm = MosaicGPTForCausalLM(text_config)
    names = set(lm.state_dict())
    assert {"transformer.blocks.31.ln_1.weight", "transformer.blocks.0.mlp.mlp_up.weight",
            "transformer.ln_f.weight"} <= names
    assert not any("q_ln" in n or "lm_head" in n for n in names)
    assert sum(p.numel() for p in lm.parameters()) == 50280 * 4096 + 32 * 12 * 4096**2 + 32 * 2 * 4096 + 4096


def test_release_9b_style_openflamingo_decode_step_is_one_graph():
    """The 9B release's shape in small: OpenFlamingo on MPT-7B-as-MosaicGPT (transformers' MPT, which does not hand
    keyword arguments to its blocks, could not be compiled with the gated blocks)."""
    text_config = MosaicGPTConfig.from_mpt_config(tiny_text_config("mpt", expansion_ratio=4))
    model = OpenFlamingoForConditionalGeneration(tiny_openflamingo_config(text_config=text_config)).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    assert model._can_compile_fullgraph
    image = TINY_MEDIA_TOKEN_ID
    ids = torch.tensor([[5, image, 7, 8, 9], [image, 10, 11, 12, 13]])
    attention_mask = torch.ones_like(ids)
    cache = StaticCache(config=text_config, max_cache_len=32)
    with torch.no_grad():
        pixel_values = torch.randn(2, 1, 1, 3, 30, 30, generator=torch.Generator().manual_seed(11))
        prefill = model(input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values, cache=cache,
                        use_cache=True)
        next_ids = prefill.logits[:, -1:].argmax(-1)
        full_ids = torch.cat([ids, next_ids], dim=1)
        step = {"input_ids": next_ids, "attention_mask": torch.ones_like(full_ids),
                "media_index": model.get_media_index(full_ids)[:, -1:], "media_cache": prefill.media_cache,
                "cache": cache, "use_cache": True}
        explanation = torch._dynamo.explain(model)(**step)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
