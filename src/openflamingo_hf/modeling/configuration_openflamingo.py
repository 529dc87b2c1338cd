"""OpenFlamingo model configuration."""

import copy
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_mosaic_gpt import MosaicGPTConfig

# The 3B releases' language model is MosaicGPT; a text_config of that type must resolve wherever this config is read
# (also from a trust_remote_code folder, where this file travels together with configuration_mosaic_gpt.py).
AutoConfig.register("mosaic_gpt", MosaicGPTConfig, exist_ok=True)

# OpenAI CLIP ViT-L/14 at 224 px: the vision tower of every released OpenFlamingo v2 model.
CLIP_VIT_L_14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

# MPT-1B-sized language model (d_model 2048, 16 heads, 24 layers, vocab 50432), the LM shape of
# the OpenFlamingo-3B releases.
MPT_1B = {
    "d_model": 2048,
    "n_heads": 16,
    "n_layers": 24,
    "expansion_ratio": 4,
    "max_seq_len": 2048,
    "vocab_size": 50432,
    "no_bias": True,
    "tie_word_embeddings": True,
}


@strict
class OpenFlamingoConfig(PreTrainedConfig):
    r"""
    Configuration of an [`OpenFlamingoForConditionalGeneration`]: a vision tower, a Perceiver resampler and a
    causal language model with gated cross-attention blocks inserted before every `cross_attn_every_n_layers`-th
    decoder layer.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision tower, of any type `AutoModel` can build (default: CLIP ViT-L/14, 224 px).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the language model, of any type `AutoModelForCausalLM` can build (default: an MPT-1B-sized
            MPT).
        cross_attn_every_n_layers (`int`, defaults to 1):
            A gated cross-attention block is inserted before decoder layer `i` when `(i + 1) % n == 0`.
        media_token_id (`int`, *optional*):
            Id of the `<image>` token. Required to run the model with images.
        eoc_token_id (`int`, *optional*):
            Id of the `<|endofchunk|>` token (end of the text that belongs to an image; the stop token).
        perceiver_depth, perceiver_num_heads, perceiver_head_dim, perceiver_num_latents, perceiver_ff_mult:
            Perceiver resampler sizes (defaults 6, 8, 64, 64, 4).
        perceiver_max_num_media (`int`, *optional*):
            If set, learned media-time embeddings for up to that many images (absent in the v2 releases).
        perceiver_max_num_frames (`int`, *optional*):
            If set, learned frame embeddings for up to that many frames (absent in the v2 releases).
        cross_attn_num_heads, cross_attn_head_dim, cross_attn_ff_mult:
            Gated cross-attention sizes (defaults 8, 64, 4).
        only_attend_immediate_media (`bool`, defaults to `True`):
            Each text token attends only to the latest image before it (the released default); if `False`, to
            every image before it.
        vision_feature_select_strategy (`"default"` or `"full"`):
            `"default"` drops the first (CLS) token of the vision tower's `last_hidden_state`, `"full"` keeps all.
        decoder_layers_attr_name (`str`, *optional*):
            Dotted path of the language model's decoder-layer list (e.g. `"model.layers"`). Found automatically
            when not given.
    """

    model_type = "openflamingo"
    # Outputs that `Trainer.evaluate` / `predict` must not gather as predictions (they are not per-token scores, and
    # the caches are not tensors): predictions are then the logits, as for any causal LM.
    keys_to_ignore_at_inference = ["cache", "media_cache", "image_hidden_states", "image_outputs"]
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_L_14
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mpt", init_kwargs=MPT_1B),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    cross_attn_every_n_layers: int = 1
    media_token_id: int | None = None
    eoc_token_id: int | None = None
    perceiver_depth: int = 6
    perceiver_num_heads: int = 8
    perceiver_head_dim: int = 64
    perceiver_num_latents: int = 64
    perceiver_ff_mult: int = 4
    perceiver_max_num_media: int | None = None
    perceiver_max_num_frames: int | None = None
    cross_attn_num_heads: int = 8
    cross_attn_head_dim: int = 64
    cross_attn_ff_mult: int = 4
    only_attend_immediate_media: bool = True
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    decoder_layers_attr_name: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Sub-config objects are copied, so that building this config never changes the caller's configs (e.g. the
        # `config` of a language model passed to `from_backbones`).
        for key in self.sub_configs_defaults:
            sub_config = getattr(self, key)
            if isinstance(sub_config, PreTrainedConfig):
                setattr(self, key, copy.deepcopy(sub_config))
        own_attn_implementations = {key: self._sub_config_attn_implementation(key) for key in self.sub_configs_defaults}
        # `PreTrainedConfig.__post_init__` sets `self._attn_implementation` from the `attn_implementation` kwarg, and its
        # setter writes that value into every sub-config, `None` included. A `None` erases what a sub-config already
        # had (say "eager" or "sdpa" of a built language model), and a model then built on it dispatches its attention
        # as a standalone module: without a causal mask. So the sub-configs keep their own unless one is asked for.
        requested = kwargs.get("attn_implementation")
        super().__post_init__(**kwargs)
        if requested is None:
            for key, implementation in own_attn_implementations.items():
                sub_config = getattr(self, key)
                if sub_config is not None and implementation is not None:
                    sub_config._attn_implementation = implementation
        if self.cross_attn_every_n_layers < 1:
            raise ValueError(
                f"cross_attn_every_n_layers must be >= 1, got {self.cross_attn_every_n_layers}."
            )
        # The output embedding of the LM is tied (or not) by the LM itself; mirror its setting so that
        # generic code reading the top-level config sees the truth.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    def _sub_config_attn_implementation(self, key: str) -> str | None:
        sub_config = getattr(self, key)
        return getattr(sub_config, "_attn_implementation", None) if isinstance(sub_config, PreTrainedConfig) else None

    @property
    def max_position_embeddings(self) -> int | None:
        """The language model's position limit (under whichever name its config uses), so that `generate` sees it
        on this top-level config and warns and caps `max_length` as it does for the bare LM."""
        text_config = self.text_config
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length"):
            value = getattr(text_config, name, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def vision_hidden_size(self) -> int:
        """Width of the vision tower's patch features, i.e. the Perceiver's width."""
        return self.vision_config.hidden_size

    def cross_attn_layer_indices(self, num_decoder_layers: int) -> list[int]:
        """Indices of the decoder layers that get a gated cross-attention block in front of them."""
        n = self.cross_attn_every_n_layers
        return [i for i in range(num_decoder_layers) if (i + 1) % n == 0]


__all__ = ["OpenFlamingoConfig"]
