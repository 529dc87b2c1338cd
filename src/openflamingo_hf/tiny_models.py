"""Tiny random OpenFlamingo configurations (a few layers, width 32-64), for tests, the demo and CPU benchmarks.

Nothing here downloads anything: every config is built in-process.
"""

from __future__ import annotations

from transformers import CONFIG_MAPPING

from .modeling.configuration_openflamingo import OpenFlamingoConfig

TINY_VOCAB_SIZE = 64
# Token ids used by tiny models that are built without a tokenizer.
TINY_MEDIA_TOKEN_ID = 61
TINY_EOC_TOKEN_ID = 62
TINY_PAD_TOKEN_ID = 63
TINY_EOS_TOKEN_ID = 0

TEXT_FAMILIES = ("llama", "gpt_neox", "mpt", "opt", "gpt2", "mosaic_gpt")


def tiny_text_config(family: str = "llama", vocab_size: int = TINY_VOCAB_SIZE, num_layers: int = 4, **overrides):
    """A tiny causal-LM config of the given family (width 64, 4 heads)."""
    common = dict(vocab_size=vocab_size, pad_token_id=TINY_PAD_TOKEN_ID, eos_token_id=TINY_EOS_TOKEN_ID,
                  bos_token_id=TINY_EOS_TOKEN_ID)
    if family == "llama":
        kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    elif family == "gpt_neox":
        kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                      max_position_embeddings=256, tie_word_embeddings=False)
    elif family == "mpt":
        kwargs = dict(d_model=64, n_heads=4, n_layers=num_layers, expansion_ratio=2, max_seq_len=256,
                      no_bias=True)
    elif family == "mosaic_gpt":
        from .modeling.configuration_mosaic_gpt import MosaicGPTConfig

        kwargs = dict(d_model=64, n_heads=4, n_layers=num_layers, mlp_ratio=4, max_seq_len=256)
        kwargs.update(common)
        kwargs.update(overrides)
        return MosaicGPTConfig(**kwargs)
    elif family == "opt":
        kwargs = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=num_layers, num_attention_heads=4,
                      max_position_embeddings=256, word_embed_proj_dim=64)
    elif family == "gpt2":
        kwargs = dict(n_embd=64, n_layer=num_layers, n_head=4, n_positions=256)
    else:
        raise ValueError(f"Unknown tiny text family {family!r}; choose one of {TEXT_FAMILIES}.")
    kwargs.update(common)
    kwargs.update(overrides)
    return CONFIG_MAPPING[family](**kwargs)


def tiny_vision_config(**overrides):
    """A tiny CLIP vision tower: 30 px images, 10 px patches (9 patch tokens + CLS), width 32."""
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                  patch_size=10, projection_dim=32)
    kwargs.update(overrides)
    return CONFIG_MAPPING["clip_vision_model"](**kwargs)


def tiny_openflamingo_config(family: str = "llama", cross_attn_every_n_layers: int = 2, **overrides):
    """A tiny OpenFlamingo config around `tiny_text_config(family)` and `tiny_vision_config()`."""
    kwargs = dict(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(family),
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        media_token_id=TINY_MEDIA_TOKEN_ID,
        eoc_token_id=TINY_EOC_TOKEN_ID,
        perceiver_depth=2,
        perceiver_num_heads=2,
        perceiver_head_dim=16,
        perceiver_num_latents=4,
        cross_attn_num_heads=2,
        cross_attn_head_dim=16,
    )
    kwargs.update(overrides)
    return OpenFlamingoConfig(**kwargs)
