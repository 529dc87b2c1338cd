"""PyTorch MosaicGPT: the one MPT of this package (MPT-1B of the OpenFlamingo-3B releases, MPT-7B of the 9B release).

The OpenFlamingo-3B releases use `anas-awadalla/mpt-1b-redpajama-200b`, whose remote code ("MosaicGPT") predates
transformers' own MPT. It differs from [`~transformers.MptForCausalLM`] by LayerNorms on the queries and keys
(`attn_qk_ln`) and by its parameter names, which this implementation keeps, so the original state dict loads as is:

    transformer.wte.weight
    transformer.blocks.{i}.ln_1.weight
    transformer.blocks.{i}.attn.Wqkv.weight        (q, k, v stacked along dim 0)
    transformer.blocks.{i}.attn.q_ln.weight
    transformer.blocks.{i}.attn.k_ln.weight
    transformer.blocks.{i}.attn.out_proj.weight
    transformer.blocks.{i}.ln_2.weight
    transformer.blocks.{i}.mlp.mlp_up.weight
    transformer.blocks.{i}.mlp.mlp_down.weight
    transformer.ln_f.weight

With `attn_qk_ln=False` it is MPT-7B (the OpenFlamingo-9B release's LM): `from_pretrained` reads MPT folders
(transformers' `MptForCausalLM`, MosaicML's remote-code `mpt`) through `MPT_KEY_MAPPING` (`norm_1` -> `ln_1`,
`ffn.up_proj` -> `mlp.mlp_up`, ...) and `MosaicGPTConfig`'s translation of MPT configs.

There is no `lm_head`: the logits are `hidden_states @ transformer.wte.weight.T`, as in the original.

Attention is "sdpa" (default) or "eager"; ALiBi and the causal/padding mask are one additive float bias, built once
per forward and shared by every layer. The decode step has no host synchronization and no data-dependent Python
branch, so it runs with a `StaticCache` under `torch.compile(fullgraph=True)` (`generate(cache_implementation=
"static")`).
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_mosaic_gpt import MosaicGPTConfig

logger = logging.get_logger(__name__)

# Checkpoint names of MPT (transformers' `MptForCausalLM`, MosaicML's `mpt` remote code; regex) -> ours. Passed as
# `key_mapping` by `MosaicGPTPreTrainedModel.from_pretrained`, and used by the OpenFlamingo converter for the original
# 9B checkpoint. Every other name (`wte`, `attn.Wqkv`, `attn.out_proj`, `attn.q_ln`, `attn.k_ln`) is shared.
MPT_KEY_MAPPING: dict[str, str] = {
    r"\.norm_1\.": ".ln_1.",
    r"\.norm_2\.": ".ln_2.",
    r"\.ffn\.up_proj\.": ".mlp.mlp_up.",
    r"\.ffn\.down_proj\.": ".mlp.mlp_down.",
    r"(?<!\w)norm_f\.": "ln_f.",
}


def build_alibi_slopes(
    num_heads: int, alibi_bias_max: float = 8, device: torch.device | None = None, interleave: bool = False
) -> torch.Tensor:
    r"""
    ALiBi slopes. MosaicGPT (`interleave=False`): head `h` (1-based) gets `2 ** (-h * alibi_bias_max / num_heads)`.
    MPT (`interleave=True`): the same rule for the next power of two of heads, the slopes at odd (0-based) indices
    first, then those at even indices, the first `num_heads` kept (transformers' `build_mpt_alibi_tensor`). The two agree for a power of two (the
    released models have 16 and 32 heads).

    Returns:
        `torch.FloatTensor` of shape `(num_heads,)`, in float32.
    """
    padded_heads = 2 ** math.ceil(math.log2(num_heads)) if interleave else num_heads
    exponents = torch.arange(1, padded_heads + 1, dtype=torch.float32, device=device) * (alibi_bias_max / padded_heads)
    slopes = torch.pow(2.0, -exponents)
    if padded_heads != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def build_alibi_attention_bias(
    slopes: torch.Tensor,
    query_length: int,
    past_length: int | torch.Tensor,
    mask: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    r"""
    The additive `attn_mask` of every attention layer: ALiBi bias plus causal/padding mask.

    Query `i` sits at slot `past_length + i`, key `j` at slot `j`; the ALiBi bias is `slope * (j - (past_length + i))`,
    which is non-positive for every key a query may see. MosaicGPT and MPT built the bias as `slope * (j - const)` per
    key only; the two differ by a constant along each query row, which softmax ignores, but the relative form keeps
    the values of nearby keys small, so they stay exact in bfloat16. Slot distances are true token distances under
    left padding too: the padding slots all precede the real tokens and are masked. With a `StaticCache` the keys are
    all `max_cache_len` slots; those not written yet lie in the future of every query and are masked.

    Args:
        slopes (`torch.FloatTensor` of shape `(num_heads,)`):
            ALiBi slopes, see [`build_alibi_slopes`].
        query_length (`int`):
            Number of new tokens.
        past_length (`int` or 0-d `torch.LongTensor`):
            Number of tokens already in the cache (a tensor for a `StaticCache`, which keeps the decode step free of
            host synchronization).
        mask (`torch.Tensor` of shape `(batch_size, 1, query_length, key_length)`, *optional*):
            Boolean (True = attend) or additive float mask, as returned by `create_causal_mask`. If `None`, a plain
            causal mask over `past_length + query_length` keys is used (`past_length` must then be an int).
        dtype (`torch.dtype`):
            Dtype of the queries (SDPA wants the float mask in that dtype).

    Returns:
        `torch.Tensor` of shape `(batch_size or 1, num_heads, query_length, key_length)` and dtype `dtype`, with
        `torch.finfo(dtype).min` at masked positions.
    """
    device = slopes.device
    # At least float32, so that the sum with the mask below is exact (and float64 models keep their precision).
    compute_dtype = torch.promote_types(dtype, torch.float32)
    key_length = mask.shape[-1] if mask is not None else past_length + query_length
    # `arange(n) + past_length` rather than `arange(past_length, ...)`: a tensor bound would need `.item()`.
    query_positions = torch.arange(query_length, device=device) + past_length
    key_positions = torch.arange(key_length, device=device)
    # (query_length, key_length)
    distance = (key_positions[None, :] - query_positions[:, None]).to(compute_dtype)
    # (1, num_heads, query_length, key_length)
    bias = (slopes.to(compute_dtype)[:, None, None] * distance)[None]

    min_value = torch.finfo(dtype).min
    if mask is None:
        mask = key_positions[None, :] <= query_positions[:, None]
    if mask.dtype == torch.bool:
        bias = torch.where(mask.to(device), bias, min_value)
    else:
        # An additive mask holds `finfo.min` at masked positions; clamp so that adding the (negative) ALiBi bias to
        # it cannot overflow to -inf (a row of -inf would make softmax return NaN for fully padded query rows).
        bias = (bias + mask.to(device=device, dtype=compute_dtype)).clamp(min=min_value)
    return bias.to(dtype)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Attention written out (transformers' "eager"), with the softmax in float32 as MPT does.

    Args:
        query, key, value (`torch.Tensor` of shape `(batch_size, num_heads, length, head_dim)`):
            Queries (`query_length`) and cached + new keys and values (`key_length`).
        attention_mask (`torch.Tensor` of shape `(batch_size or 1, num_heads, query_length, key_length)`):
            Additive ALiBi + mask bias.

    Returns:
        `(attn_output, attn_weights)`: `(batch_size, query_length, num_heads, head_dim)` and
        `(batch_size, num_heads, query_length, key_length)`.
    """
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MosaicGPTAttention(nn.Module):
    """Multi-head self-attention with optional LayerNorm on the queries and keys and an additive (ALiBi + mask) bias."""

    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.scaling = config.softmax_scale if config.softmax_scale is not None else 1 / math.sqrt(self.head_dim)
        # MosaicGPT and MPT test `if self.clip_qkv:`, i.e. 0 means no clipping.
        self.clip_qkv = config.attn_clip_qkv if config.attn_clip_qkv else None
        self.attn_qk_ln = config.attn_qk_ln
        self.attention_dropout = config.attn_pdrop
        # The mask is always materialized (ALiBi needs it), so `is_causal` only tells generic code what this is.
        self.is_causal = True
        bias = not config.no_bias

        self.Wqkv = nn.Linear(config.d_model, 3 * config.d_model, bias=bias)
        if self.attn_qk_ln:
            # Over the full `d_model` width, before the split into heads.
            self.q_ln = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=bias)
            self.k_ln = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=bias)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=bias)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, query_length, d_model)`):
                Input of the attention (already normalized by `ln_1`).
            attention_mask (`torch.Tensor` of shape `(batch_size or 1, n_heads, query_length, key_length)`,
                *optional*):
                Additive bias from [`build_alibi_attention_bias`] (ALiBi + causal/padding mask), in the dtype of
                `hidden_states`. If `None`, a causal ALiBi bias without padding is built here.
            cache (`Cache`, *optional*):
                Key/value cache, updated in place for this layer.
            kwargs:
                Passed to the attention function (e.g. `output_attentions`).

        Returns:
            `(attn_output, attn_weights)`: `(batch_size, query_length, d_model)` and, for "eager",
            `(batch_size, n_heads, query_length, key_length)` (`None` for "sdpa").
        """
        batch_size, query_length, _ = hidden_states.shape

        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query_states, key_states, value_states = qkv.split(self.d_model, dim=-1)
        if self.attn_qk_ln:
            query_states = self.q_ln(query_states)
            key_states = self.k_ln(key_states)

        # (batch_size, seq_length, d_model) -> (batch_size, n_heads, seq_length, head_dim)
        head_shape = (batch_size, query_length, self.n_heads, self.head_dim)
        query_states = query_states.view(head_shape).transpose(1, 2)
        key_states = key_states.view(head_shape).transpose(1, 2)
        value_states = value_states.view(head_shape).transpose(1, 2)

        if attention_mask is None:
            # Called directly (not through `MosaicGPTModel`): causal attention without padding.
            past_length = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            slopes = build_alibi_slopes(
                self.n_heads,
                self.config.alibi_bias_max,
                device=hidden_states.device,
                interleave=self.config.alibi_interleave_slopes,
            )
            # A `StaticCache` returns all its slots, not just the filled ones: size the mask as the cache says.
            key_length = cache.get_mask_sizes(query_length, self.layer_idx)[0] if cache is not None else query_length
            key_positions = torch.arange(key_length, device=hidden_states.device)
            query_positions = torch.arange(query_length, device=hidden_states.device) + past_length
            mask = (key_positions[None, :] <= query_positions[:, None])[None, None]
            attention_mask = build_alibi_attention_bias(slopes, query_length, past_length, mask, query_states.dtype)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, query_length, self.d_model)
        return self.out_proj(attn_output), attn_weights


class MosaicGPTMLP(nn.Module):
    """`mlp_down(gelu(mlp_up(x)))`, with exact (erf) GELU."""

    def __init__(self, config: MosaicGPTConfig):
        super().__init__()
        bias = not config.no_bias
        self.mlp_up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=bias)
        self.act = nn.GELU(approximate="none")
        self.mlp_down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp_down(self.act(self.mlp_up(hidden_states)))


class MosaicGPTBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm decoder block: `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`."""

    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        bias = not config.no_bias
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=bias)
        self.attn = MosaicGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=bias)
        self.mlp = MosaicGPTMLP(config)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, query_length, d_model)`):
                The residual stream.
            attention_mask (`torch.Tensor` of shape `(batch_size or 1, n_heads, query_length, key_length)`,
                *optional*):
                Additive ALiBi + causal/padding bias, see [`build_alibi_attention_bias`].
            cache (`Cache`, *optional*):
                Key/value cache, updated in place.
            use_cache (`bool`, *optional*):
                Unused here (the cache is updated whenever it is given); accepted so that generic callers and the
                gradient-checkpointing wrapper can pass it.
            kwargs:
                Passed on to the attention; accepted so that generic code can call every decoder layer the same way
                (a forward pre-hook may consume its own keyword argument first, as OpenFlamingo's does).

        Returns:
            `torch.Tensor` of shape `(batch_size, query_length, d_model)`.
        """
        residual = hidden_states
        hidden_states, _ = self.attn(self.ln_1(hidden_states), attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = residual + self.resid_attn_dropout(hidden_states)

        residual = hidden_states
        hidden_states = self.mlp(self.ln_2(hidden_states))
        hidden_states = residual + self.resid_mlp_dropout(hidden_states)
        return hidden_states


class MosaicGPTPreTrainedModel(PreTrainedModel):
    config: MosaicGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MosaicGPTBlock"]
    # "sdpa" and "eager"; both take ALiBi as an additive float mask. FlashAttention and flex attention are not offered:
    # the bias would have to be passed to them in another form.
    _supports_sdpa = True
    # The forward has no graph break (no `.item()`, no data-dependent branch): with a `StaticCache` the decode step
    # compiles with `fullgraph=True`, which `generate` checks before compiling it.
    _can_compile_fullgraph = True
    # MPT checkpoints that store the (tied) output projection; here it is `transformer.wte` itself. The config refuses
    # `tie_word_embeddings=False`, so such an `lm_head` is always a copy of the embedding.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)lm_head\.weight$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        [`~transformers.PreTrainedModel.from_pretrained`], reading MPT checkpoints too: MPT-7B, MosaicML's `mpt`
        remote-code models and transformers' `MptForCausalLM` folders load with their config translated (see
        [`MosaicGPTConfig.from_mpt_config`]) and their parameter names mapped by `MPT_KEY_MAPPING` (a `key_mapping`
        given here replaces it). As for every renamed checkpoint, `save_pretrained` then writes the names it read
        (pass `save_original_format=False` for the MosaicGPT names); both load.
        """
        kwargs.setdefault("key_mapping", MPT_KEY_MAPPING)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        generation_config = getattr(model, "generation_config", None)
        if (
            model.config.checkpoint_layout == "mpt"
            and generation_config is not None
            and generation_config.use_cache is False
            and getattr(generation_config, "_from_model_config", False)
        ):
            # MPT configs say `use_cache: false` (a training setting, and `MptConfig`'s default) and the generation
            # config derived from them copies it, which would make `generate` recompute the whole sequence per token.
            generation_config.use_cache = True
        return loaded


class MosaicGPTModel(MosaicGPTPreTrainedModel):
    """The MosaicGPT decoder: token embedding, `n_layers` [`MosaicGPTBlock`]s and a final LayerNorm."""

    def __init__(self, config: MosaicGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.emb_drop = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList([MosaicGPTBlock(config, layer_idx=i) for i in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=not config.no_bias)
        self.gradient_checkpointing = False

        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding):
        self.wte = new_embeddings

    def _attention_bias(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> torch.Tensor:
        """The ALiBi bias with the causal and padding mask folded in: (batch_size or 1, n_heads, query_length,
        key_length), key_length being `max_cache_len` for a `StaticCache`."""
        # An int, or for a `StaticCache` a 0-d tensor on the device: the decode step then never reads it on the host.
        past_length = cache.get_seq_length() if cache is not None else 0
        query_length = inputs_embeds.shape[1]

        # Boolean (sdpa) or additive (eager) mask of shape (batch_size, 1, query_length, key_length); a 4D mask (what
        # `generate` prepares for a static cache) comes back as is. Never skipped: ALiBi needs a materialized mask to
        # add its bias to.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            allow_is_causal_skip=False,
        )
        if mask is None and attention_mask is not None and attention_mask.ndim == 2:
            # Attention implementations without a mask format of their own: fold the 2D padding mask in ourselves.
            key_positions = torch.arange(attention_mask.shape[-1], device=inputs_embeds.device)
            query_positions = torch.arange(query_length, device=inputs_embeds.device) + past_length
            causal = key_positions[None, :] <= query_positions[:, None]
            mask = causal[None, None] & attention_mask.to(device=inputs_embeds.device, dtype=torch.bool)[:, None, None]
        slopes = build_alibi_slopes(
            self.config.n_heads,
            self.config.alibi_bias_max,
            device=inputs_embeds.device,
            interleave=self.config.alibi_interleave_slopes,
        )
        return build_alibi_attention_bias(slopes, query_length, past_length, mask, inputs_embeds.dtype)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*):
                Token ids of the new tokens (only those not in `cache` yet).
            attention_mask (`torch.Tensor`, *optional*):
                `(batch_size, past_length + query_length)` with 1 for real tokens and 0 for padding (left padding
                for generation), or an already prepared 4D mask `(batch_size, 1, query_length, key_length)`.
            position_ids (`torch.LongTensor`, *optional*):
                Ignored: ALiBi only uses distances between cache slots (accepted because `generate` passes them).
            cache (`Cache`, *optional*):
                Key/value cache of the tokens seen so far, updated in place.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, query_length, d_model)`, *optional*):
                Token embeddings to use instead of `input_ids`.
            use_cache (`bool`, *optional*):
                Whether to create a `DynamicCache` when none is given (defaults to `config.use_cache`; off when
                training with gradient checkpointing). A given `cache` is always updated and returned.
            output_hidden_states (`bool`, *optional*):
                Whether to return the input of every block and the output of `ln_f` (`n_layers + 1` tensors).

        Returns:
            [`~transformers.modeling_outputs.BaseModelOutputWithPast`] with `last_hidden_state` of shape
            `(batch_size, query_length, d_model)` (after `ln_f`), `cache` and `hidden_states`.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and use_cache:
            logger.warning_once(
                "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`."
            )
            use_cache = False

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        # Built once, shared by every block: (batch_size or 1, n_heads, query_length, key_length).
        attention_bias = self._attention_bias(inputs_embeds, attention_mask, cache)

        hidden_states = inputs_embeds
        if self.config.embedding_fraction != 1:
            # Only a fraction of the gradient reaches the embedding; the forward value is unchanged.
            fraction = self.config.embedding_fraction
            hidden_states = hidden_states * fraction + hidden_states.detach() * (1 - fraction)
        hidden_states = self.emb_drop(hidden_states)

        all_hidden_states = () if output_hidden_states else None
        for block in self.blocks:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = block(
                hidden_states,
                attention_mask=attention_bias,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=all_hidden_states,
        )


class MosaicGPTForCausalLM(MosaicGPTPreTrainedModel, GenerationMixin):
    """MosaicGPT with its language-modeling head: the logits are `ln_f(hidden) @ transformer.wte.weight.T`."""

    # No `lm_head` module: the output projection *is* the token embedding, so the state dict holds exactly the
    # original keys, `load_state_dict(strict=True)` works on an original checkpoint, and `resize_token_embeddings`
    # cannot untie anything.
    _tied_weights_keys = None

    def __init__(self, config: MosaicGPTConfig):
        super().__init__(config)
        self.transformer = MosaicGPTModel(config)

        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding):
        self.transformer.wte = new_embeddings

    def get_output_embeddings(self) -> None:
        # The logits come from `transformer.wte`; there is no separate output module to resize or tie.
        return None

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, output_hidden_states:
                See [`MosaicGPTModel.forward`].
            labels (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*):
                Targets for the language-modeling loss; shifted inside (`labels = input_ids` works), `-100` is ignored.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
                If an int, compute the logits of only the last `logits_to_keep` positions (0: all); if a 1D tensor,
                of those sequence indices.

        Returns:
            [`~transformers.modeling_outputs.CausalLMOutputWithPast`] with `logits` of shape
            `(batch_size, kept_length, vocab_size)`, `loss`, `cache` and `hidden_states`.
        """
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )

        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = F.linear(hidden_states, self.transformer.wte.weight)
        if self.config.logit_scale is not None:
            logit_scale = self.config.logit_scale
            if logit_scale == "inv_sqrt_d_model":
                logit_scale = 1 / math.sqrt(self.config.d_model)
            logits = logits * logit_scale

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
        )


def register():
    """Register MosaicGPT with `AutoConfig` and `AutoModelForCausalLM` (model type `"mosaic_gpt"`)."""
    AutoConfig.register("mosaic_gpt", MosaicGPTConfig, exist_ok=True)
    AutoModelForCausalLM.register(MosaicGPTConfig, MosaicGPTForCausalLM, exist_ok=True)


__all__ = [
    "MPT_KEY_MAPPING",
    "MosaicGPTForCausalLM",
    "MosaicGPTModel",
    "MosaicGPTPreTrainedModel",
    "build_alibi_attention_bias",
    "build_alibi_slopes",
    "eager_attention_forward",
    "register",
]
