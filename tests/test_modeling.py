"""Core model: invariants, masking, caching, padding, generation, save/load and error paths (tiny random models)."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, CLIPModel, CLIPConfig

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf import OpenFlamingoConfig, OpenFlamingoForConditionalGeneration, find_decoder_layers
from openflamingo_hf.tiny_models import (
    TEXT_FAMILIES,
    TINY_EOC_TOKEN_ID,
    TINY_MEDIA_TOKEN_ID,
    TINY_PAD_TOKEN_ID,
    tiny_openflamingo_config,
    tiny_text_config,
    tiny_vision_config,
)

IMG = TINY_MEDIA_TOKEN_ID
EOC = TINY_EOC_TOKEN_ID
PAD = TINY_PAD_TOKEN_ID


def build(family="llama", seed=0, random_gates=False, **config_overrides):
    torch.manual_seed(seed)
    model = OpenFlamingoForConditionalGeneration(tiny_openflamingo_config(family, **config_overrides)).eval()
    if random_gates:
        randomize_gates(model, seed)
    return model


def randomize_gates(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.copy_(torch.rand(1, generator=generator) + 0.5)
            block.ff_gate.copy_(torch.rand(1, generator=generator) + 0.5)


def text(*tokens):
    """Builds a row of ids: ints are kept, 'I' is <image>, 'E' is <|endofchunk|>."""
    return [IMG if t == "I" else EOC if t == "E" else t for t in tokens]


def pixels(batch, num_images, seed=0):
    return torch.randn(batch, num_images, 1, 3, 30, 30, generator=torch.Generator().manual_seed(seed))


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------------
# Reference computations, written independently of the model code (explicit softmax, as in the original)
# ----------------------------------------------------------------------------------------------------------------------


def reference_cross_attention(attn, x, media, media_locations, only_immediate):
    """The original MaskedCrossAttention: explicit masked softmax, rows without media zeroed."""
    b, t_img, n = media.shape[:3]
    h, d = attn.num_heads, attn.head_dim
    q = attn.to_q(attn.norm(x))
    k, v = attn.to_kv(media.reshape(b, t_img * n, -1)).chunk(2, dim=-1)
    q, k, v = (z.reshape(b, -1, h, d).permute(0, 2, 1, 3) for z in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q * d**-0.5, k)
    text_time = media_locations.cumsum(-1)
    media_time = torch.arange(t_img) + 1
    key_time = media_time.repeat_interleave(n)
    if only_immediate:
        allowed = text_time[:, None, :, None] == key_time[None, None, None, :]
    else:
        allowed = text_time[:, None, :, None] >= key_time[None, None, None, :]
    sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
    attn_weights = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    attn_weights = attn_weights.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    out = torch.einsum("bhij,bhjd->bhid", attn_weights, v).permute(0, 2, 1, 3).reshape(b, -1, h * d)
    return attn.to_out(out)


def reference_perceiver(perceiver, features):
    """The original PerceiverResampler with explicit softmax."""
    b, t_img, f, v, dim = features.shape
    x = features.reshape(b, t_img, f * v, dim)
    latents = perceiver.latents[None, None].expand(b, t_img, -1, -1)
    for layer in perceiver.layers:
        a = layer.attn
        h, d = a.num_heads, a.head_dim
        xm, lat = a.norm_media(x), a.norm_latents(latents)
        q = a.to_q(lat)
        k, val = a.to_kv(torch.cat([xm, lat], dim=-2)).chunk(2, dim=-1)
        split = lambda z: z.reshape(b, t_img, -1, h, d).transpose(2, 3)  # noqa: E731
        q, k, val = split(q) * d**-0.5, split(k), split(val)
        sim = torch.einsum("bthid,bthjd->bthij", q, k)
        w = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bthij,bthjd->bthid", w, val).transpose(2, 3).reshape(b, t_img, -1, h * d)
        latents = a.to_out(out) + latents
        ff = layer.ff
        latents = ff.fc2(torch.nn.functional.gelu(ff.fc1(ff.norm(latents)))) + latents
    return perceiver.norm(latents)


# ----------------------------------------------------------------------------------------------------------------------
# 1. Zero gates: the model is its language model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_zero_gates_equal_bare_language_model(family):
    model = build(family)
    # An independent standalone LM with the same weights: its own config object (not the model's, which a bug could
    # have altered), no hooks, no OpenFlamingo code involved.
    bare = AutoModelForCausalLM.from_config(tiny_text_config(family)).eval()
    bare.load_state_dict(model.language_model.state_dict())
    ids = torch.tensor([text(5, 6, "I", 7, 8, "E", "I", 9, 10, 11), text(12, "I", 13, 14, 15, 16, 17, 18, 19, 20)])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels(2, 2)).logits
        expected = bare(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_gated_blocks_sit_before_every_nth_decoder_layer(family):
    model = build(family, cross_attn_every_n_layers=2)
    _, layers = find_decoder_layers(model.language_model)
    assert len(layers) == 4
    assert sorted(model.gated_cross_attn_layers.keys()) == ["1", "3"]  # (i + 1) % 2 == 0
    model = build(family, cross_attn_every_n_layers=1)
    assert sorted(model.gated_cross_attn_layers.keys()) == ["0", "1", "2", "3"]
    for block in model.gated_cross_attn_layers.values():
        assert block.attn_gate.shape == (1,) and block.attn_gate.item() == 0.0 and block.ff_gate.item() == 0.0


def test_language_model_alone_is_unaffected_by_the_blocks():
    """Outside an OpenFlamingo forward the hooks do nothing, even with non-zero gates."""
    model = build("llama", random_gates=True)
    bare = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    bare.load_state_dict(model.language_model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model.language_model(input_ids=ids).logits, bare(input_ids=ids).logits)
        # ... while inside a forward they do: text-only input still gets the feed-forward half.
        assert not torch.allclose(model(input_ids=ids).logits, bare(input_ids=ids).logits, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Reference equality of the building blocks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("only_immediate", [True, False])
def test_cross_attention_equals_reference(only_immediate):
    model = build("llama", only_attend_immediate_media=only_immediate)
    block = next(iter(model.gated_cross_attn_layers.values()))
    torch.manual_seed(1)
    x = torch.randn(2, 9, 64)
    media = torch.randn(2, 3, 4, 32)
    ids = torch.tensor([text(1, 2, "I", 3, "I", 4, 5, "I", 6), text("I", 1, 2, 3, 4, 5, 6, 7, 8)])
    image_mask = torch.ones(2, 3, dtype=torch.bool)
    cache = model.build_media_cache(media, image_mask)
    attn_mask, has_media = model._cross_attention_mask(model.get_media_index(ids), cache)
    key, value = cache.key_values[next(iter(model.gated_cross_attn_layers.keys()))]
    with torch.no_grad():
        out = block.attn(x, key, value, attn_mask, has_media)
        expected = reference_cross_attention(block.attn, x, media, ids == IMG, only_immediate)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Tokens before the first image get exactly zero (not NaN), in both modes.
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert not torch.isnan(out).any()


def test_perceiver_equals_reference():
    model = build("llama")
    torch.manual_seed(2)
    features = torch.randn(2, 3, 2, 9, 32)  # (batch, images, frames, patches, dim)
    with torch.no_grad():
        torch.testing.assert_close(
            model.perceiver(features), reference_perceiver(model.perceiver, features), atol=1e-5, rtol=1e-5
        )


def test_image_features_are_clip_patch_tokens_without_post_layernorm():
    model = build("llama")
    px = pixels(1, 2)
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.normal_()
        model.vision_model.post_layernorm.bias.normal_()
        patch = model.vision_model(pixel_values=px.flatten(0, 2)).last_hidden_state[:, 1:]
        expected = model.perceiver(patch.reshape(1, 2, 1, 9, 32))
        torch.testing.assert_close(model.get_image_features(px), expected)
        # ... and not the post-layernormed ones
        post = model.vision_model.post_layernorm(patch)
        assert not torch.allclose(model.perceiver(post.reshape(1, 2, 1, 9, 32)), expected, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Masking
# ----------------------------------------------------------------------------------------------------------------------


def _token_local_model(only_immediate):
    """Random gates, and the LM's self-attention output zeroed so that no token sees another: a token's logits then
    depend only on its own embedding and its own cross-attention."""
    model = build("llama", random_gates=True, cross_attn_every_n_layers=1, only_attend_immediate_media=only_immediate)
    with torch.no_grad():
        for layer in model.language_model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return model


@pytest.mark.parametrize("only_immediate", [True, False])
def test_changing_image_k_changes_only_tokens_that_see_it(only_immediate):
    model = _token_local_model(only_immediate)
    ids = torch.tensor([text(1, 2, 3, "I", 4, 5, "I", 6, 7, 8, "I", 9, 10)])
    media_index = model.get_media_index(ids)[0]
    base_px = pixels(1, 3, seed=0)
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=base_px).logits[0]
        for k in range(3):
            px = base_px.clone()
            px[0, k] = torch.randn_like(px[0, k])
            changed = (model(input_ids=ids, pixel_values=px).logits[0] - base).abs().amax(-1) > 1e-6
            sees_k = media_index == k + 1 if only_immediate else media_index >= k + 1
            assert torch.equal(changed, sees_k), (k, changed.tolist(), sees_k.tolist())


def test_tokens_before_first_image_never_change_with_full_language_model():
    model = build("mpt", random_gates=True, cross_attn_every_n_layers=1)
    ids = torch.tensor([text(1, 2, 3, 4, "I", 5, 6, "I", 7)])
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels(1, 2, seed=0)).logits
        b = model(input_ids=ids, pixel_values=pixels(1, 2, seed=1)).logits
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=0, rtol=0)
    assert (a[:, 4:] - b[:, 4:]).abs().amax() > 1e-4


def test_padding_image_slots_are_never_attended():
    """Row 0 has one image and a padding slot: the padding slot's pixels must not matter."""
    model = build("llama", random_gates=True)
    ids = torch.tensor([text("I", 1, 2, 3, 4), text("I", 5, "I", 6, 7)])
    px = pixels(2, 2)
    px2 = px.clone()
    px2[0, 1] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, pixel_values=px).logits[0], model(input_ids=ids, pixel_values=px2).logits[0]
        )


# ----------------------------------------------------------------------------------------------------------------------
# 3. Cache, padding, generation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_cached_step_by_step_decoding_equals_full_forward(family):
    model = build(family, random_gates=True)
    full = torch.tensor([text(3, "I", 4, 5, "E", "I", 6, 7, 8, 9, "E", 10, 11)])
    px = pixels(1, 2)
    with torch.no_grad():
        expected = model(input_ids=full, pixel_values=px).logits
        prompt_len = 7
        out = model(input_ids=full[:, :prompt_len], pixel_values=px, use_cache=True)
        steps = [out.logits]
        media_index = model.get_media_index(full)
        for t in range(prompt_len, full.shape[1]):
            out = model(
                input_ids=full[:, t : t + 1],
                cache=out.cache,
                media_cache=out.media_cache,
                media_index=media_index[:, t : t + 1],
                use_cache=True,
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_image_features_can_be_passed_back_instead_of_pixels():
    model = build("llama", random_gates=True)
    ids = torch.tensor([text("I", 1, 2, "I", 3)])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels(1, 2))
        again = model(input_ids=ids, image_features=out.image_hidden_states)
    assert out.image_hidden_states.shape == (1, 2, 4, 32)
    torch.testing.assert_close(again.logits, out.logits, atol=0, rtol=0)


def test_generated_image_token_beyond_images_attends_to_nothing():
    model = build("llama", random_gates=True)
    ids = torch.tensor([text("I", 1, 2)])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels(1, 1), use_cache=True)
        step = dict(input_ids=torch.tensor([[IMG]]), media_cache=out.media_cache, use_cache=False)
        beyond = model(cache=out.cache, media_index=torch.tensor([[2]]), **step).logits
        out = model(input_ids=ids, pixel_values=pixels(1, 1), use_cache=True)
        no_image = model(cache=out.cache, media_index=torch.tensor([[0]]), **step).logits
    assert torch.isfinite(beyond).all()
    torch.testing.assert_close(beyond, no_image, atol=0, rtol=0)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_left_padded_batch_equals_rows_alone(family):
    model = build(family, random_gates=True)
    rows = [text(3, 4, 5, 6, 7, 8, 9), text("I", 4, 5, "E", "I", 6, 7, "E", "I", 8), text("I", 9, 10)]
    images = [pixels(1, 1, seed=5)[:, :0], pixels(1, 3, seed=6), pixels(1, 1, seed=7)]
    ids, mask = left_pad(rows)
    px = torch.zeros(3, 3, 1, 3, 30, 30)
    for i, im in enumerate(images):
        px[i, : im.shape[1]] = im[0]
    with torch.no_grad():
        batch_logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        batch_gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=6,
                                   do_sample=False, eos_token_id=None, pad_token_id=PAD)
        for i, (row, im) in enumerate(zip(rows, images)):
            row_ids = torch.tensor([row])
            kwargs = {"pixel_values": im} if im.shape[1] else {}
            alone = model(input_ids=row_ids, **kwargs).logits[0]
            torch.testing.assert_close(batch_logits[i, -len(row):], alone, atol=1e-5, rtol=1e-5)
            alone_gen = model.generate(input_ids=row_ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                       pad_token_id=PAD, **kwargs)
            assert batch_gen[i, -6:].tolist() == alone_gen[0, -6:].tolist()


def test_greedy_generate_equals_manual_argmax_loop():
    model = build("llama", random_gates=True)
    ids = torch.tensor([text(2, "I", 3, 4, "E", "I", 5)])
    px = pixels(1, 2)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=8, do_sample=False, eos_token_id=None)
        seq = ids
        for _ in range(8):
            next_token = model(input_ids=seq, pixel_values=px).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
    assert gen.tolist() == seq.tolist()


def test_beam_search_with_return_sequences_stops_at_endofchunk():
    model = build("llama", random_gates=True)
    ids, mask = left_pad([text("I", 3, 4, "E", "I"), text(5, "I")])
    px = pixels(2, 2)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, num_beams=3,
                             num_return_sequences=2, max_new_tokens=10, min_new_tokens=3, eos_token_id=EOC,
                             pad_token_id=PAD, do_sample=False, sequence_bias={(EOC,): 100.0})
    assert out.shape[0] == 4
    new = out[:, ids.shape[1]:]
    # EOC is pushed up by sequence_bias but suppressed for 3 tokens (min_new_tokens), then wins: every returned beam ends with it after 4 new tokens.
    assert new.shape[1] == 4
    assert (new[:, -1] == EOC).all() and not (new[:, :3] == EOC).any()


def test_beam_search_equals_beam_search_on_precomputed_features():
    """Encoding once before beam expansion must equal passing the (same) features explicitly."""
    model = build("gpt_neox", random_gates=True)
    ids = torch.tensor([text("I", 3, 4, "E", "I", 9)])
    px = pixels(1, 2)
    with torch.no_grad():
        a = model.generate(input_ids=ids, pixel_values=px, num_beams=3, max_new_tokens=6, eos_token_id=None)
        features = model.get_image_features(px)
        b = model.generate(input_ids=ids, image_features=features, num_beams=3, max_new_tokens=6, eos_token_id=None)
        c = model.generate(input_ids=ids, pixel_values=px, num_beams=3, max_new_tokens=6, eos_token_id=None,
                           use_cache=False)
    assert a.tolist() == b.tolist() == c.tolist()


def test_sampling_with_num_return_sequences():
    model = build("opt", random_gates=True)
    ids = torch.tensor([text("I", 3, 4)])
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, pixel_values=pixels(1, 1), do_sample=True, top_k=10,
                         num_return_sequences=3, max_new_tokens=5, eos_token_id=None)
    assert out.shape == (3, 8)


def test_vision_tower_runs_once_per_generate(monkeypatch):
    model = build("llama", random_gates=True)
    calls = []
    model.vision_model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape if a else None))
    projections = []
    block = next(iter(model.gated_cross_attn_layers.values()))
    block.attn.to_kv.register_forward_hook(lambda m, a, o: projections.append(1))
    ids = torch.tensor([text("I", 3, 4)])
    model.generate(input_ids=ids, pixel_values=pixels(1, 1), num_beams=2, max_new_tokens=5, eos_token_id=None)
    assert len(calls) == 1 and len(projections) == 1


# ----------------------------------------------------------------------------------------------------------------------
# 4. Save / load
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_save_and_auto_load_give_identical_logits(tmp_path, family):
    model = build(family, random_gates=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is OpenFlamingoForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([text("I", 3, 4, "E", "I", 5)])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(input_ids=ids, pixel_values=pixels(1, 2)).logits,
            model(input_ids=ids, pixel_values=pixels(1, 2)).logits,
            atol=0,
            rtol=0,
        )


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_submodel_state_dict_keys_equal_standalone_models(family):
    model = build(family)
    standalone_lm = AutoModelForCausalLM.from_config(model.config.text_config)
    assert list(model.language_model.state_dict().keys()) == list(standalone_lm.state_dict().keys())
    standalone_vision = AutoModel.from_config(model.config.vision_config)
    assert list(model.vision_model.state_dict().keys()) == list(standalone_vision.state_dict().keys())
    top = {k.split(".")[0] for k in model.state_dict()}
    assert top == {"vision_model", "perceiver", "language_model", "gated_cross_attn_layers"}


def test_config_round_trip(tmp_path):
    config = tiny_openflamingo_config("gpt_neox", cross_attn_every_n_layers=2, only_attend_immediate_media=False)
    config.save_pretrained(tmp_path)
    loaded = OpenFlamingoConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert OpenFlamingoConfig(**config.to_dict()).to_dict() == config.to_dict()
    assert type(loaded.text_config).__name__ == "GPTNeoXConfig"
    assert type(loaded.vision_config).__name__ == "CLIPVisionConfig"
    default = OpenFlamingoConfig()
    assert default.vision_config.hidden_size == 1024 and default.vision_config.patch_size == 14
    assert default.text_config.d_model == 2048 and default.text_config.n_layers == 24


@pytest.mark.parametrize("family", ["mpt", "gpt2"])
def test_tied_embeddings_survive_resize_and_reload(tmp_path, family):
    model = build(family)
    lm = model.language_model
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    model.resize_token_embeddings(70)
    assert model.get_input_embeddings().weight.shape[0] == 70
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    assert model.config.text_config.vocab_size == 70
    ids = torch.tensor([text("I", 3, 69)])
    assert model(input_ids=ids, pixel_values=pixels(1, 1)).logits.shape[-1] == 70
    model.save_pretrained(tmp_path)
    loaded = OpenFlamingoForConditionalGeneration.from_pretrained(tmp_path)
    llm = loaded.language_model
    assert llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


def test_untied_resize_token_embeddings():
    model = build("gpt_neox")
    model.resize_token_embeddings(72)
    assert model.get_input_embeddings().weight.shape[0] == 72
    assert model.get_output_embeddings().weight.shape[0] == 72
    assert model.config.text_config.vocab_size == 72


def test_device_map_auto_loads_and_runs(tmp_path):
    model = build("llama", random_gates=True)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto")
    assert "GatedCrossAttentionBlock" in loaded._no_split_modules
    assert "LlamaDecoderLayer" in loaded._no_split_modules
    ids = torch.tensor([text("I", 3, 4)])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, pixel_values=pixels(1, 1)).logits, model(input_ids=ids, pixel_values=pixels(1, 1)).logits
        )


# ----------------------------------------------------------------------------------------------------------------------
# from_backbones and decoder-layer discovery
# ----------------------------------------------------------------------------------------------------------------------


def test_from_backbones_keeps_backbone_weights(tmp_path):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_text_config("gpt_neox")).eval()
    # The reference: the same weights in a separately built LM with its own config, which from_backbones never sees.
    reference_lm = AutoModelForCausalLM.from_config(tiny_text_config("gpt_neox")).eval()
    reference_lm.load_state_dict(lm.state_dict())
    clip = CLIPModel(CLIPConfig(vision_config=tiny_vision_config().to_dict(),
                                text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, vocab_size=50, projection_dim=32),
                                projection_dim=32)).eval()
    lm.save_pretrained(tmp_path / "lm")
    clip.save_pretrained(tmp_path / "clip")
    for vision, language in [(clip, lm), (str(tmp_path / "clip"), str(tmp_path / "lm"))]:
        model = OpenFlamingoForConditionalGeneration.from_backbones(
            vision, language, cross_attn_every_n_layers=2, media_token_id=IMG, eoc_token_id=EOC,
            perceiver_depth=1, perceiver_num_latents=4,
        ).eval()
        assert model.config.cross_attn_every_n_layers == 2 and model.config.media_token_id == IMG
        assert sorted(model.gated_cross_attn_layers) == ["1", "3"]
        assert type(model.vision_model).__name__ == "CLIPVisionModel"
        ids = torch.tensor([text(5, "I", 6, 7)])
        with torch.no_grad():
            torch.testing.assert_close(
                model(input_ids=ids, pixel_values=pixels(1, 1)).logits, reference_lm(input_ids=ids).logits
            )
            px = pixels(1, 1).flatten(0, 2)
            torch.testing.assert_close(
                model.vision_model(pixel_values=px).last_hidden_state,
                clip.vision_model(pixel_values=px).last_hidden_state,
            )


def test_from_backbones_with_processor_sets_ids_and_resizes_embeddings(caplog):
    from transformers.utils import logging as hf_logging

    from openflamingo_hf import OpenFlamingoProcessor
    from openflamingo_hf.testing_utils import build_tiny_tokenizer

    processor = OpenFlamingoProcessor(tokenizer=build_tiny_tokenizer())
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_text_config("llama", vocab_size=320)).eval()
    vision = AutoModel.from_config(tiny_vision_config())
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            model = OpenFlamingoForConditionalGeneration.from_backbones(vision, lm, processor=processor)
    finally:
        hf_logging.disable_propagation()
    # It resizes the embeddings itself, so it never tells the user to (the processor's reminder, for a model built
    # without from_backbones, must not appear).
    assert "resize_token_embeddings" not in caplog.text
    n = len(processor.tokenizer)
    assert n == 323
    assert model.config.media_token_id == processor.image_token_id and model.config.eoc_token_id == processor.eoc_token_id
    assert model.get_input_embeddings().weight.shape[0] == n and model.config.text_config.vocab_size == n
    assert model.config.text_config.pad_token_id == processor.tokenizer.pad_token_id


class _OddLM(nn.Module):
    """An unknown architecture whose decoder layers live at an unusual path."""

    def __init__(self, config, extra_list=False):
        super().__init__()
        self.config = config
        self.stack = nn.Module()
        self.stack.decoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(config.num_hidden_layers))
        if extra_list:
            self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(config.num_hidden_layers))


def test_decoder_layers_of_unknown_architecture_are_found_or_explained():
    config = tiny_text_config("llama")
    path, layers = find_decoder_layers(_OddLM(config))
    assert path == "stack.decoder" and len(layers) == 4
    with pytest.raises(ValueError, match="decoder_layers_attr_name"):
        find_decoder_layers(_OddLM(config, extra_list=True))
    path, _ = find_decoder_layers(_OddLM(config, extra_list=True), "heads")
    assert path == "heads"
    with pytest.raises(ValueError, match="does not name an nn.ModuleList"):
        find_decoder_layers(_OddLM(config), "stack.nothing")


def test_explicit_decoder_layers_attr_name_in_config():
    model = build("llama", decoder_layers_attr_name="model.layers")
    assert len(model.gated_cross_attn_layers) == 2
    with pytest.raises(ValueError, match="does not name"):
        build("llama", decoder_layers_attr_name="model.blocks")


# ----------------------------------------------------------------------------------------------------------------------
# 5. Errors
# ----------------------------------------------------------------------------------------------------------------------


def test_more_image_tokens_than_images_is_an_error():
    model = build("llama")
    ids = torch.tensor([text("I", 3, "I", 4), text("I", 5, "I", "I")])
    with pytest.raises(ValueError, match=r"Sample 1 has 3 <image> tokens but only 2 images"):
        model(input_ids=ids, pixel_values=pixels(2, 2))
    with pytest.raises(ValueError, match=r"Sample 1 has 3 <image> tokens but only 2 images"):
        model.generate(input_ids=ids, pixel_values=pixels(2, 2), max_new_tokens=2)


def test_wrong_pixel_rank_is_an_error():
    model = build("llama")
    ids = torch.tensor([text("I", 3)])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=ids, pixel_values=torch.randn(1, 1, 1, 4, 30, 30))


def test_pixel_values_without_image_tokens_is_an_error():
    model = build("llama")
    with pytest.raises(ValueError, match="no sample has more than 0 <image> tokens"):
        model(input_ids=torch.tensor([[3, 4, 5]]), pixel_values=pixels(1, 1))


def test_image_tokens_without_images_is_an_error():
    model = build("llama")
    with pytest.raises(ValueError, match="no images were given"):
        model(input_ids=torch.tensor([text("I", 4, 5)]))
    with pytest.raises(ValueError, match="no images were given"):
        model.generate(input_ids=torch.tensor([text("I", 4, 5)]), max_new_tokens=2)


@pytest.mark.parametrize(
    "case, message",
    [
        ("pixels_and_features", "Pass either pixel_values or image_features, not both."),
        ("frame_mask_without_pixels", "frame_mask describes the frames of pixel_values; pass it with pixel_values only."),
        ("no_media_token_id", "media_token_id"),
    ],
)
def test_forward_and_generate_refuse_the_same_media_inputs(case, message):
    """One media-input check serves both entry points: the same inputs, the same error."""
    model = build("llama")
    ids = torch.tensor([text("I", 4, 5)])
    features = model.get_image_features(pixels(1, 1))
    inputs = {
        "pixels_and_features": dict(pixel_values=pixels(1, 1), image_features=features),
        "frame_mask_without_pixels": dict(image_features=features, frame_mask=torch.ones(1, 1, 1, dtype=torch.bool)),
        "no_media_token_id": dict(pixel_values=pixels(1, 1)),
    }[case]
    if case == "no_media_token_id":
        model.config.media_token_id = None
    with pytest.raises(ValueError) as from_forward:
        model(input_ids=ids, **inputs)
    with pytest.raises(ValueError) as from_generate:
        model.generate(input_ids=ids, max_new_tokens=2, **inputs)
    assert message in str(from_forward.value)
    assert str(from_forward.value) == str(from_generate.value)


def test_batch_mismatch_and_explicit_image_mask_errors():
    model = build("llama")
    with pytest.raises(ValueError, match="Images are given for 2 samples but the text has 1"):
        model(input_ids=torch.tensor([text("I", 4)]), pixel_values=pixels(2, 1))
    with pytest.raises(ValueError, match="Sample 0 has 2 images but only 1 <image> tokens"):
        model(input_ids=torch.tensor([text("I", 4)]), pixel_values=pixels(1, 2),
              image_mask=torch.tensor([[True, True]]))


def test_continuing_from_cache_with_images_requires_media_index():
    model = build("llama")
    out = model(input_ids=torch.tensor([text("I", 4)]), pixel_values=pixels(1, 1), use_cache=True)
    with pytest.raises(ValueError, match="pass media_index"):
        model(input_ids=torch.tensor([[5]]), cache=out.cache, media_cache=out.media_cache)


# ----------------------------------------------------------------------------------------------------------------------
# 6. Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_gradient_checkpointing_gives_same_loss_and_gradients(family):
    ids = torch.tensor([text(3, "I", 4, 5, "E", "I", 6, 7, 8)])
    labels = ids.clone()
    labels[ids == IMG] = -100
    px = pixels(1, 2)
    results = []
    for checkpointing in (False, True):
        model = build(family, random_gates=True).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(b.gradient_checkpointing for b in model.gated_cross_attn_layers.values())
        out = model(input_ids=ids, pixel_values=px, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    assert any(k.startswith("gated_cross_attn_layers") and k.endswith("attn.to_kv.weight") for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = build("llama", random_gates=True)
    ids = torch.tensor([text(3, "I", 4, 5, 6, 7)])
    labels = ids.clone()
    labels[0, 1] = -100
    out = model(input_ids=ids, pixel_values=pixels(1, 1), labels=labels)
    logits = out.logits[0, :-1]
    target = labels[0, 1:]
    keep = target != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(out.loss, expected)
    assert math.isfinite(out.loss.item())


# ----------------------------------------------------------------------------------------------------------------------
# 7. GPU: bf16 + SDPA (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "mpt", "gpt_neox"])
def test_bf16_sdpa_on_gpu_matches_fp32_greedy(family):
    model = build(family, random_gates=True, attn_implementation="sdpa").cuda()
    assert model.config.text_config._attn_implementation in ("sdpa", "eager")
    ids = torch.tensor([text(2, "I", 3, 4, "E", "I", 5)]).cuda()
    px = pixels(1, 2).cuda()
    with torch.no_grad():
        fp32 = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=8, do_sample=False, eos_token_id=None)
        logits32 = model(input_ids=ids, pixel_values=px).logits
        model = model.to(torch.bfloat16)
        bf16 = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=8, do_sample=False, eos_token_id=None)
        logits16 = model(input_ids=ids, pixel_values=px).logits
    assert logits16.dtype == torch.bfloat16
    torch.testing.assert_close(logits16.float(), logits32, atol=0.1, rtol=0.05)
    assert bf16.tolist() == fp32.tolist()
