"""The five released OpenFlamingo v2 models: where their parts live and their exact architecture, offline.

The facts (names, repos, architectures, special-token ids, published scores) are data, in `release_data`
(`releases.json`), which needs neither torch nor transformers; this module re-exports them and builds the
transformers config of each release from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .release_data import (
    CHECKPOINT_FILE,
    GPT_NEOX_EOS_TOKEN_ID,
    GPT_NEOX_TOKENIZER_SIZE,
    LANGUAGE_MODEL_CONFIGS,
    ONLY_ATTEND_IMMEDIATE_MEDIA,
    RELEASE_EOC_TOKEN_ID,
    RELEASE_MEDIA_TOKEN_ID,
    RELEASE_PAD_TOKEN_ID,
    RELEASE_VOCAB_SIZE,
    RELEASES,
    VISION_CONFIG,
    VISION_MODEL_REPO,
    OpenFlamingoRelease,
    get_release,
)

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

    from .modeling.configuration_openflamingo import OpenFlamingoConfig


def _config_from_fields(config_fields: dict, **overrides) -> PreTrainedConfig:
    """The transformers config of `config_fields["model_type"]` with the other fields and `overrides`."""
    from transformers import AutoConfig

    config_fields = dict(config_fields)
    return AutoConfig.for_model(config_fields.pop("model_type"), **config_fields, **overrides)


def _text_config(family: str) -> PreTrainedConfig:
    """The language model's architecture as released, with the embedding resized to `RELEASE_VOCAB_SIZE` rows."""
    if family not in LANGUAGE_MODEL_CONFIGS:
        raise ValueError(
            f"Unknown language-model family {family!r}; expected one of {', '.join(map(repr, LANGUAGE_MODEL_CONFIGS))}."
        )
    return _config_from_fields(
        LANGUAGE_MODEL_CONFIGS[family],
        vocab_size=RELEASE_VOCAB_SIZE,
        bos_token_id=GPT_NEOX_EOS_TOKEN_ID,
        eos_token_id=GPT_NEOX_EOS_TOKEN_ID,
        pad_token_id=RELEASE_PAD_TOKEN_ID,
    )


def get_release_config(name: str) -> OpenFlamingoConfig:
    """
    The exact architecture of a release, built offline (nothing is downloaded).

    Vision: CLIP ViT-L/14 at 224 px (width 1024, 24 layers, 16 heads, patch 14, 256 patch tokens). Perceiver and
    cross-attention sizes are the v2 defaults (Perceiver depth 6, 8 heads of 64, 64 latents; gated blocks 8 heads of
    64, ff x4). `media_token_id` / `eoc_token_id` are the ids the checkpoints were trained with (50278 / 50277, see
    `openflamingo_hf.release_data`); the converter re-derives them from the tokenizer and checks they agree.

    Args:
        name: a key of `RELEASES`.
    Returns:
        `OpenFlamingoConfig`
    """
    release = get_release(name)
    # MosaicGPT lives in this package; make sure AutoConfig knows it before OpenFlamingoConfig resolves sub-configs.
    from .modeling.configuration_openflamingo import OpenFlamingoConfig
    from .modeling.modeling_mosaic_gpt import register as register_mosaic_gpt

    register_mosaic_gpt()
    return OpenFlamingoConfig(
        vision_config=_config_from_fields(VISION_CONFIG),
        text_config=_text_config(release.language_model_family),
        cross_attn_every_n_layers=release.cross_attn_every_n_layers,
        media_token_id=RELEASE_MEDIA_TOKEN_ID,
        eoc_token_id=RELEASE_EOC_TOKEN_ID,
        only_attend_immediate_media=ONLY_ATTEND_IMMEDIATE_MEDIA,
    )


__all__ = [
    "CHECKPOINT_FILE",
    "GPT_NEOX_TOKENIZER_SIZE",
    "OpenFlamingoRelease",
    "RELEASES",
    "RELEASE_EOC_TOKEN_ID",
    "RELEASE_MEDIA_TOKEN_ID",
    "RELEASE_PAD_TOKEN_ID",
    "RELEASE_VOCAB_SIZE",
    "VISION_MODEL_REPO",
    "get_release",
    "get_release_config",
]
