"""Tests of MosaicGPT, the MPT-1B language model of the OpenFlamingo-3B releases (tiny random configs, CPU, fp32)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, MptConfig, MptForCausalLM

from openflamingo_hf.modeling.configuration_mosaic_gpt import MosaicGPTConfig
from openflamingo_hf.modeling.modeling_mosaic_gpt import (
    MosaicGPTBlock,
    MosaicGPTForCausalLM,
    build_alibi_slopes,
    register,
)

register()

D_MODEL, N_HEADS, N_LAYERS, VOCAB, MAX_SEQ_LEN = 64, 4, 3, 100, 64
ATOL = 1e-5


def original_key_names(n_layers):
    """Parameter names of the original MosaicGPT checkpoint (no biases, no lm_head)."""
    keys = ["transformer.wte.weight"]
    for i in range(n_layers):
        p = f"transformer.blocks.{i}."
        keys += [
            p + "ln_1.weight",
            p + "attn.Wqkv.weight",
            p + "attn.q_ln.weight",
            p + "attn.k_ln.weight",
            p + "attn.out_proj.weight",
            p + "ln_2.weight",
            p + "mlp.mlp_up.weight",
            p + "mlp.mlp_down.weight",
        ]
    return keys + ["transformer.ln_f.weight"]


def original_state_dict(seed=0, n_layers=N_LAYERS, d=D_MODEL, vocab=VOCAB):
    """Random weights under the original names, large enough that attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "wte.weight": (vocab, d),
        "ln_1.weight": (d,),
        "attn.Wqkv.weight": (3 * d, d),
        "attn.q_ln.weight": (d,),
        "attn.k_ln.weight": (d,),
        "attn.out_proj.weight": (d, d),
        "ln_2.weight": (d,),
        "mlp.mlp_up.weight": (4 * d, d),
        "mlp.mlp_down.weight": (d, 4 * d),
        "ln_f.weight": (d,),
    }
    sd = {}
    for key in original_key_names(n_layers):
        suffix = ".".join(key.split(".")[-3:]) if ".attn." in key or ".mlp." in key else ".".join(key.split(".")[-2:])
        shape = shapes[suffix]
        if len(shape) == 1:  # LayerNorm weight
            sd[key] = 1.0 + 0.5 * torch.randn(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(shape[-1]) * (3.0 if "Wqkv" in key else 1.0)
    return sd


def tiny_config(**kwargs):
    defaults = dict(d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_LAYERS, vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN)
    defaults.update(kwargs)
    return MosaicGPTConfig(**defaults)


def tiny_model(seed=0, **config_kwargs):
    model = MosaicGPTForCausalLM(tiny_config(**config_kwargs))
    model.load_state_dict(original_state_dict(seed), strict=True)
    return model.eval()


def random_ids(batch, length, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# Independent reference: the MosaicGPT forward written out with plain tensor ops from the original state dict.
# --------------------------------------------------------------------------------------------------------------------


def ref_layer_norm(x, weight, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_logits(sd, input_ids, n_heads=N_HEADS, n_layers=N_LAYERS, max_seq_len=MAX_SEQ_LEN, alibi_bias_max=8):
    """Logits of MosaicGPT as its remote code computed them (attn_impl "torch", no padding)."""
    wte = sd["transformer.wte.weight"]
    d = wte.shape[1]
    head_dim = d // n_heads
    batch, seq = input_ids.shape
    x = wte[input_ids]

    # Original `alibi_bias`: a (1, H, 1, max_seq_len) tensor of slope * (j - (max_seq_len - 1)), of which the first
    # `seq` columns are used; the causal mask then removes the future.
    m = torch.arange(1, n_heads + 1, dtype=torch.float32) * (alibi_bias_max / n_heads)
    slopes = 1.0 / (2**m)
    alibi = torch.arange(1 - max_seq_len, 1, dtype=torch.float32)[:seq]
    alibi = slopes.view(1, n_heads, 1, 1) * alibi.view(1, 1, 1, seq)
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)

    for i in range(n_layers):
        p = f"transformer.blocks.{i}."
        h = ref_layer_norm(x, sd[p + "ln_1.weight"])
        qkv = h @ sd[p + "attn.Wqkv.weight"].T
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        q = ref_layer_norm(q, sd[p + "attn.q_ln.weight"])
        k = ref_layer_norm(k, sd[p + "attn.k_ln.weight"])
        q = q.reshape(batch, seq, n_heads, head_dim).permute(0, 2, 1, 3)
        k = k.reshape(batch, seq, n_heads, head_dim).permute(0, 2, 3, 1)  # (b, h, head_dim, seq)
        v = v.reshape(batch, seq, n_heads, head_dim).permute(0, 2, 1, 3)
        scores = (q @ k) / math.sqrt(head_dim) + alibi
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.exp(scores - scores.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)
        context = (probs @ v).permute(0, 2, 1, 3).reshape(batch, seq, d)
        x = x + context @ sd[p + "attn.out_proj.weight"].T

        h = ref_layer_norm(x, sd[p + "ln_2.weight"])
        x = x + ref_gelu(h @ sd[p + "mlp.mlp_up.weight"].T) @ sd[p + "mlp.mlp_down.weight"].T

    x = ref_layer_norm(x, sd["transformer.ln_f.weight"])
    return x @ wte.T


# --------------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------------


def test_logits_match_independent_reference():
    sd = original_state_dict(seed=1)
    model = MosaicGPTForCausalLM(tiny_config())
    model.load_state_dict(sd, strict=True)
    model.eval()
    input_ids = random_ids(2, 17, seed=1)
    with torch.no_grad():
        logits = model(input_ids).logits
    expected = reference_logits(sd, input_ids)
    # Sanity check that the test has teeth: the logits are not tiny and attention is position-dependent.
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_eager_and_sdpa_masks_give_same_logits(attn_implementation):
    # The mask comes back boolean (sdpa) or additive (eager) from `create_causal_mask`; both paths must agree.
    sd = original_state_dict(seed=2)
    config = tiny_config()
    config._attn_implementation = attn_implementation
    model = MosaicGPTForCausalLM(config)
    model.load_state_dict(sd, strict=True)
    model.eval()
    input_ids = random_ids(2, 9, seed=2)
    attention_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
    # Row 1 has no padding: the reference applies directly.
    torch.testing.assert_close(logits[1:], reference_logits(sd, input_ids[1:]), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(logits[0, 3:], reference_logits(sd, input_ids[:1, 3:])[0], atol=ATOL, rtol=1e-5)


def test_alibi_slopes_match_transformers_mpt_for_power_of_two_heads():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for n_heads in (4, 8, 16):
        mpt = build_mpt_alibi_tensor(n_heads, 2, alibi_bias_max=8)[:, 0, 0]  # slope * (0 - 1)
        torch.testing.assert_close(build_alibi_slopes(n_heads, 8), -mpt)


def test_matches_transformers_mpt_without_qk_layernorm():
    """Without q_ln/k_ln, MosaicGPT is transformers' MPT under other parameter names: an independent check of ALiBi,
    the MLP, the tied head and the parameter layout. (A LayerNorm with unit weight still normalizes, so the q/k
    LayerNorms are switched off with `attn_qk_ln=False` rather than given identity weights.)"""
    sd = {k: v for k, v in original_state_dict(seed=3).items() if ".q_ln." not in k and ".k_ln." not in k}
    ours = MosaicGPTForCausalLM(tiny_config(attn_qk_ln=False))
    ours.load_state_dict(sd, strict=True)
    ours.eval()

    mpt_config = MptConfig(
        d_model=D_MODEL,
        n_heads=N_HEADS,
        n_layers=N_LAYERS,
        vocab_size=VOCAB,
        max_seq_len=MAX_SEQ_LEN,
        expansion_ratio=4,
        no_bias=True,
        attn_config={"alibi": True, "alibi_bias_max": 8, "qk_ln": False},
    )
    mpt = MptForCausalLM(mpt_config).eval()
    renames = {
        ".ln_1.": ".norm_1.",
        ".ln_2.": ".norm_2.",
        ".mlp.mlp_up.": ".ffn.up_proj.",
        ".mlp.mlp_down.": ".ffn.down_proj.",
    }
    mpt_sd = {}
    for key, value in sd.items():
        new_key = key.replace("transformer.ln_f.", "transformer.norm_f.")
        for old, new in renames.items():
            new_key = new_key.replace(old, new)
        mpt_sd[new_key] = value
    missing, unexpected = mpt.load_state_dict(mpt_sd, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    assert mpt.lm_head.weight.data_ptr() == mpt.transformer.wte.weight.data_ptr()

    input_ids = random_ids(2, 13, seed=3)
    with torch.no_grad():
        expected = mpt(input_ids, use_cache=False).logits
        logits = ours(input_ids).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=1e-5)


def test_qk_layernorm_matters():
    # Guards the two comparisons above against a model that silently skips q_ln/k_ln.
    model = tiny_model(seed=4)
    input_ids = random_ids(1, 8, seed=4)
    with torch.no_grad():
        logits = model(input_ids).logits
        for block in model.transformer.blocks:
            block.attn.q_ln.weight.mul_(2.0)
        changed = model(input_ids).logits
    assert (logits - changed).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------------------------
# Cache, generation, padding
# --------------------------------------------------------------------------------------------------------------------


def test_cached_decoding_equals_full_forward():
    model = tiny_model(seed=5)
    input_ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        out = model(input_ids[:, :5], use_cache=True)
        step_logits = [out.logits]
        cache = out.cache
        assert cache.get_seq_length() == 5
        for t in range(5, 12):
            out = model(input_ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            step_logits.append(out.logits)
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=ATOL, rtol=1e-5)


def test_cached_decoding_with_left_padding_equals_full_forward():
    model = tiny_model(seed=6)
    input_ids = random_ids(2, 10, seed=6)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        out = model(input_ids[:, :6], attention_mask=attention_mask[:, :6], use_cache=True)
        step_logits, cache = [out.logits], out.cache
        for t in range(6, 10):
            out = model(input_ids[:, t : t + 1], attention_mask=attention_mask[:, : t + 1], cache=cache)
            step_logits.append(out.logits)
            cache = out.cache
    stepped = torch.cat(step_logits, dim=1)
    torch.testing.assert_close(stepped[:, 4:], full[:, 4:], atol=ATOL, rtol=1e-5)


def test_greedy_generate_equals_manual_argmax_loop():
    model = tiny_model(seed=7)
    input_ids = random_ids(2, 6, seed=7)
    new_tokens = 8
    with torch.no_grad():
        generated = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        expected = input_ids
        for _ in range(new_tokens):
            next_token = model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)


def test_left_padded_batch_rows_equal_rows_alone():
    model = tiny_model(seed=8)
    short = random_ids(1, 5, seed=80)
    long = random_ids(1, 9, seed=81)
    pad = 0
    input_ids = torch.cat([torch.cat([torch.full((1, 4), pad), short], dim=1), long], dim=0)
    attention_mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    with torch.no_grad():
        batched = model(input_ids, attention_mask=attention_mask).logits
        alone_short = model(short).logits
        alone_long = model(long).logits
        assert torch.isfinite(batched).all()  # fully masked (padding) query rows must not produce NaN
        torch.testing.assert_close(batched[0, 4:], alone_short[0], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(batched[1], alone_long[0], atol=ATOL, rtol=1e-5)

        generated = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=pad
        )
        generated_short = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=pad)
        generated_long = model.generate(long, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    assert torch.equal(generated[0, 4:], generated_short[0])
    assert torch.equal(generated[1], generated_long[0])


# --------------------------------------------------------------------------------------------------------------------
# Outputs, loss
# --------------------------------------------------------------------------------------------------------------------


def test_logits_to_keep_hidden_states_and_loss():
    model = tiny_model(seed=9)
    input_ids = random_ids(2, 7, seed=9)
    with torch.no_grad():
        full = model(input_ids, output_hidden_states=True, labels=input_ids)
        last = model(input_ids, logits_to_keep=1).logits
    torch.testing.assert_close(last, full.logits[:, -1:])
    assert len(full.hidden_states) == N_LAYERS + 1
    torch.testing.assert_close(full.hidden_states[0], model.transformer.wte.weight[input_ids])
    torch.testing.assert_close(full.logits, full.hidden_states[-1] @ model.transformer.wte.weight.T)
    expected_loss = torch.nn.functional.cross_entropy(
        full.logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(full.loss, expected_loss)
    as_tuple = model(input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple)


def test_block_is_callable_by_generic_code():
    """A block called with `hidden_states` positionally, extra kwargs and no mask runs causal ALiBi attention."""
    model = tiny_model(seed=10)
    block = model.transformer.blocks[0]
    assert isinstance(block, MosaicGPTBlock)
    input_ids = random_ids(2, 6, seed=10)
    captured = {}
    handle = model.transformer.blocks[1].register_forward_pre_hook(
        lambda module, args: captured.setdefault("block_1_input", args[0])
    )
    with torch.no_grad():
        model(input_ids, use_cache=False)
        handle.remove()
        direct = block(model.transformer.wte(input_ids), some_unknown_kwarg=1, position_ids=None)
    torch.testing.assert_close(direct, captured["block_1_input"], atol=ATOL, rtol=1e-5)


def test_gradient_checkpointing_gives_same_loss_and_grads():
    input_ids = random_ids(2, 10, seed=11)

    def loss_and_grads(checkpointing):
        model = tiny_model(seed=11).train()
        mlp_calls = []
        for block in model.transformer.blocks:
            # A pre-hook: non-reentrant checkpointing stops the recompute as soon as the last saved tensor is
            # rebuilt, i.e. before a forward hook of the MLP would fire.
            block.mlp.register_forward_pre_hook(lambda *args: mlp_calls.append(1))
        if checkpointing:
            model.activation_checkpointing_enable()  # `gradient_checkpointing_enable` is deprecated in 5.x
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(mlp_calls)

    loss, grads, calls = loss_and_grads(checkpointing=False)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads(checkpointing=True)
    # Checkpointing really happened: every block was recomputed during backward.
    assert calls == N_LAYERS and calls_ckpt == 2 * N_LAYERS
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints, config, embeddings
# --------------------------------------------------------------------------------------------------------------------

ORIGINAL_CONFIG = {
    # The keys of the original MosaicGPT config.json (values of a tiny model).
    "alibi": True,
    "alibi_bias_max": 8,
    "architectures": ["MosaicGPT"],
    "attn_clip_qkv": None,
    "attn_impl": "torch",
    "attn_pdrop": 0,
    "attn_qk_ln": True,
    "d_model": D_MODEL,
    "emb_pdrop": 0,
    "embedding_fraction": 1.0,
    "init_device": "cpu",
    "init_std": 0.02,
    "logit_scale": None,
    "low_precision_layernorm": True,
    "max_seq_len": MAX_SEQ_LEN,
    "mlp_ratio": 4,
    "model_type": "mosaic_gpt",
    "n_heads": N_HEADS,
    "n_layers": N_LAYERS,
    "no_bias": True,
    "param_init_fn": "kaiming_normal_",
    "prefix_lm": False,
    "resid_pdrop": 0,
    "softmax_scale": None,
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "torch_dtype": "float32",
    "use_cache": False,
    "vocab_size": VOCAB,
}


def test_original_config_names_and_aliases():
    config = AutoConfig.for_model(**ORIGINAL_CONFIG)
    assert isinstance(config, MosaicGPTConfig)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (D_MODEL, N_HEADS, N_LAYERS)
    assert config.tie_word_embeddings and config.layer_norm_epsilon == 1e-5
    assert config.attn_impl == "torch"  # unknown original keys are kept as attributes
    with pytest.raises(Exception):
        MosaicGPTConfig(alibi=False)


def test_original_state_dict_loads_strictly(tmp_path):
    sd = original_state_dict(seed=12)
    model = MosaicGPTForCausalLM(tiny_config())
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(model.state_dict().keys()) == original_key_names(N_LAYERS)

    # A folder laid out like the original release: MosaicGPT config names, original weight names.
    (tmp_path / "config.json").write_text(json.dumps(ORIGINAL_CONFIG))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, MosaicGPTForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    input_ids = random_ids(2, 8, seed=12)
    with torch.no_grad():
        logits = loaded(input_ids).logits
    torch.testing.assert_close(logits, reference_logits(sd, input_ids), atol=ATOL, rtol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(seed=13)
    model.save_pretrained(tmp_path)
    assert sorted(load_file(str(tmp_path / "model.safetensors")).keys()) == sorted(original_key_names(N_LAYERS))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mosaic_gpt"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MosaicGPTForCausalLM)
    input_ids = random_ids(2, 8, seed=13)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_resize_token_embeddings_stays_tied():
    model = tiny_model(seed=14)
    input_ids = random_ids(1, 6, seed=14)
    with torch.no_grad():
        before = model(input_ids).logits
    model.resize_token_embeddings(VOCAB + 20)
    assert model.config.vocab_size == VOCAB + 20
    assert model.get_input_embeddings().weight.shape == (VOCAB + 20, D_MODEL)
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
    assert out.logits.shape[-1] == VOCAB + 20
    torch.testing.assert_close(out.logits[..., :VOCAB], before)
    # Still tied: changing an embedding row changes the corresponding logit column.
    with torch.no_grad():
        model.get_input_embeddings().weight[VOCAB + 5] = 1.0
        logits = model(input_ids).logits
    torch.testing.assert_close(logits[..., VOCAB + 5], out.hidden_states[-1].sum(-1))
