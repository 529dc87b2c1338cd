"""MosaicGPT configuration: the MPT language model of the OpenFlamingo releases (MPT-1B's "MosaicGPT" and MPT-7B)."""

import os
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Generic `PreTrainedConfig` keys of an MPT config that carry over unchanged.
_MPT_GENERIC_KEYS = (
    "dtype",
    "torch_dtype",
    "output_hidden_states",
    "return_dict",
    "_name_or_path",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)
# MPT field -> MosaicGPT field, top level and inside `attn_config`.
_MPT_FIELDS = {
    "d_model": "d_model",
    "n_heads": "n_heads",
    "n_layers": "n_layers",
    "expansion_ratio": "mlp_ratio",
    "max_seq_len": "max_seq_len",
    "vocab_size": "vocab_size",
    "resid_pdrop": "resid_pdrop",
    "emb_pdrop": "emb_pdrop",
    "embedding_fraction": "embedding_fraction",
    "logit_scale": "logit_scale",
    "no_bias": "no_bias",
    "layer_norm_epsilon": "layer_norm_epsilon",
    "init_device": "init_device",
    "initializer_range": "init_std",
}
_MPT_ATTN_FIELDS = {
    "attn_pdrop": "attn_pdrop",
    "clip_qkv": "attn_clip_qkv",
    "qk_ln": "attn_qk_ln",
    "softmax_scale": "softmax_scale",
    "alibi": "alibi",
    "alibi_bias_max": "alibi_bias_max",
}
# MPT settings that change the architecture away from what is implemented here, with the value that is implemented
# (missing keys are fine: older MPT configs predate them).
_MPT_REQUIRED_ATTN = {
    "attn_type": "multihead_attention",
    "prefix_lm": False,
    "rope": False,
    "qk_gn": False,
    "sliding_window_size": -1,
}
_MPT_NORM_TYPES = ("layernorm", "low_precision_layernorm")


def mpt_config_to_mosaic_gpt_kwargs(config_dict: dict[str, Any]) -> dict[str, Any]:
    r"""
    The `MosaicGPTConfig` arguments of an MPT config: transformers' `MptConfig` (as a dict) or the `config.json` of
    MosaicML's remote-code MPT (`mosaicml/mpt-7b`, `anas-awadalla/mpt-7b`), which share their field names.

    Architecture fields are translated (`expansion_ratio` -> `mlp_ratio`, `attn_config.qk_ln` -> `attn_qk_ln`,
    `attn_config.clip_qkv` -> `attn_clip_qkv`, ...) with MosaicML's meaning; transformers' `MptForCausalLM` ignores
    some of them (it always uses `expansion_ratio` 4, `alibi_bias_max` 8, no biases and no logit scale), so the two
    agree for MPT-7B's values. MPT's slope rule for head counts that are not a power of two is kept
    (`alibi_interleave_slopes=True`) and `checkpoint_layout` is `"mpt"`. `use_cache` is not taken over: MPT configs
    store `false`, a training setting, while this implementation always supports the cache. Code-location keys
    (`auto_map`, `architectures`) are dropped, so a saved config never points back to MosaicML's remote code.

    Raises:
        ValueError: for MPT variants not implemented here (multi-query/grouped attention, prefix LM, RoPE, sliding
            windows, RMSNorm, other feed-forward types).
    """
    attn_config = config_dict.get("attn_config") or {}
    if not isinstance(attn_config, dict):  # an `MptAttentionConfig`
        attn_config = attn_config.to_dict()
    unsupported = [
        f"attn_config.{key}={attn_config[key]!r}"
        for key, value in _MPT_REQUIRED_ATTN.items()
        if key in attn_config and attn_config[key] != value
    ]
    if config_dict.get("norm_type", "low_precision_layernorm") not in _MPT_NORM_TYPES:
        unsupported.append(f"norm_type={config_dict['norm_type']!r}")
    ffn_type = (config_dict.get("ffn_config") or {}).get("ffn_type", "mptmlp")
    if ffn_type != "mptmlp":
        unsupported.append(f"ffn_config.ffn_type={ffn_type!r}")
    if unsupported:
        raise ValueError(
            f"This MPT config uses {', '.join(unsupported)}, which MosaicGPTForCausalLM does not implement (it covers "
            "multi-head ALiBi attention with a GELU MLP and LayerNorm, as in MPT-1B and MPT-7B)."
        )

    kwargs: dict[str, Any] = {key: config_dict[key] for key in _MPT_GENERIC_KEYS if key in config_dict}
    kwargs.update({ours: config_dict[theirs] for theirs, ours in _MPT_FIELDS.items() if theirs in config_dict})
    kwargs.update({ours: attn_config[theirs] for theirs, ours in _MPT_ATTN_FIELDS.items() if theirs in attn_config})
    # Absent from an MptConfig means its default: qk_ln off, ALiBi on (max 8).
    kwargs.setdefault("attn_qk_ln", False)
    kwargs.setdefault("alibi", True)
    kwargs.setdefault("alibi_bias_max", 8)
    kwargs["alibi_interleave_slopes"] = True
    kwargs["checkpoint_layout"] = "mpt"
    return kwargs


@strict
class MosaicGPTConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MosaicGPTForCausalLM`], the MPT causal language model of the OpenFlamingo releases: the
    "MosaicGPT" remote code of `anas-awadalla/mpt-1b-redpajama-200b` (OpenFlamingo-3B) and, with `attn_qk_ln=False`,
    MPT-7B (OpenFlamingo-9B; transformers' [`~transformers.MptForCausalLM`]).

    MosaicGPT is a pre-LayerNorm decoder with ALiBi position biases, optional LayerNorms on the queries and keys
    (`attn_qk_ln`), no biases (LayerNorms included), a GELU MLP and an output projection tied to the token
    embedding. The field names are those of the original MosaicGPT `config.json`, so that file loads as is; keys of
    it that this implementation does not use (`attn_impl`, `low_precision_layernorm`, `param_init_fn`, ...) are
    kept as plain attributes. An MPT `config.json` (model type `"mpt"`, with `attn_config` and `expansion_ratio`)
    is translated on `from_pretrained`, and [`~MosaicGPTConfig.from_mpt_config`] translates an `MptConfig`. The
    standard names `hidden_size`, `num_attention_heads`, `num_hidden_layers`, `max_position_embeddings` and
    `initializer_range` are aliases (see `attribute_map`).

    Defaults are the sizes of MPT-1B (about 1.3B parameters).

    Args:
        d_model (`int`, defaults to 2048):
            Width of the residual stream.
        n_heads (`int`, defaults to 16):
            Number of attention heads; `d_model` must be a multiple of it.
        n_layers (`int`, defaults to 24):
            Number of decoder blocks.
        mlp_ratio (`int`, defaults to 4):
            The MLP's hidden width is `mlp_ratio * d_model`.
        max_seq_len (`int`, defaults to 2048):
            Longest sequence the model was trained on (ALiBi itself has no hard limit).
        vocab_size (`int`, defaults to 50432):
            Number of rows of the token embedding (GPT-NeoX tokenizer, padded).
        attn_pdrop (`float`, defaults to 0.0):
            Dropout on the attention probabilities.
        resid_pdrop (`float`, defaults to 0.0):
            Dropout on the attention and MLP outputs before they are added to the residual stream.
        emb_pdrop (`float`, defaults to 0.0):
            Dropout on the token embeddings.
        attn_qk_ln (`bool`, defaults to `True`):
            LayerNorm (over the full `d_model` width, before splitting into heads) on the queries and keys.
        attn_clip_qkv (`float`, *optional*):
            If set, the fused q/k/v projection is clamped to `[-attn_clip_qkv, attn_clip_qkv]`.
        softmax_scale (`float`, *optional*):
            Scale of the attention scores; `1 / sqrt(d_model / n_heads)` when not set.
        alibi (`bool`, defaults to `True`):
            ALiBi position biases. Must be `True`: the learned position embeddings of `alibi=False` MosaicGPT
            models are not implemented.
        alibi_bias_max (`int`, defaults to 8):
            Head `h` (1-based) gets the slope `2 ** (-h * alibi_bias_max / n_heads)`.
        alibi_interleave_slopes (`bool`, defaults to `False`):
            Slopes for a number of heads that is not a power of two. `False` (MosaicGPT): the rule above. `True`
            (MPT, as in the ALiBi paper): the rule above for the next power of two of heads, the slopes at odd
            (0-based) indices first, then those at even indices, the first `n_heads` kept. Both give the same slopes
            for a power of two.
        no_bias (`bool`, defaults to `True`):
            No bias in any linear layer or LayerNorm (the released models). `False` adds them.
        logit_scale (`float` or `"inv_sqrt_d_model"`, *optional*):
            If set, the logits are multiplied by it.
        embedding_fraction (`float`, defaults to 1.0):
            Fraction of the gradient that flows into the token embedding (the forward value is unchanged).
        init_std (`float`, defaults to 0.02):
            Standard deviation of the normal initialization of linear and embedding weights.
        init_device (`str`, defaults to `"cpu"`):
            Kept for compatibility with the original config; unused.
        layer_norm_epsilon (`float`, defaults to 1e-5):
            Epsilon of every LayerNorm.
        use_cache (`bool`, defaults to `True`):
            Whether the model returns a key/value cache.
        checkpoint_layout (`str`, defaults to `"mosaic_gpt"`):
            The parameter names of the original checkpoints of this model: `"mosaic_gpt"` (`ln_1`, `ln_2`,
            `mlp.mlp_up`, `mlp.mlp_down`, `ln_f`; MPT-1B) or `"mpt"` (`norm_1`, `norm_2`, `ffn.up_proj`,
            `ffn.down_proj`, `norm_f`; MPT-7B, MosaicML's MPT and transformers' `MptForCausalLM`). The model's modules
            always have the MosaicGPT names and both layouts load (see `MPT_KEY_MAPPING` in `modeling_mosaic_gpt`);
            this only says which names an export to the original layout writes.
        tie_word_embeddings (`bool`, defaults to `True`):
            The output projection is always the token embedding in MosaicGPT; `False` is rejected.

    Example:

    ```python
    >>> from openflamingo_hf.modeling.configuration_mosaic_gpt import MosaicGPTConfig
    >>> from openflamingo_hf.modeling.modeling_mosaic_gpt import MosaicGPTForCausalLM

    >>> config = MosaicGPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=100)
    >>> model = MosaicGPTForCausalLM(config)
    ```
    """

    model_type = "mosaic_gpt"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
        "initializer_range": "init_std",
    }

    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    mlp_ratio: int = 4
    max_seq_len: int = 2048
    vocab_size: int = 50432
    # The original config.json stores the dropout rates as ints (0), hence `float | int`.
    attn_pdrop: float | int = 0.0
    resid_pdrop: float | int = 0.0
    emb_pdrop: float | int = 0.0
    attn_qk_ln: bool = True
    attn_clip_qkv: float | int | None = None
    softmax_scale: float | None = None
    alibi: bool = True
    alibi_bias_max: int | float = 8
    alibi_interleave_slopes: bool = False
    no_bias: bool = True
    logit_scale: float | int | str | None = None
    embedding_fraction: float | int = 1.0
    init_std: float = 0.02
    init_device: str = "cpu"
    layer_norm_epsilon: float = 1e-5
    use_cache: bool = True
    checkpoint_layout: str = "mosaic_gpt"
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def validate_architecture(self):
        """Part of `@strict`-powered validation: reject settings this implementation does not cover."""
        super().validate_architecture()
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}).")
        if not self.alibi:
            raise ValueError("MosaicGPT without ALiBi (learned position embeddings) is not implemented.")
        if not self.tie_word_embeddings:
            raise ValueError("MosaicGPT always ties its output projection to the token embedding.")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise ValueError(f"logit_scale must be a number or 'inv_sqrt_d_model', got {self.logit_scale!r}.")
        if self.checkpoint_layout not in ("mosaic_gpt", "mpt"):
            raise ValueError(f"checkpoint_layout must be 'mosaic_gpt' or 'mpt', got {self.checkpoint_layout!r}.")

    @classmethod
    def from_mpt_config(cls, config: PreTrainedConfig | dict[str, Any], **kwargs) -> "MosaicGPTConfig":
        r"""
        The MosaicGPT config of an MPT model (transformers' `MptConfig`, or the dict of an MPT `config.json`), see
        [`mpt_config_to_mosaic_gpt_kwargs`]. `kwargs` override the translated fields.
        """
        config_dict = config if isinstance(config, dict) else config.to_dict()
        return cls(**{**mpt_config_to_mosaic_gpt_kwargs(config_dict), **kwargs})

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        # An MPT folder (MPT-7B, or a saved `MptForCausalLM`) is read as the equivalent MosaicGPT config, so that
        # `MosaicGPTForCausalLM.from_pretrained(mpt_folder)` builds the right architecture.
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "mpt":
            config_dict = {"model_type": cls.model_type, **mpt_config_to_mosaic_gpt_kwargs(config_dict)}
        return config_dict, kwargs


__all__ = ["MosaicGPTConfig", "mpt_config_to_mosaic_gpt_kwargs"]
