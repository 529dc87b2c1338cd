"""MosaicGPT configuration: the MPT-1B language model of the OpenFlamingo-3B releases."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class MosaicGPTConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MosaicGPTForCausalLM`], the "MosaicGPT" causal language model (remote code of
    `anas-awadalla/mpt-1b-redpajama-200b`, the language model of the OpenFlamingo-3B releases).

    MosaicGPT is a pre-LayerNorm decoder with ALiBi position biases, LayerNorms on the queries and keys
    (`attn_qk_ln`), no biases (LayerNorms included), a GELU MLP and an output projection tied to the token
    embedding. The field names are those of the original `config.json`, so that file loads as is; keys of it
    that this implementation does not use (`attn_impl`, `low_precision_layernorm`, `param_init_fn`, ...) are
    kept as plain attributes. The standard names `hidden_size`, `num_attention_heads`, `num_hidden_layers`,
    `max_position_embeddings` and `initializer_range` are aliases (see `attribute_map`).

    Defaults are the sizes of the real model (about 1.3B parameters).

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
    no_bias: bool = True
    logit_scale: float | int | str | None = None
    embedding_fraction: float | int = 1.0
    init_std: float = 0.02
    init_device: str = "cpu"
    layer_norm_epsilon: float = 1e-5
    use_cache: bool = True
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


__all__ = ["MosaicGPTConfig"]
