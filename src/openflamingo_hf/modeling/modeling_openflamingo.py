"""PyTorch OpenFlamingo: a vision tower, a Perceiver resampler and any causal LM with gated cross-attention.

Reference: Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning" (2022), and Awadalla et al.,
"OpenFlamingo: An Open-Source Framework for Training Large Autoregressive Vision-Language Models" (2023).

How the gated cross-attention blocks get into an unmodified language model
--------------------------------------------------------------------------
The language model is any `AutoModelForCausalLM`, kept exactly as it is: its state-dict keys, module names and code
are untouched, so base weights load as they are and PEFT targets the usual names. A gated block must run on the
hidden states right before certain decoder layers, so every decoder layer gets a forward *pre-hook* (a standard
PyTorch mechanism, registered once at construction). The hook itself holds no data: the conditioning of the current
call (image keys/values, which image each token may see) travels with the call, as a keyword argument that
`OpenFlamingoForConditionalGeneration.forward` gives the language model, which transformers models pass on to their
decoder layers, where the hook takes it out again. This route traces into one `torch.compile` graph. For the few
language models that do not pass keyword arguments on (transformers' MPT, Bloom, Falcon), eager calls also publish
it in a `ContextVar` for the duration of the language-model call. Outside such a call the hooks do nothing, so
`model.language_model` used on its own is the bare LM. transformers' `GradientCheckpointingLayer`
checkpoints `forward`, not `__call__`, so the hooks run once, outside the recomputed region; the gated blocks are
themselves `GradientCheckpointingLayer`s and get checkpointed on their own with explicit inputs.

The headless model and the model with a head
--------------------------------------------
`OpenFlamingoModel` (`AutoModel`) returns the language model's final hidden states;
`OpenFlamingoForConditionalGeneration` (`AutoModelForImageTextToText`) adds the output head, generation and the loss. The language model stays whole in
both, its head inside it: the head model runs it as it is (so logits and loss are exactly the language model's own),
the headless model runs its decoder (`language_model.base_model`). Both therefore have the same weight names, those of
every OpenFlamingo checkpoint ever saved: `vision_model.`, `perceiver.`, `language_model.` (the standalone models'
state dicts under the first and the third) and `gated_cross_attn_layers.`. The head model's `model` (named by
`base_model_prefix`: transformers' `base_model`) is an `OpenFlamingoModel` over the head model's own modules, not
registered as a child, so that nothing is saved, moved or counted twice.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    CompileConfig,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

from .configuration_openflamingo import OpenFlamingoConfig
from .modeling_mosaic_gpt import MosaicGPTForCausalLM
from .modeling_mosaic_gpt import register as _register_mosaic_gpt

# MosaicGPT (MPT-1B, the 3B releases' LM) must be buildable by AutoModelForCausalLM wherever this file is imported,
# including from a trust_remote_code folder.
_register_mosaic_gpt()

# Where to find the decoder-layer list of common architectures, tried before the generic search.
KNOWN_DECODER_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, ...
    "gpt_neox.layers",  # GPT-NeoX, RedPajama-INCITE, Pythia
    "transformer.blocks",  # MPT, MosaicGPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "model.language_model.layers",
)


# --------------------------------------------------------------------------------------------------------------------
# Perceiver resampler
# --------------------------------------------------------------------------------------------------------------------


class OpenFlamingoFeedForward(nn.Module):
    """Pre-LayerNorm MLP without biases: LayerNorm -> Linear(D, mult*D) -> GELU (exact) -> Linear(mult*D, D)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, inner_dim, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(hidden_states))))


class OpenFlamingoPerceiverAttention(nn.Module):
    """Latents attend to [media; latents]: q from the latents, k and v from their concatenation through one `to_kv`."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner_dim = num_heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self, media: torch.Tensor, latents: torch.Tensor, media_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            media: (batch * num_images, num_frames * num_patches, dim)
            latents: (batch * num_images, num_latents, dim)
            media_mask: (batch * num_images, num_frames * num_patches) bool, False for tokens of padding frames,
                which are then never attended (the latents always are, so no row is empty).
        Returns:
            (batch * num_images, num_latents, dim)
        """
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        attn_mask = None
        if media_mask is not None:
            visible = torch.cat([media_mask, media_mask.new_ones(latents.shape[:2])], dim=1)
            attn_mask = visible[:, None, None, :]
        out = F.scaled_dot_product_attention(q, self._split_heads(k), self._split_heads(v), attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class OpenFlamingoPerceiverLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.attn = OpenFlamingoPerceiverAttention(dim, num_heads, head_dim)
        self.ff = OpenFlamingoFeedForward(dim, ff_mult)

    def forward(
        self, media: torch.Tensor, latents: torch.Tensor, media_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        latents = self.attn(media, latents, media_mask) + latents
        return self.ff(latents) + latents


class OpenFlamingoPerceiverResampler(nn.Module):
    """Turns each image's patch features (all frames together) into a fixed number of latent tokens."""

    def __init__(self, config: OpenFlamingoConfig):
        super().__init__()
        dim = config.vision_hidden_size
        self.latents = nn.Parameter(torch.randn(config.perceiver_num_latents, dim))
        # Learned per-frame and per-image embeddings: optional, absent in every v2 release.
        self.frame_embs = (
            nn.Parameter(torch.randn(config.perceiver_max_num_frames, dim))
            if config.perceiver_max_num_frames
            else None
        )
        self.media_time_embs = (
            nn.Parameter(torch.randn(config.perceiver_max_num_media, 1, dim))
            if config.perceiver_max_num_media
            else None
        )
        self.layers = nn.ModuleList(
            OpenFlamingoPerceiverLayer(
                dim, config.perceiver_num_heads, config.perceiver_head_dim, config.perceiver_ff_mult
            )
            for _ in range(config.perceiver_depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            features: (batch, num_images, num_frames, num_patches, dim) patch features of the vision tower.
            frame_mask: (batch, num_images, num_frames) bool, False for padding frames (media with fewer frames than
                the batch's longest): their patches are never attended, so they change nothing.
        Returns:
            (batch, num_images, num_latents, dim)
        """
        batch_size, num_images, num_frames, num_patches, dim = features.shape
        if self.frame_embs is not None:
            if num_frames > self.frame_embs.shape[0]:
                raise ValueError(
                    f"Got media of {num_frames} frames but the Perceiver has frame embeddings for at most "
                    f"{self.frame_embs.shape[0]} (config.perceiver_max_num_frames): sample fewer frames."
                )
            features = features + self.frame_embs[:num_frames, None, :]
        features = features.reshape(batch_size, num_images, num_frames * num_patches, dim)
        if self.media_time_embs is not None:
            features = features + self.media_time_embs[:num_images]
        media = features.flatten(0, 1)
        media_mask = None
        if frame_mask is not None:
            media_mask = frame_mask[..., None].expand(-1, -1, -1, num_patches).reshape(media.shape[:2])
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents, media_mask)
        return self.norm(latents).unflatten(0, (batch_size, num_images))


# --------------------------------------------------------------------------------------------------------------------
# Gated cross-attention
# --------------------------------------------------------------------------------------------------------------------


class OpenFlamingoCrossAttention(nn.Module):
    """Text tokens (queries) attend to image latents (keys/values): the images a media mask allows, or (immediate
    media) each token its own image, read per image run or, when decoding, as that image alone."""

    def __init__(self, dim: int, vision_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner_dim = num_heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(vision_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def project_media(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Keys and values of all latents of all images of each sample, computed once per sequence and reused at every
        decoding step.

        Args:
            media: (batch, num_images, num_latents, vision_dim)
        Returns:
            key, value: each (batch, num_heads, num_images * num_latents, head_dim)
        """
        # The LayerNorm's dtype is the compute dtype: a quantized `to_kv` may store its weight as int8.
        media = media.flatten(1, 2).to(self.norm.weight.dtype)
        key, value = self.to_kv(media).chunk(2, dim=-1)
        split = lambda x: x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # noqa: E731
        return split(key), split(value)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        has_media: torch.Tensor,
        image_runs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: (batch, seq_len, dim)
            key, value: (batch, num_heads, num_images * num_latents, head_dim) from `project_media`, or the latents of
                one image per row, (batch, num_heads, num_latents, head_dim), which every token of that row attends.
            attn_mask: (batch, 1, seq_len, num_images * num_latents) bool, True where a token may attend; `None` with
                one image per row or with `image_runs`. Rows of tokens that see no image are all True (any finite
                values will do: they are zeroed below), so the softmax never sees an all-masked row and cannot
                produce NaN.
            has_media: (batch, seq_len, 1) bool, False for tokens that see no image.
            image_runs: (batch, num_images, run_len) with immediate media: the positions of the tokens that attend
                image j (one contiguous run), `seq_len` past a run's end; each run then attends its image's latents
                alone instead of all images under a mask.
        Returns:
            (batch, seq_len, dim); exactly zero at tokens that see no image.
        """
        query = self.to_q(self.norm(hidden_states))
        query = query.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        if image_runs is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        else:
            out = self._attend_by_image(query, key, value, image_runs)
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return torch.where(has_media, out, torch.zeros((), dtype=out.dtype, device=out.device))

    @staticmethod
    def _attend_by_image(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image_runs: torch.Tensor
    ) -> torch.Tensor:
        """
        Each image's run of tokens attends that image's latents: (batch * num_images) attentions of run_len queries
        over num_latents keys, instead of seq_len queries over num_images * num_latents keys under a mask.

        Args:
            query: (batch, heads, seq_len, head_dim); key, value: (batch, heads, num_images * num_latents, head_dim)
            image_runs: (batch, num_images, run_len) token positions, `seq_len` for padding
        Returns:
            (batch, heads, seq_len, head_dim); zero at tokens in no run
        """
        batch, heads, seq_len, head_dim = query.shape
        num_images, run_len = image_runs.shape[1:]
        # Index views broadcast over heads and head_dim (expand allocates nothing).
        spread = lambda index: index.flatten(1)[:, None, :, None].expand(-1, heads, -1, head_dim)  # noqa: E731
        runs = query.gather(2, spread(image_runs.clamp(max=seq_len - 1))).unflatten(2, (num_images, run_len))
        # (batch, heads, images, len, head_dim) -> (batch * images, heads, len, head_dim)
        by_image = lambda x: x.transpose(1, 2).flatten(0, 1)  # noqa: E731
        split = lambda x: by_image(x.unflatten(2, (num_images, -1)))  # noqa: E731
        out = F.scaled_dot_product_attention(by_image(runs), split(key), split(value))
        out = out.unflatten(0, (batch, num_images)).transpose(1, 2).flatten(2, 3)
        # Padding entries land in one extra slot past the sequence, which is dropped.
        full = out.new_zeros(batch, heads, seq_len + 1, head_dim).scatter(2, spread(image_runs), out)
        return full[:, :, :seq_len]


class GatedCrossAttentionBlock(GradientCheckpointingLayer):
    """
    `x = x + tanh(attn_gate) * xattn(x, media); x = x + tanh(ff_gate) * ff(x)`.

    Both gates start at zero, so a freshly built model computes exactly what its language model computes. Only the
    attention half is masked by the media positions: the feed-forward half applies to every token.
    """

    def __init__(self, config: OpenFlamingoConfig, dim: int):
        super().__init__()
        self.attn = OpenFlamingoCrossAttention(
            dim, config.vision_hidden_size, config.cross_attn_num_heads, config.cross_attn_head_dim
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = OpenFlamingoFeedForward(dim, config.cross_attn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        has_media: torch.Tensor | None = None,
        image_runs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: (batch, seq_len, dim) input of the decoder layer this block precedes.
            key, value, attn_mask, has_media, image_runs: see `OpenFlamingoCrossAttention.forward`; `None` when the
                input has no image at all (then the attention half contributes nothing).
        Returns:
            (batch, seq_len, dim)
        """
        if key is not None:
            attn_out = self.attn(hidden_states, key, value, attn_mask, has_media, image_runs)
            hidden_states = hidden_states + self.attn_gate.tanh() * attn_out
        return hidden_states + self.ff_gate.tanh() * self.ff(hidden_states)


# --------------------------------------------------------------------------------------------------------------------
# Conditioning of one forward call
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class OpenFlamingoMediaCache:
    """
    What the gated blocks need about the images of a batch, computed once (at prefill) and reused at every decoding
    step: each block's cross-attention keys/values and which image slots hold a real image.

    Attributes:
        key_values: layer index (str) -> (key, value), each (batch, num_heads, num_images * num_latents, head_dim).
        image_mask: (batch, num_images) bool, False for padding slots of rows that have fewer images.
        num_latents: latents per image.
    """

    key_values: dict[str, tuple[torch.Tensor, torch.Tensor]]
    image_mask: torch.Tensor
    num_latents: int


# The keyword argument that carries `_CrossAttentionInputs` through the language model to its decoder layers.
CROSS_ATTENTION_KWARG = "openflamingo_cross_attention"


@dataclass
class _CrossAttentionInputs:
    """
    Per-call inputs of the gated blocks. `forward` passes them to the language model as the keyword argument
    `CROSS_ATTENTION_KWARG`, which transformers models hand on to every decoder layer, where the pre-hook takes it
    out again (the layer never sees it). That route is traceable by `torch.compile`. For language models that do not
    pass keyword arguments on to their layers (transformers' MPT, Bloom, Falcon), eager calls also publish the
    inputs through `_CROSS_ATTENTION_INPUTS`, a `ContextVar`, which dynamo cannot trace.
    """

    blocks: nn.ModuleDict
    media_cache: OpenFlamingoMediaCache | None
    attn_mask: torch.Tensor | None  # (batch, 1, seq_len, num_images * num_latents); None with `image_index`
    has_media: torch.Tensor | None  # (batch, seq_len, 1)
    # (batch,) 0-based image the single new token of each row attends to, when it attends to that image only
    # (immediate media, one token per step: decoding). Then each block reads that image's latents alone instead of
    # masking all of them, so decoding after a 32-shot prompt costs what it costs after a 1-shot one.
    image_index: torch.Tensor | None = None
    # (batch, num_images, run_len) with immediate media over many tokens (training, prefill): the positions of each
    # image's tokens, which attend that image alone (`OpenFlamingoCrossAttention._attend_by_image`); None otherwise.
    image_runs: torch.Tensor | None = None
    blocks_run: int = 0  # gated blocks run so far in this call

    def key_value(self, layer_key: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The keys/values block `layer_key` attends to.

        Returns:
            key, value: each (batch, num_heads, num_images * num_latents, head_dim), or (batch, num_heads,
                num_latents, head_dim) with `image_index`.
        """
        key, value = self.media_cache.key_values[layer_key]
        if self.image_index is not None:
            rows = torch.arange(key.shape[0], device=key.device)
            index = self.image_index.to(key.device)
            # (batch, heads, images, latents, head_dim)[rows, :, index] -> (batch, heads, latents, head_dim)
            split = lambda x: x.unflatten(2, (-1, self.media_cache.num_latents))[rows, :, index]  # noqa: E731
            key, value = split(key), split(value)
        return key.to(device), value.to(device)


_CROSS_ATTENTION_INPUTS: contextvars.ContextVar[_CrossAttentionInputs | None] = contextvars.ContextVar(
    "openflamingo_cross_attention_inputs", default=None
)


def _gated_cross_attention_pre_hook(layer_key: str, module: nn.Module, args: tuple, kwargs: dict):
    """
    Forward pre-hook of every decoder layer: takes the OpenFlamingo inputs out of the layer's keyword arguments and,
    if a gated block precedes this layer, runs it on the layer's input hidden states.
    """
    inputs = kwargs.pop(CROSS_ATTENTION_KWARG, None)
    if inputs is None and not torch.compiler.is_compiling():
        inputs = _CROSS_ATTENTION_INPUTS.get()
    if inputs is None or layer_key not in inputs.blocks:
        return args, kwargs  # the language model is being used on its own, or no block precedes this layer
    block = inputs.blocks[layer_key]
    inputs.blocks_run += 1
    hidden_states = args[0] if args else kwargs["hidden_states"]
    device = block.ff_gate.device  # with device_map="auto" a block may live elsewhere than its decoder layer
    key = value = attn_mask = has_media = image_runs = None
    if inputs.media_cache is not None:
        key, value = inputs.key_value(layer_key, device)
        has_media = inputs.has_media.to(device)
        attn_mask = inputs.attn_mask.to(device) if inputs.attn_mask is not None else None
        image_runs = inputs.image_runs.to(device) if inputs.image_runs is not None else None
    out = block(hidden_states.to(device), key, value, attn_mask, has_media, image_runs).to(hidden_states.device)
    if args:
        return (out, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": out}


def find_decoder_layers(language_model: nn.Module, attr_name: str | None = None) -> tuple[str, nn.ModuleList]:
    """
    Locates the decoder-layer list of a causal LM.

    Args:
        language_model: the causal LM.
        attr_name: dotted path of the list (e.g. `"model.layers"`); found automatically when `None`.
    Returns:
        (dotted path, the `nn.ModuleList`)
    """
    if attr_name is not None:
        try:
            layers = language_model.get_submodule(attr_name)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"decoder_layers_attr_name={attr_name!r} does not name an nn.ModuleList in "
                f"{type(language_model).__name__}. Give the dotted path of its decoder-layer list, e.g. 'model.layers'."
            )
        return attr_name, layers

    num_layers = getattr(language_model.config, "num_hidden_layers", None)
    for path in KNOWN_DECODER_LAYER_PATHS:
        try:
            layers = language_model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and (num_layers is None or len(layers) == num_layers):
            return path, layers

    # Unknown architecture: the decoder layers are the one ModuleList of num_hidden_layers modules of a single class.
    candidates = [
        (name, module)
        for name, module in language_model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (num_layers is None or len(module) == num_layers)
        and len({type(m) for m in module}) == 1
    ]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(name for name, _ in candidates) or "none"
    raise ValueError(
        f"Could not find the decoder-layer list of {type(language_model).__name__} (num_hidden_layers={num_layers}; "
        f"candidate nn.ModuleLists: {found}). Pass `decoder_layers_attr_name` (e.g. 'model.layers') in the "
        "OpenFlamingoConfig or to from_backbones()."
    )


@functools.lru_cache(maxsize=None)
def _forward_parameters(module_type: type) -> frozenset[str]:
    parameters = inspect.signature(module_type.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return frozenset({"*"})
    return frozenset(parameters)


# --------------------------------------------------------------------------------------------------------------------
# Generation settings
# --------------------------------------------------------------------------------------------------------------------


def openflamingo_generation_config(
    config: OpenFlamingoConfig, generation_config: GenerationConfig | None = None
) -> GenerationConfig:
    """
    OpenFlamingo's generation settings: stop at `<|endofchunk|>` (`config.eoc_token_id`, the end of an answer), pad
    with the language model's pad token, and decode from the cache. The one place that sets them: the model applies
    it to the generation config it derives from its config (at construction and when a folder has no
    `generation_config.json`), and the converter and the Hub export save what the model then holds.

    Args:
        config: the model config; ids that are `None` are left as they are.
        generation_config: settings to start from (copied, never changed); default: derived from `config` as
            transformers does.
    Returns:
        A new `GenerationConfig`.
    """
    if generation_config is None:
        generation_config = GenerationConfig.from_model_config(config)
    generation_config = copy.deepcopy(generation_config)
    text_config = config.get_text_config()
    if config.eoc_token_id is not None:
        generation_config.eos_token_id = config.eoc_token_id
    if getattr(text_config, "pad_token_id", None) is not None:
        generation_config.pad_token_id = text_config.pad_token_id
    # Decode from the cache (and the gated blocks' image keys/values computed once): some LM configs default to
    # `use_cache=False` (transformers' MptConfig, and MPT checkpoints' generation configs), which would recompute the
    # whole sequence at every step.
    generation_config.use_cache = True
    # No longer "derived from the model config" (a marker saved into generation_config.json): loading such a file
    # would apply these settings again, over the user's.
    generation_config._from_model_config = None
    generation_config._original_object_hash = hash(generation_config)
    return generation_config


def decode_compile_config(device: str | torch.device) -> CompileConfig:
    """
    How `generate(cache_implementation="static", compile_config=...)` should compile the decode step on `device`:
    one graph (`fullgraph=True`, which the model supports when its LM does), with the per-step overhead removed: on
    a GPU by CUDA graphs ("reduce-overhead"), on CPU by inductor's C++ wrapper (`cpp_wrapper`: no Python input
    checks and views per call; a tiny model's compiled step is then ~1.5x faster again). transformers compiles on CPU
    only when asked, so the config says so.

    Example:
        model.generate(**inputs, cache_implementation="static", compile_config=decode_compile_config(model.device))
    """
    if torch.device(device).type == "cuda":
        config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    else:  # torch.compile takes a mode or options, not both
        config = CompileConfig(fullgraph=True, mode=None, options={"cpp_wrapper": True})
        config._compile_all_devices = True
    return config


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class OpenFlamingoModelOutputWithPast(ModelOutput):
    """
    Output of [`OpenFlamingoModel`]: the language model's final hidden states, conditioned on the images.

    Args:
        last_hidden_state: (batch, seq_len, hidden_size) output of the language model's decoder (last layer and final
            norm): the input of its output head.
        cache: the language model's KV cache.
        hidden_states, attentions: as returned by the language model's decoder.
        image_hidden_states: (batch, num_images, num_latents, vision_dim) Perceiver outputs, when images were encoded
            in this call; pass them back as `image_features` to skip the vision tower.
        image_outputs: the vision tower's output for the images encoded in this call (see `get_image_features` with
            `return_dict=True`): `pooler_output` is `image_hidden_states`.
        media_cache: the gated blocks' image keys/values, to pass back (with `media_index`) when decoding further.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    media_cache: OpenFlamingoMediaCache | None = None


@dataclass
class OpenFlamingoCausalLMOutputWithPast(ModelOutput):
    """
    Args:
        loss: (1,) shifted next-token cross-entropy (labels of -100 ignored), when `labels` is given.
        logits: (batch, seq_len, vocab_size); with `loss_logits_only`, (1, num_labeled, vocab_size): the positions
            whose next token carries a label, row by row.
        cache: the language model's KV cache.
        hidden_states, attentions: as returned by the language model.
        image_hidden_states: (batch, num_images, num_latents, vision_dim) Perceiver outputs, when images were
            encoded in this call; pass them back as `image_features` to skip the vision tower.
        image_outputs: the vision tower's output for the images encoded in this call (see `get_image_features` with
            `return_dict=True`): `pooler_output` is `image_hidden_states`.
        media_cache: the gated blocks' image keys/values, to pass back (with `media_index`) when decoding further.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    media_cache: OpenFlamingoMediaCache | None = None


@dataclass
class _Conditioning:
    """What `OpenFlamingoModel._condition` prepares for one language-model call."""

    cross_attention: _CrossAttentionInputs
    media_cache: OpenFlamingoMediaCache | None
    image_hidden_states: torch.Tensor | None  # (batch, num_images, num_latents, vision_dim), when encoded in this call
    image_outputs: BaseModelOutputWithPooling | None  # the vision tower's output, when pixel_values were encoded


class OpenFlamingoPreTrainedModel(PreTrainedModel):
    config: OpenFlamingoConfig
    config_class = OpenFlamingoConfig
    # `OpenFlamingoForConditionalGeneration.model` is its headless `OpenFlamingoModel` (transformers' `base_model`).
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["GatedCrossAttentionBlock", "OpenFlamingoPerceiverLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Everything OpenFlamingo adds traces into one graph; an instance whose language model does not is marked
    # `False` in `__init__` (transformers' MPT, Bloom, Falcon: they do not hand keyword arguments to their layers).
    _can_compile_fullgraph = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from this file's source (attention classes that do not dispatch through its
        # `AttentionInterface`) that the implementation cannot be switched, and then leaves the top-level config on
        # the old one while switching the backbones'. The Perceiver's and gated blocks' attention does not depend on
        # the implementation (always SDPA, with their own masks); the backbones', which does, is switched by
        # transformers on each backbone. So every level of the config takes the new implementation.
        return True

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, strict: bool | None = None, **kwargs
    ):
        """
        `PreTrainedModel.from_pretrained`, but strict: a checkpoint whose weights do not fit the config raises
        instead of loading with freshly initialised (or dropped) weights and a report line. The usual cause is an
        architecture override (e.g. another `cross_attn_every_n_layers`) that moves the trained gated blocks.

        Args:
            strict: `True` raises on missing or unexpected weights; `False` restores transformers' behaviour (missing
                weights initialised as their module's own class initialises them, unexpected ones dropped, both
                reported), e.g. to add frame embeddings to a trained model before training them. Default: strict,
                unless `output_loading_info=True` asks for the report, which is then returned for the caller to
                judge (transformers' contract for that argument).
            *model_args, **kwargs: as for `PreTrainedModel.from_pretrained`.
        """
        wants_loading_info = kwargs.pop("output_loading_info", False)
        if strict is None:
            strict = not wants_loading_info
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            raise _unreadable_weights_error(pretrained_model_name_or_path, error) from error
        if strict:
            _check_loading_info(pretrained_model_name_or_path, loading_info)
        return (model, loading_info) if wants_loading_info else model

    @torch.no_grad()
    @init.guard_torch_init_functions()
    def initialize_weights(self):
        """
        transformers' `initialize_weights` (each sub-model's modules by that sub-model's own `_init_weights`), except
        that each sub-model is treated as custom code or not by its own class rather than by this one. transformers
        skips every parameter-less module of a custom-code model (e.g. `CLIPAttention`, whose `_init_weights` sets
        its projections' std), so a vision tower built here would get the generic std-0.02 init for weights a
        checkpoint lacks (`strict=False`) instead of the one `CLIPVisionModel` gives them.
        """

        def apply(module: nn.Module, initialize, is_custom_code: bool) -> None:
            for child in module.children():
                if isinstance(child, PreTrainedModel):
                    apply(child, child._initialize_weights, child.is_custom_code())
                else:
                    apply(child, initialize, is_custom_code)
            initialize(module, is_custom_code)

        apply(self, self._initialize_weights, self.is_custom_code())

    def _init_weights(self, module: nn.Module):
        # Modules of the backbones never get here: `initialize_weights` hands every sub-model (the vision tower, the
        # language model) to that model's own `_init_weights`.
        super()._init_weights(module)
        if isinstance(module, GatedCrossAttentionBlock):
            # Zero gates: an untrained model equals its language model exactly.
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)
        elif isinstance(module, OpenFlamingoPerceiverResampler):
            # `transformers.initialization` leaves weights that were loaded from a checkpoint alone.
            init.normal_(module.latents)
            for embedding in (module.frame_embs, module.media_time_embs):
                if embedding is not None:
                    init.normal_(embedding)


class OpenFlamingoModel(OpenFlamingoPreTrainedModel):
    """
    The headless OpenFlamingo: `vision_model` (any `AutoModel` vision tower), `perceiver` (Perceiver resampler),
    `language_model` (any `AutoModelForCausalLM`) and `gated_cross_attn_layers` (a `GatedCrossAttentionBlock` before
    every N-th decoder layer, keyed by that layer's index). Its forward returns the language model's final hidden
    states (`last_hidden_state`), the input of the output head, conditioned on the images.

    The language model is kept whole, its output head included, although this forward does not apply the head: its
    state dict stays exactly that of the standalone model, so base weights, PEFT target names and every saved
    OpenFlamingo checkpoint load as they are, into this model (`AutoModel`) and into
    `OpenFlamingoForConditionalGeneration` (`AutoModelForImageTextToText`) alike: both have the same weight names.

    Images come as `pixel_values` of shape (batch, num_images, num_frames, 3, H, W) (5-D is read as one frame); each
    `<image>` token in `input_ids` marks where the next image of its row goes. Rows with fewer `<image>` tokens than
    `num_images` treat the remaining slots as padding.
    """

    def __init__(
        self,
        config: OpenFlamingoConfig,
        vision_model: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        # A given backbone's own config becomes the sub-config, so that the config describes the module it holds
        # (and saves what it holds), with no second copy to drift apart.
        for key, backbone in (("vision_config", vision_model), ("text_config", language_model)):
            if backbone is not None:
                _check_backbone_config(key, getattr(config, key), backbone.config)
                setattr(config, key, backbone.config)
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.perceiver = OpenFlamingoPerceiverResampler(config)
        self.language_model = language_model if language_model is not None else _build_language_model(config)
        _, decoder_layers = find_decoder_layers(self.language_model, config.decoder_layers_attr_name)
        text_dim = config.get_text_config().hidden_size
        self.gated_cross_attn_layers = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(config, text_dim)
                for i in config.cross_attn_layer_indices(len(decoder_layers))
            }
        )
        # Every layer gets the hook, also those without a block: it removes OpenFlamingo's keyword argument, which
        # a layer's attention implementation might not accept.
        for index, layer in enumerate(decoder_layers):
            layer.register_forward_pre_hook(
                functools.partial(_gated_cross_attention_pre_hook, str(index)), with_kwargs=True
            )
        # What the language model's forward and its decoder's accept, looked up once (not inside a traced forward).
        self._language_model_parameters = _forward_parameters(type(self.language_model))
        self._decoder_parameters = _forward_parameters(type(self.language_model.base_model))
        # Compilable with fullgraph=True exactly when its language model is: the rest traces without graph breaks.
        if not getattr(self.language_model, "_can_compile_fullgraph", False):
            self._can_compile_fullgraph = False
        self.post_init()

    @classmethod
    def _over_modules_of(cls, owner: "OpenFlamingoModel") -> "OpenFlamingoModel":
        """
        A headless model whose modules are `owner`'s own: the same dict of named children (not copies, not
        registered a second time), so its weights, their names and every later change to `owner`'s modules (a PEFT
        adapter, a wrapper put in place of a child) are `owner`'s. It has its own class, forward and hooks.
        """
        model = cls.__new__(cls)
        OpenFlamingoPreTrainedModel.__init__(model, owner.config)
        model._modules = owner._modules
        for name in ("_language_model_parameters", "_decoder_parameters", "_can_compile_fullgraph"):
            if name in owner.__dict__:
                model.__dict__[name] = owner.__dict__[name]
        model.post_init()  # gathers the children's tied keys and plans; their weights are initialised already
        model.train(owner.training)
        return model

    # ---------------------------------------------------------------- embeddings, delegated to the language model
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        # The language model's output head is part of this model although its forward does not apply it, so that
        # resizing the vocabulary resizes the head too: the weights stay those of the whole language model.
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # ---------------------------------------------------------------- images
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _check_is_tensor("pixel_values", pixel_values)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
            raise ValueError(
                "pixel_values contain NaN or infinite values, which would make every output NaN. Check how the images "
                "were read and preprocessed (OpenFlamingoProcessor refuses such images)."
            )
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(2)
        channels = getattr(self.config.vision_config, "num_channels", 3)
        if pixel_values.ndim != 6 or pixel_values.shape[3] != channels:
            raise ValueError(
                "pixel_values must have shape (batch, num_images, num_frames, "
                f"{channels}, height, width) or (batch, num_images, {channels}, height, width); got "
                f"{tuple(pixel_values.shape)}. Use OpenFlamingoProcessor to prepare images, or add the missing axes "
                "(e.g. pixel_values[:, None, None] for one image per sample)."
            )
        return pixel_values

    @staticmethod
    def _check_frame_mask(frame_mask: torch.Tensor | None, pixel_values: torch.Tensor) -> torch.Tensor | None:
        if frame_mask is None:
            return None
        _check_is_tensor("frame_mask", frame_mask)
        if tuple(frame_mask.shape) != tuple(pixel_values.shape[:3]):
            raise ValueError(
                f"frame_mask must have shape (batch, num_images, num_frames) = {tuple(pixel_values.shape[:3])}, the "
                f"first axes of pixel_values; got {tuple(frame_mask.shape)}."
            )
        return frame_mask.to(device=pixel_values.device, dtype=torch.bool)

    def _check_image_features(self, image_features: torch.Tensor, batch_size: int) -> None:
        _check_is_tensor("image_features", image_features)
        expected = f"(batch={batch_size}, num_images, num_latents, {self.config.vision_hidden_size})"
        if image_features.ndim != 4 or image_features.shape[-1] != self.config.vision_hidden_size:
            raise ValueError(
                f"image_features must have shape {expected} (the Perceiver output, `outputs.image_hidden_states`); "
                f"got {tuple(image_features.shape)}."
            )
        if image_features.shape[0] != batch_size:
            raise ValueError(
                f"Images are given for {image_features.shape[0]} samples but the text has {batch_size}: give one list "
                f"of images per sample (image_features must be {expected})."
            )

    def _check_text_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.LongTensor | None,
        past_length: int,
    ) -> None:
        """Shapes and ranges of the text inputs, checked here so that a mistake gets a message rather than an
        `IndexError` from inside the language model (or, worse, a silently wrong result)."""
        for name, value in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                            ("attention_mask", attention_mask), ("labels", labels)):
            _check_is_tensor(name, value)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must have shape (batch, seq_len); got {tuple(input_ids.shape)}. For one sequence use "
                "input_ids[None]."
            )
        if inputs_embeds is not None and inputs_embeds.ndim != 3:
            raise ValueError(f"inputs_embeds must have shape (batch, seq_len, dim); got {tuple(inputs_embeds.shape)}.")
        batch_size, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if batch_size == 0 or seq_len == 0:
            raise ValueError(
                f"The batch is empty: input_ids has shape {(batch_size, seq_len)}. Give at least one sample with at "
                "least one token."
            )
        if input_ids is not None and past_length == 0 and not torch.compiler.is_compiling():
            self._check_token_range(input_ids)
        if attention_mask is not None and attention_mask.ndim == 2:
            expected = (batch_size, past_length + seq_len)
            if tuple(attention_mask.shape) != expected:
                cached = f" ({past_length} cached + {seq_len} new tokens)" if past_length else ""
                raise ValueError(
                    f"attention_mask must have shape (batch, cached + new tokens) = {expected}{cached}; got "
                    f"{tuple(attention_mask.shape)}. Pass the mask that belongs to input_ids (the processor returns "
                    "both)."
                )
        if labels is not None and tuple(labels.shape) != (batch_size, seq_len):
            raise ValueError(
                f"labels must have the shape of input_ids, {(batch_size, seq_len)}; got {tuple(labels.shape)}. "
                "Label each input position (-100 where no loss is wanted); the model shifts them itself."
            )
        self._check_sequence_length(past_length + seq_len)

    def _check_token_range(self, input_ids: torch.LongTensor) -> None:
        vocab_size = self.get_input_embeddings().num_embeddings
        low, high = input_ids.min(), input_ids.max()
        if bool((low < 0) | (high >= vocab_size)):
            bad = int(low) if int(low) < 0 else int(high)
            raise ValueError(
                f"input_ids hold token id {bad}, outside the language model's vocabulary [0, {vocab_size}). Use the "
                "model's own tokenizer (its OpenFlamingoProcessor); after adding tokens to it, call "
                "`model.resize_token_embeddings(len(tokenizer))`."
            )

    def _check_sequence_length(self, length: int) -> None:
        """Beyond its position limit an LM with learned positions (or MPT's fixed ALiBi table) indexes out of range:
        refuse; one with relative positions (RoPE, MosaicGPT's ALiBi) runs on, degraded: warn as generate does."""
        limit = self.config.max_position_embeddings
        if limit is None or length <= limit:
            return
        message = (
            f"The sequence is {length} tokens long (cached tokens included) but the language model "
            f"({self.config.get_text_config().model_type}) was built for at most {limit} positions."
        )
        if _has_fixed_position_table(self.language_model):
            raise ValueError(message + " Shorten the prompt (fewer demonstrations) or lower max_new_tokens.")
        # Once per model type and limit, not once per length (which would warn at every decoding step).
        logger.warning_once(
            f"A sequence is longer than the language model ({self.config.get_text_config().model_type}) was built "
            f"for (at most {limit} positions). Its outputs beyond that are unreliable."
        )

    def get_vision_features(self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        The vision tower's patch features of every frame: last-layer patch tokens, without the final post-layernorm,
        CLS dropped (as the original OpenFlamingo feeds its Perceiver), the Perceiver's input.

        Args:
            pixel_values: (batch, num_images, num_frames, 3, H, W), or 5-D for one frame.
            frame_mask: (batch, num_images, num_frames) bool, False for padding frames. Those are not encoded (a clip
                next to a 4-image document would otherwise cost the tower 16 frames a sample): their features are
                zeros, which the Perceiver never attends.
        Returns:
            (batch, num_images, num_frames, num_patches, vision_dim)
        """
        pixel_values = self._check_pixel_values(pixel_values)
        return self._encode_frames(pixel_values, self._check_frame_mask(frame_mask, pixel_values))[0]

    def _encode_frames(
        self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None, **tower_kwargs
    ) -> tuple[torch.Tensor, ModelOutput]:
        """
        `get_vision_features` on checked inputs (6-D pixel values, a bool frame mask of their first axes).

        Returns:
            features: (batch, num_images, num_frames, num_patches, vision_dim)
            tower_outputs: the vision tower's own output for the frames it encoded (padding frames are not).
        """
        flat = pixel_values.flatten(0, 2).to(self.vision_model.dtype)
        real = None
        if frame_mask is not None and not torch.compiler.is_compiling():
            real = frame_mask.flatten()
            if bool(real.all()) or not bool(real.any()):
                real = None
        # A frozen tower keeps no activations for backward.
        vision_trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(vision_trainable):
            tower_outputs = self.vision_model(
                pixel_values=flat if real is None else flat[real], return_dict=True, **tower_kwargs
            )
        features = tower_outputs.last_hidden_state
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        if real is not None:
            features = features.new_zeros((flat.shape[0], *features.shape[1:])).index_put((real,), features)
        return features.unflatten(0, pixel_values.shape[:3]), tower_outputs

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> torch.Tensor | BaseModelOutputWithPooling:
        """
        Vision tower (`get_vision_features`) and Perceiver.

        Args:
            pixel_values: (batch, num_images, num_frames, 3, H, W), or 5-D for one frame.
            frame_mask: (batch, num_images, num_frames) bool, False for padding frames (the processor's
                `frame_mask` for batches that mix videos of different lengths and images); default: all frames real.
            return_dict: `True` returns transformers' `BaseModelOutputWithPooling`: the vision tower's own output
                (`last_hidden_state`, and `hidden_states` / `attentions` when asked for, over the frames it encoded,
                flattened to (batch * num_images * num_frames, ...) without padding frames) with `pooler_output` set
                to the Perceiver's latents, the features the gated blocks read. Default: the latents alone.
            output_hidden_states, output_attentions: passed to the vision tower.
        Returns:
            (batch, num_images, num_latents, vision_dim), or a `BaseModelOutputWithPooling` whose `pooler_output` is
            that tensor.
        """
        pixel_values = self._check_pixel_values(pixel_values)
        frame_mask = self._check_frame_mask(frame_mask, pixel_values)
        asked = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        tower_kwargs = {name: value for name, value in asked.items() if value is not None}
        features, tower_outputs = self._encode_frames(pixel_values, frame_mask, **tower_kwargs, **kwargs)
        latents = self.perceiver(features.to(self.perceiver.latents.dtype), frame_mask)
        if not return_dict:
            return latents
        return BaseModelOutputWithPooling(
            last_hidden_state=tower_outputs.last_hidden_state,
            pooler_output=latents,
            hidden_states=tower_outputs.get("hidden_states"),
            attentions=tower_outputs.get("attentions"),
        )

    def get_media_index(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """
        For each token, the 1-based number of the image it attends to: the count of `<image>` tokens at or before it
        (0 before the first image).

        Args:
            input_ids: (batch, seq_len) the whole sequence so far.
        Returns:
            (batch, seq_len)
        """
        if self.config.media_token_id is None:
            raise ValueError(
                "config.media_token_id is not set, so <image> positions cannot be found. Set it to the id of the "
                "<image> token (OpenFlamingoProcessor.image_token_id)."
            )
        return (input_ids == self.config.media_token_id).cumsum(dim=-1)

    def _media_index_of_embeddings(self, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """
        `get_media_index` for a sequence given as embeddings: an `<image>` token is an embedding equal to the
        `<image>` row of the input embeddings (how transformers' vision-language models find their image
        placeholders), so callers that work on embeddings (PEFT prompt tuning, ...) place images as with ids.

        Args:
            inputs_embeds: (batch, seq_len, dim) the whole sequence so far.
        Returns:
            (batch, seq_len)
        """
        media_token = torch.tensor(self.config.media_token_id, device=self.get_input_embeddings().weight.device)
        media_embedding = self.get_input_embeddings()(media_token).to(inputs_embeds.device, inputs_embeds.dtype)
        return (inputs_embeds == media_embedding).all(dim=-1).long().cumsum(dim=-1)

    def get_image_mask(
        self, input_ids: torch.LongTensor, num_images: int, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Which image slots of each row hold a real image, checked against the `<image>` tokens of the prompt.

        Without `image_mask`, row b uses the first k_b slots, k_b being its number of `<image>` tokens; the other slots
        are padding. With `image_mask`, each row's `<image>` count must equal its number of real images.

        Args:
            input_ids: (batch, seq_len) the whole sequence so far.
            num_images: image slots per row.
            image_mask: (batch, num_images) bool, optional.
        Returns:
            (batch, num_images) bool
        """
        counts = (input_ids == self.config.media_token_id).sum(dim=-1)
        return self._image_mask_for_counts(counts, num_images, image_mask)

    def _image_mask_for_counts(
        self, counts: torch.LongTensor, num_images: int, image_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """
        `get_image_mask` from each row's number of `<image>` tokens in the whole sequence (`counts`, (batch,)).
        The checks read tensor values (host syncs), so a compiled call skips them: the eager prompt call, or
        `generate()`, checks the same inputs.
        """
        if image_mask is not None:
            image_mask = image_mask.to(device=counts.device, dtype=torch.bool)
            if image_mask.shape != (counts.shape[0], num_images):
                raise ValueError(
                    f"image_mask must have shape (batch, num_images) = {(counts.shape[0], num_images)}; got "
                    f"{tuple(image_mask.shape)}."
                )
        if not torch.compiler.is_compiling():
            self._check_image_counts(counts, num_images, image_mask)
        if image_mask is None:
            image_mask = torch.arange(num_images, device=counts.device)[None, :] < counts[:, None]
        return image_mask

    @staticmethod
    def _check_image_counts(counts: torch.LongTensor, num_images: int, image_mask: torch.Tensor | None) -> None:
        given = image_mask.sum(dim=-1) if image_mask is not None else torch.full_like(counts, num_images)
        bad = (counts > given).any() if image_mask is None else (counts != given).any()
        if image_mask is None:
            bad = bad | (counts.max() < num_images)  # some image slot that no row uses
        # One host sync for the common (valid) case; the messages are built only for a bad input.
        if not bool(bad):
            return
        for row in range(counts.shape[0]):
            n_tokens, n_images = int(counts[row]), int(given[row])
            if n_tokens > n_images:
                raise ValueError(
                    f"Sample {row} has {n_tokens} <image> tokens but only {n_images} images were given. Give one "
                    "image per <image> token (pad rows with fewer images), or remove the extra tokens."
                )
            if n_tokens < n_images and image_mask is not None:
                raise ValueError(
                    f"Sample {row} has {n_images} images but only {n_tokens} <image> tokens. Put one <image> "
                    "token where each image belongs."
                )
        raise ValueError(
            f"{num_images} images were given per sample but no sample has more than {int(counts.max())} "
            "<image> tokens, so some images would never be seen. Put one <image> token where each image "
            "belongs (OpenFlamingoProcessor does this)."
        )

    def build_media_cache(self, image_features: torch.Tensor, image_mask: torch.Tensor) -> OpenFlamingoMediaCache:
        """
        Each gated block's keys/values over all latents of all images of each sample.

        Args:
            image_features: (batch, num_images, num_latents, vision_dim) from `get_image_features`.
            image_mask: (batch, num_images) bool, from `get_image_mask`.
        """
        key_values = {
            layer_key: block.attn.project_media(image_features.to(block.ff_gate.device))
            for layer_key, block in self.gated_cross_attn_layers.items()
        }
        return OpenFlamingoMediaCache(key_values, image_mask, num_latents=image_features.shape[2])

    def _cross_attention_mask(
        self, media_index: torch.LongTensor, media_cache: OpenFlamingoMediaCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            media_index: (batch, seq_len) 1-based image number each token attends to (see `get_media_index`).
        Returns:
            attn_mask: (batch, 1, seq_len, num_images * num_latents) bool
            has_media: (batch, seq_len, 1) bool
        """
        image_mask = media_cache.image_mask.to(media_index.device)
        num_images = image_mask.shape[1]
        key_image = torch.arange(1, num_images + 1, device=media_index.device)  # 1-based, like media_index
        if self.config.only_attend_immediate_media:
            visible = key_image[None, None, :] == media_index[:, :, None]
        else:
            visible = key_image[None, None, :] <= media_index[:, :, None]
        # Padding slots are never attended, not even by an <image> token generated beyond the images given.
        visible = visible & image_mask[:, None, :]
        has_media = visible.any(dim=-1, keepdim=True)
        visible = visible.repeat_interleave(media_cache.num_latents, dim=-1)
        attn_mask = visible | ~has_media
        return attn_mask[:, None], has_media

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        image_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        media_index: torch.LongTensor | None = None,
        media_cache: OpenFlamingoMediaCache | None = None,
        frame_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> OpenFlamingoModelOutputWithPast:
        r"""
        The language model's decoder (its output head left out) with the gated blocks attending to the images.

        Args:
            input_ids: (batch, seq_len) token ids; `<image>` tokens mark where images go.
            pixel_values: (batch, num_images, num_frames, 3, H, W) or (batch, num_images, 3, H, W).
            attention_mask: (batch, cached + seq_len) 1 for real tokens, 0 for padding.
            position_ids, cache, use_cache: as for the language model (`past_key_values` is read as `cache`).
            inputs_embeds: (batch, seq_len, dim) instead of `input_ids`; `<image>` tokens are the embeddings equal to
                the `<image>` row of the input embeddings.
            image_features: (batch, num_images, num_latents, vision_dim), instead of `pixel_values`.
            image_mask: (batch, num_images) bool, which image slots are real; by default each row's first k slots,
                k its number of `<image>` tokens.
            media_index: (batch, seq_len) 1-based number of the image each token attends to, counted over the whole
                sequence; derived from `input_ids` / `inputs_embeds` when omitted (then they must be the whole
                sequence). Needed when continuing from a `cache` with images.
            media_cache: image keys/values returned by an earlier call (`outputs.media_cache`), used instead of
                recomputing them from images.
            frame_mask: (batch, num_images, num_frames) bool with `pixel_values`: False for padding frames.
        Returns:
            `OpenFlamingoModelOutputWithPast` with `last_hidden_state` of shape (batch, seq_len, hidden_size).
        """
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = self.config.return_dict
        cache = _cache_argument(cache, kwargs)
        if kwargs.get("labels") is not None:
            raise ValueError(
                "OpenFlamingoModel has no output head, so it computes no loss from labels. Use "
                "OpenFlamingoForConditionalGeneration (AutoModelForImageTextToText) to train with labels."
            )
        kwargs.pop("labels", None)
        conditioning = self._condition(
            input_ids, inputs_embeds, attention_mask, None, pixel_values, image_features, image_mask, frame_mask,
            media_index, media_cache, cache,
        )
        decoder = self.language_model.base_model
        if decoder is self.language_model:
            raise ValueError(
                f"{type(self.language_model).__name__} has no separate decoder (its `base_model_prefix` names no "
                "module), so its final hidden states cannot be had without its output head. Use "
                "OpenFlamingoForConditionalGeneration and read `hidden_states` with output_hidden_states=True."
            )
        lm_kwargs = self._language_model_kwargs(
            self._decoder_parameters, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs
        )
        outputs = self._run_language_model(decoder, self._decoder_parameters, lm_kwargs, conditioning.cross_attention)
        output = OpenFlamingoModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.get("cache"),
            hidden_states=outputs.get("hidden_states"),
            attentions=outputs.get("attentions"),
            image_hidden_states=conditioning.image_hidden_states,
            image_outputs=conditioning.image_outputs,
            media_cache=conditioning.media_cache,
        )
        return output if return_dict else output.to_tuple()

    # ---------------------------------------------------------------- phases of forward
    def _condition(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.LongTensor | None,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        frame_mask: torch.Tensor | None,
        media_index: torch.LongTensor | None,
        media_cache: OpenFlamingoMediaCache | None,
        cache: Cache | None,
    ) -> _Conditioning:
        """Everything before the language-model call: input checks, the images' encoding and media cache, and what
        the gated blocks of this call attend to."""
        has_images = pixel_values is not None or image_features is not None or media_cache is not None
        if not torch.compiler.is_compiling():
            # Validation reads the cache length and tensor values (host syncs), which would break a compiled graph.
            # A compiled decode step gets its inputs from generate(), which validated them at the prompt.
            self._check_forward_inputs(
                input_ids, inputs_embeds, attention_mask, labels, pixel_values, image_features, frame_mask,
                media_index, cache, has_images,
            )
        if media_index is None and self.config.media_token_id is not None:
            if input_ids is not None:
                media_index = self.get_media_index(input_ids)
            elif has_images:
                media_index = self._media_index_of_embeddings(inputs_embeds)

        image_outputs = image_hidden_states = None
        if media_cache is None and (pixel_values is not None or image_features is not None):
            if pixel_values is not None:
                image_outputs = self.get_image_features(pixel_values, frame_mask, return_dict=True)
                image_features = image_outputs.pooler_output
            image_hidden_states = image_features
            batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            media_cache = self._encode_media_cache(media_index, batch_size, image_features, image_mask)
        cross_attention = self._cross_attention_inputs(media_index, media_cache)
        return _Conditioning(cross_attention, media_cache, image_hidden_states, image_outputs)

    def _check_forward_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.LongTensor | None,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None,
        frame_mask: torch.Tensor | None,
        media_index: torch.LongTensor | None,
        cache: Cache | None,
        has_images: bool,
    ) -> None:
        """Everything `forward` refuses, with a message that says what to pass instead."""
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_text_inputs(input_ids, inputs_embeds, attention_mask, labels, past_length)
        self._check_media_inputs(input_ids, pixel_values, image_features, frame_mask, has_images,
                                 tokens_need_images=media_index is None and past_length == 0)
        if media_index is not None:
            _check_is_tensor("media_index", media_index)
            expected = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
            if tuple(media_index.shape) != expected:
                raise ValueError(
                    f"media_index must have shape (batch, seq_len) = {expected}, one image number per new token; got "
                    f"{tuple(media_index.shape)} (model.get_media_index(full_input_ids)[:, -seq_len:])."
                )
            return
        if past_length > 0 and has_images:
            raise ValueError(
                "When decoding from a cache with images, pass media_index for the new tokens (the image number "
                "each attends to: model.get_media_index(full_input_ids)[:, -num_new_tokens:]), or use generate()."
            )

    def _check_media_inputs(
        self,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None,
        frame_mask: torch.Tensor | None,
        has_images: bool,
        tokens_need_images: bool = True,
    ) -> None:
        """
        How the images are given, as `forward` and `generate` both require: one of `pixel_values` and
        `image_features`, `frame_mask` only with `pixel_values`, a known `<image>` id when there are images, and no
        `<image>` token in `input_ids` without images. `tokens_need_images` is False where the `<image>` tokens'
        images come from elsewhere (`forward` continuing from a cache, or given `media_index`).
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass either pixel_values or image_features, not both.")
        if frame_mask is not None and pixel_values is None:
            raise ValueError("frame_mask describes the frames of pixel_values; pass it with pixel_values only.")
        media_token_id = self.config.media_token_id
        if has_images and media_token_id is None:
            raise ValueError(_NO_MEDIA_TOKEN_ID)
        if (
            tokens_need_images
            and not has_images
            and input_ids is not None
            and media_token_id is not None
            and bool((input_ids == media_token_id).any())
        ):
            raise ValueError(
                "input_ids contain <image> tokens but no images were given. Pass pixel_values (one image per <image> "
                "token) or remove the <image> tokens."
            )

    def _encode_media_cache(
        self,
        media_index: torch.LongTensor,
        batch_size: int,
        image_features: torch.Tensor,
        image_mask: torch.Tensor | None,
    ) -> OpenFlamingoMediaCache:
        """
        The media cache of freshly given images: which slots are real, and every block's keys/values. Each row's
        number of `<image>` tokens is the media index of its last token, which counts the whole sequence, also when
        only its new tokens are given (continuing from a cache: a second turn of a chat, assisted decoding).
        """
        self._check_image_features(image_features, batch_size)
        image_mask = self._image_mask_for_counts(media_index[:, -1], image_features.shape[1], image_mask)
        return self.build_media_cache(image_features, image_mask.bool())

    def _cross_attention_inputs(
        self, media_index: torch.LongTensor | None, media_cache: OpenFlamingoMediaCache | None
    ) -> _CrossAttentionInputs:
        """What the gated blocks of this call attend to: all images under a mask, or with immediate media each
        token its own image (decoding one token: that image's latents; many tokens: per image run)."""
        if media_cache is None:
            return _CrossAttentionInputs(self.gated_cross_attn_layers, None, None, None)
        if self.config.only_attend_immediate_media and media_index.shape[1] == 1:
            image_index, has_media = self._immediate_image(media_index, media_cache)
            return _CrossAttentionInputs(self.gated_cross_attn_layers, media_cache, None, has_media, image_index[:, 0])
        if self.config.only_attend_immediate_media and not torch.compiler.is_compiling():
            image_runs = self._image_runs(media_index, media_cache.image_mask.shape[1])
            if image_runs is not None:
                _, has_media = self._immediate_image(media_index, media_cache)
                return _CrossAttentionInputs(
                    self.gated_cross_attn_layers, media_cache, None, has_media, image_runs=image_runs
                )
        attn_mask, has_media = self._cross_attention_mask(media_index, media_cache)
        return _CrossAttentionInputs(self.gated_cross_attn_layers, media_cache, attn_mask, has_media)

    @staticmethod
    def _image_runs(media_index: torch.LongTensor, num_images: int) -> torch.LongTensor | None:
        """
        With immediate media the tokens that attend image j are those whose media index is j: one contiguous run per
        image, since the index never decreases along a row. Their positions, padded with `seq_len` to the longest
        run; None when a run is not contiguous (a hand-made media_index), so the caller masks instead.

        Args:
            media_index: (batch, seq_len) 1-based image number of each token.
        Returns:
            (batch, num_images, run_len) long
        """
        seq_len = media_index.shape[1]
        number = torch.arange(1, num_images + 1, device=media_index.device)
        in_run = media_index[:, None, :] == number[None, :, None]  # (batch, images, seq_len)
        counts = in_run.sum(-1)
        starts = in_run.int().argmax(-1)
        ends = seq_len - in_run.flip(-1).int().argmax(-1)
        run_len = int(counts.max())
        if run_len == 0 or not bool(((ends - starts == counts) | (counts == 0)).all()):
            return None
        offsets = torch.arange(run_len, device=media_index.device)
        positions = starts[..., None] + offsets
        return torch.where(offsets < counts[..., None], positions, seq_len)

    @staticmethod
    def _immediate_image(
        media_index: torch.LongTensor, media_cache: OpenFlamingoMediaCache
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """
        The one image each token attends to under immediate media (the same as `_cross_attention_mask` allows it,
        without materializing a mask over every image).

        Args:
            media_index: (batch, seq_len) 1-based image number of each token.
        Returns:
            image_index: (batch, seq_len) 0-based image slot (clamped to a valid slot where the token sees no image).
            has_media: (batch, seq_len, 1) bool, False where the token sees no image (before the first one, beyond
                the images given, or at a padding slot).
        """
        image_mask = media_cache.image_mask.to(media_index.device)
        image_index = (media_index - 1).clamp(min=0, max=image_mask.shape[1] - 1)
        real = image_mask.gather(1, image_index)
        has_media = (media_index >= 1) & (media_index <= image_mask.shape[1]) & real
        return image_index, has_media[..., None]

    def _language_model_kwargs(
        self,
        accepted: frozenset[str],
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool | None,
        kwargs: dict,
        **optional,
    ) -> dict:
        """
        The keyword arguments of a call to the language model (`accepted`: the names its forward takes, `"*"` for
        any). `optional` arguments (`labels`, `logits_to_keep`) are passed only where they are accepted.
        """
        lm_kwargs = dict(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # Positions count real tokens only, so a left-padded row is positioned as if it were alone (what
            # generate() does too); the mask covers cached tokens as well, hence the slice.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            position_ids = position_ids[:, -(input_ids if input_ids is not None else inputs_embeds).shape[1] :]
        for name, value in (("position_ids", position_ids), *optional.items()):
            if value is not None and ("*" in accepted or name in accepted):
                lm_kwargs[name] = value
        return lm_kwargs

    def _run_language_model(
        self, module: nn.Module, accepted: frozenset[str], lm_kwargs: dict, cross_attention: _CrossAttentionInputs
    ) -> ModelOutput:
        """
        A call to the language model (`module`: the causal LM, or its decoder), with the gated blocks' inputs
        reaching the decoder-layer hooks.
        """
        if "*" in accepted:
            lm_kwargs[CROSS_ATTENTION_KWARG] = cross_attention
        if torch.compiler.is_compiling():
            outputs = module(**lm_kwargs, return_dict=True)
            if cross_attention.blocks_run == 0 and len(self.gated_cross_attn_layers) > 0:
                raise RuntimeError(
                    f"{type(self.language_model).__name__} does not pass keyword arguments on to its decoder layers, "
                    "so its gated cross-attention blocks cannot be reached inside a compiled graph. Run this model "
                    "without torch.compile (or static-cache compilation), or use a language model that does "
                    "(Llama, GPT-NeoX, MosaicGPT, ...)."
                )
            return outputs
        token = _CROSS_ATTENTION_INPUTS.set(cross_attention)
        try:
            return module(**lm_kwargs, return_dict=True)
        finally:
            _CROSS_ATTENTION_INPUTS.reset(token)


class OpenFlamingoForConditionalGeneration(OpenFlamingoModel, GenerationMixin):
    """
    OpenFlamingo with its language-modeling head: [`OpenFlamingoModel`] whose language model runs whole, output head
    included, so logits and loss are exactly the language model's own (its soft-capping or scaling, if any,
    included).

    `model` is the headless [`OpenFlamingoModel`] over the same modules (transformers' `base_model`, named by
    `base_model_prefix`): `model.model(...).last_hidden_state` fed to `model.get_output_embeddings()` gives these
    logits. Both classes have the same weight names (the language model's head lives inside `language_model`), so
    one checkpoint loads into either.
    """

    def __init__(
        self,
        config: OpenFlamingoConfig,
        vision_model: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config, vision_model=vision_model, language_model=language_model)
        # Stop at <|endofchunk|>, pad with the LM's pad token (see `openflamingo_generation_config`).
        self.generation_config = openflamingo_generation_config(config, self.generation_config)
        # Held outside `_modules`: its children are this model's own, which must be neither saved nor moved twice.
        self.__dict__["model"] = OpenFlamingoModel._over_modules_of(self)

    def train(self, mode: bool = True):
        super().train(mode)
        headless = self.__dict__.get("model")
        if headless is not None:
            headless.training = mode  # its children are this model's, already switched
        return self

    def adjust_generation_fn(self, generation_config, *args, **kwargs):
        """`from_pretrained`'s loading of the generation config; a folder without `generation_config.json` gets one
        derived from `config.json`, which is then given OpenFlamingo's stop and pad tokens."""
        super().adjust_generation_fn(generation_config, *args, **kwargs)
        if generation_config is None and getattr(self.generation_config, "_from_model_config", False):
            self.generation_config = openflamingo_generation_config(self.config, self.generation_config)

    # ---------------------------------------------------------------- construction from pretrained backbones
    @classmethod
    def from_backbones(
        cls,
        vision_model: str | PreTrainedModel,
        language_model: str | PreTrainedModel,
        cross_attn_every_n_layers: int = 1,
        media_token_id: int | None = None,
        eoc_token_id: int | None = None,
        decoder_layers_attr_name: str | None = None,
        processor=None,
        vision_kwargs: dict | None = None,
        language_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "OpenFlamingoForConditionalGeneration":
        """
        Builds a fresh OpenFlamingo (new Perceiver, new gated blocks with zero gates) around pretrained backbones.

        The backbones are used, not copied: they become `model.vision_model` / `model.language_model`, and their
        config objects become `model.config.vision_config` / `text_config`, unchanged (attention implementation
        included), so a zero-gate model computes exactly what the language model computed before. The only changes
        made to them: with `processor`, the LM's embeddings are resized to the tokenizer and its config gets that
        vocabulary size and the pad id; a composite vision checkpoint is not changed (its tower is extracted).
        The generation config stops at `<|endofchunk|>` when its id is known.

        Args:
            vision_model: a vision model instance, or a name/path loaded with `AutoModel.from_pretrained`. A
                composite checkpoint with a `vision_config` (e.g. a full CLIP) contributes its vision tower.
            language_model: a causal LM instance, or a name/path loaded with `AutoModelForCausalLM.from_pretrained`.
            cross_attn_every_n_layers: a gated block before every N-th decoder layer.
            media_token_id, eoc_token_id: ids of `<image>` and `<|endofchunk|>` (see `OpenFlamingoProcessor`).
            decoder_layers_attr_name: dotted path of the LM's decoder layers, when they cannot be found automatically.
            processor: an `OpenFlamingoProcessor` whose tokenizer holds the special tokens. Its `<image>`,
                `<|endofchunk|>` and pad ids go into the config, and the LM embeddings are resized to
                `len(processor.tokenizer)` (what the original factory did after adding the tokens).
            vision_kwargs, language_kwargs: extra `from_pretrained` arguments for names/paths.
            **config_kwargs: other `OpenFlamingoConfig` fields (Perceiver and cross-attention sizes, ...).
        """
        if isinstance(vision_model, str):
            vision_model = _load_vision_tower(vision_model, **(vision_kwargs or {}))
        elif getattr(vision_model.config, "vision_config", None) is not None:
            vision_model = _extract_vision_tower(vision_model)
        if isinstance(language_model, str):
            language_model = AutoModelForCausalLM.from_pretrained(language_model, **(language_kwargs or {}))
        config = OpenFlamingoConfig(
            vision_config=vision_model.config,
            text_config=language_model.config,
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            media_token_id=media_token_id,
            eoc_token_id=eoc_token_id,
            decoder_layers_attr_name=decoder_layers_attr_name,
            **config_kwargs,
        )
        model = cls(config, vision_model=vision_model, language_model=language_model)
        if processor is not None:
            # set_vocab_size=True: the resize is done right here, so the processor must not ask the user for it.
            num_embeddings = processor.update_model_config(model.config, set_vocab_size=True)
            model.resize_token_embeddings(num_embeddings)
            model.generation_config = openflamingo_generation_config(model.config, model.generation_config)
        return model.to(language_model.dtype)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        image_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        media_index: torch.LongTensor | None = None,
        media_cache: OpenFlamingoMediaCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        frame_mask: torch.Tensor | None = None,
        loss_logits_only: bool = False,
        **kwargs,
    ) -> OpenFlamingoCausalLMOutputWithPast:
        r"""
        Args:
            input_ids: (batch, seq_len) token ids; `<image>` tokens mark where images go.
            pixel_values: (batch, num_images, num_frames, 3, H, W) or (batch, num_images, 3, H, W).
            attention_mask: (batch, cached + seq_len) 1 for real tokens, 0 for padding.
            position_ids, cache, use_cache, logits_to_keep: as for the language model (`past_key_values` is read as
                `cache`).
            inputs_embeds: (batch, seq_len, dim) instead of `input_ids`; `<image>` tokens are the embeddings equal to
                the `<image>` row of the input embeddings.
            labels: (batch, seq_len) targets; the loss is the shifted cross-entropy, -100 ignored.
            image_features: (batch, num_images, num_latents, vision_dim), instead of `pixel_values`.
            image_mask: (batch, num_images) bool, which image slots are real; by default each row's first k slots,
                k its number of `<image>` tokens.
            media_index: (batch, seq_len) 1-based number of the image each token attends to, counted over the whole
                sequence; derived from `input_ids` / `inputs_embeds` when omitted (then they must be the whole
                sequence). Needed when continuing from a `cache` with images.
            media_cache: image keys/values returned by an earlier call (`outputs.media_cache`), used instead of
                recomputing them from images.
            frame_mask: (batch, num_images, num_frames) bool with `pixel_values`: False for padding frames.
            loss_logits_only: with `labels`, apply the LM head only at positions whose next token carries a label
                (training: most positions of a batch are padding or masked, and the head is the widest matmul).
                Same loss; `logits` then holds those positions only. `OpenFlamingoTrainer` sets it when training.
        """
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = self.config.return_dict
        cache = _cache_argument(cache, kwargs)
        conditioning = self._condition(
            input_ids, inputs_embeds, attention_mask, labels, pixel_values, image_features, image_mask, frame_mask,
            media_index, media_cache, cache,
        )
        lm_kwargs = self._language_model_kwargs(
            self._language_model_parameters, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache,
            kwargs, labels=labels, logits_to_keep=logits_to_keep,
        )
        head = self._separate_output_head() if loss_logits_only and labels is not None else None
        if head is not None:
            outputs = self._run_language_model_on_labels(lm_kwargs, conditioning.cross_attention, head)
        else:
            outputs = self._run_language_model(
                self.language_model, self._language_model_parameters, lm_kwargs, conditioning.cross_attention
            )
        output = OpenFlamingoCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.get("cache"),
            hidden_states=outputs.get("hidden_states"),
            attentions=outputs.get("attentions"),
            image_hidden_states=conditioning.image_hidden_states,
            image_outputs=conditioning.image_outputs,
            media_cache=conditioning.media_cache,
        )
        return output if return_dict else output.to_tuple()

    def _separate_output_head(self) -> nn.Module | None:
        """The LM's output head, when it is a module of its own (not the input embedding called twice)."""
        head = self.get_output_embeddings()
        return head if isinstance(head, nn.Module) and head is not self.get_input_embeddings() else None

    def _run_language_model_on_labels(
        self, lm_kwargs: dict, cross_attention: _CrossAttentionInputs, head: nn.Module
    ) -> ModelOutput:
        """
        The language-model call with its output head applied only at labelled positions, and the loss over them.
        A forward pre-hook on the head, there for this call only, selects the head's input rows; whatever the LM does
        to the head's output (soft-capping, scaling) still applies.
        """
        labels = lm_kwargs.pop("labels")
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (batch, seq_len): the token each position predicts
        keep = targets != -100

        def select_labeled(module: nn.Module, args: tuple):
            hidden_states = args[0]  # (batch, seq_len, dim)
            if hidden_states.shape[:2] != keep.shape:
                raise RuntimeError(
                    f"loss_logits_only: the output head of {type(self.language_model).__name__} gets inputs of "
                    f"shape {tuple(hidden_states.shape)}, not (batch, seq_len, dim) = {(*keep.shape, '...')}. Train "
                    "without it (OpenFlamingoTrainer(..., loss_logits_only=False))."
                )
            return (hidden_states[keep.to(hidden_states.device)][None], *args[1:])

        if "logits_to_keep" in lm_kwargs:
            lm_kwargs["logits_to_keep"] = 0  # the head's input must be every position, for the selection to index
        handle = head.register_forward_pre_hook(select_labeled)
        try:
            outputs = self._run_language_model(
                self.language_model, self._language_model_parameters, lm_kwargs, cross_attention
            )
        finally:
            handle.remove()
        outputs.loss = ForCausalLMLoss(
            outputs.logits,
            None,
            outputs.logits.shape[-1],
            num_items_in_batch=lm_kwargs.get("num_items_in_batch"),
            shift_labels=targets[keep][None],
        )
        return outputs

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """
        `GenerationMixin.generate` (greedy, sampling, beam search, assisted decoding, ...) with images (and videos:
        `frame_mask` marks the padding frames of `pixel_values`, as in `forward`).

        Images are encoded once, before beams/`num_return_sequences` copy the batch, and each gated block's
        keys/values are computed once at prefill; every later step only reads them. Stops at `<|endofchunk|>` when
        the generation config says so (`eos_token_id`). Continuing from a filled `cache` (the next turn of a chat)
        takes the whole sequence as `input_ids` and the images of the whole sequence, as for an uninterrupted call.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        has_images = pixel_values is not None or image_features is not None
        if has_images and input_ids is None:
            raise ValueError("generate() with images needs input_ids holding one <image> token per image.")
        # generate() takes the whole sequence, also when continuing from a cache: its <image> tokens need images.
        self._check_media_inputs(input_ids, pixel_values, image_features, frame_mask, has_images)
        if has_images:
            self._check_text_inputs(input_ids, None, kwargs.get("attention_mask"), None, 0)
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, frame_mask)
        if image_features is not None:
            self._check_image_features(image_features, input_ids.shape[0])
            kwargs["image_features"] = image_features
            kwargs["image_mask"] = self.get_image_mask(input_ids, image_features.shape[1], image_mask)
        return super().generate(input_ids, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        image_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        media_cache: OpenFlamingoMediaCache | None = None,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        # Which image each new token attends to follows from the whole sequence so far (prompt and generated tokens),
        # so nothing about earlier steps needs to be remembered.
        step_ids = model_inputs.get("input_ids")
        step_len = step_ids.shape[1] if step_ids is not None else model_inputs["inputs_embeds"].shape[1]
        # (A prompt given as inputs_embeds is not in input_ids: forward finds its <image> tokens in the embeddings.)
        if self.config.media_token_id is not None and input_ids.shape[1] >= step_len:
            # A fresh contiguous tensor: a slice of the growing sequence has a stride that grows at every step, which
            # a compiled decode step (`dynamic=False`) would take for a new input and recompile.
            media_index = self.get_media_index(input_ids)[:, -step_len:]
            model_inputs["media_index"] = media_index.clone(memory_format=torch.contiguous_format)
        if media_cache is not None:
            model_inputs["media_cache"] = media_cache
        elif image_features is not None:
            model_inputs["image_features"] = image_features
            model_inputs["image_mask"] = image_mask
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if getattr(outputs, "media_cache", None) is not None:
            model_kwargs["media_cache"] = outputs.media_cache
        return model_kwargs


def _cache_argument(cache: Cache | None, kwargs: dict) -> Cache | None:
    """
    The KV cache of a forward call: `cache`, or `past_key_values` (its name before transformers 5, still accepted by
    transformers' own models), which is taken out of `kwargs` so that it never reaches the language model beside
    `cache` (which would then run without the cache it was given).
    """
    legacy = kwargs.pop("past_key_values", None)
    if legacy is None:
        return cache
    if cache is not None and cache is not legacy:
        raise ValueError(
            "Both cache= and past_key_values= were given, with different caches. past_key_values is the old name of "
            "cache: pass the KV cache once, as cache=."
        )
    return legacy


_NO_MEDIA_TOKEN_ID = (
    "config.media_token_id is not set, so the model cannot tell where the images go. Set it to the id of the <image> "
    "token: `processor.update_model_config(model.config)` (or from_backbones(..., processor=processor))."
)


def _check_is_tensor(name: str, value) -> None:
    if value is not None and not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor, got {type(value).__name__}. Call the processor with "
            "return_tensors='pt' (or convert with torch.as_tensor)."
        )


# Language-model types whose position encoding is a table of fixed size even though they have no learned position
# embedding (MPT precomputes its ALiBi biases for max_seq_len positions).
FIXED_POSITION_TABLE_TYPES = ("mpt",)
# Names of learned absolute position embeddings (GPT-2 / GPT-J style `wpe`, OPT / BART style `embed_positions`, ...).
LEARNED_POSITION_EMBEDDING_NAMES = ("wpe", "embed_positions", "position_embeddings")


@functools.lru_cache(maxsize=None)
def _has_fixed_position_table_type(model_type: str, module_names: tuple[str, ...]) -> bool:
    return model_type in FIXED_POSITION_TABLE_TYPES or any(
        name.rsplit(".", 1)[-1] in LEARNED_POSITION_EMBEDDING_NAMES for name in module_names
    )


def _has_fixed_position_table(language_model: nn.Module) -> bool:
    """Whether the LM indexes a table of positions (and so fails past its limit) rather than extrapolating."""
    names = tuple(name for name, module in language_model.named_modules() if isinstance(module, nn.Embedding))
    return _has_fixed_position_table_type(language_model.config.model_type, names)


def _check_loading_info(source, loading_info: dict) -> None:
    """Raises when a checkpoint and the model built from the config do not have the same weights."""
    missing, unexpected = sorted(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
    if not missing and not unexpected:
        return
    shown = lambda keys: ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")  # noqa: E731
    problems = ([f"weights the model needs but the checkpoint lacks: {shown(missing)}"] if missing else []) + (
        [f"weights in the checkpoint that the model has no place for: {shown(unexpected)}"] if unexpected else []
    )
    raise ValueError(
        f"The weights at {source} do not fit the model's config; " + "; ".join(problems) + ". This happens when "
        "the architecture is changed at load time (e.g. another cross_attn_every_n_layers moves the gated blocks). "
        "Load with the saved config, or pass strict=False to initialise missing weights anew and drop unexpected ones."
    )


def _unreadable_weights_error(source, error: Exception) -> OSError:
    """Names the safetensors file that cannot be read (a truncated download or copy), which safetensors does not."""
    folder = Path(os.fspath(source)) if source is not None and os.path.isdir(os.fspath(source)) else None
    bad = []
    for path in sorted(folder.glob("*.safetensors")) if folder is not None else []:
        try:
            with safe_open(path, framework="pt") as file:
                for key in file.keys():
                    file.get_slice(key)
        except (SafetensorError, OSError):
            bad.append(str(path))
    where = ", ".join(bad) if bad else f"the weights of {source}"
    return OSError(
        f"Cannot read {where} ({error}). The file is probably truncated or corrupt (an interrupted download or copy): "
        "download or save it again."
    )


def _check_backbone_config(key: str, expected: PreTrainedConfig, given: PreTrainedConfig) -> None:
    """A backbone passed to the model must be of the kind its config describes."""
    mismatched = [
        f"{name}={getattr(given, name, None)!r} (config: {getattr(expected, name, None)!r})"
        for name in ("model_type", "hidden_size", "num_hidden_layers")
        if getattr(given, name, None) != getattr(expected, name, None)
    ]
    if mismatched:
        raise ValueError(
            f"The {key[: -len('_config')]} model given does not match config.{key}: " + ", ".join(mismatched)
            + ". Build the config from the backbone (OpenFlamingoForConditionalGeneration.from_backbones does)."
        )


def _build_language_model(config: OpenFlamingoConfig) -> PreTrainedModel:
    text_config = config.get_text_config()
    if text_config.model_type == "mosaic_gpt":
        # Built directly rather than through AutoModelForCausalLM: when loaded as remote code from a local folder,
        # transformers may import configuration_mosaic_gpt twice (once per auto_map module directory), giving a
        # MosaicGPTConfig class that is not the one registered with the Auto classes.
        return MosaicGPTForCausalLM(text_config)
    return AutoModelForCausalLM.from_config(text_config)


def _extract_vision_tower(model: PreTrainedModel) -> PreTrainedModel:
    """The vision tower of a composite model (e.g. `CLIPModel`) as a standalone model with the same weights."""
    tower = AutoModel.from_config(model.config.vision_config)
    source = model.state_dict()
    target_keys = list(tower.state_dict())
    # The tower's weights sit under some prefix of the composite model (`vision_model.` for CLIP): find the one
    # prefix under which every tower weight exists.
    prefixes = {k[: -len(target_keys[0])] for k in source if k.endswith(target_keys[0])}
    for prefix in sorted(prefixes, key=len):
        if all(prefix + k in source for k in target_keys):
            tower.load_state_dict({k: source[prefix + k] for k in target_keys})
            return tower.to(model.dtype)
    raise ValueError(
        f"Cannot take the vision tower out of {type(model).__name__}: no prefix holds all of the weights of "
        f"{type(tower).__name__}. Pass the vision model itself (e.g. a CLIPVisionModel)."
    )


# `from_pretrained` arguments that also apply to reading a config.
_HUB_KWARGS = ("revision", "token", "local_files_only", "cache_dir", "subfolder")


def _vision_tower_config(name_or_path: str, **kwargs):
    """The config of the vision tower at `name_or_path`: the `vision_config` of a composite checkpoint (e.g.
    openai/clip-vit-large-patch14), else the checkpoint's own config."""
    config = AutoConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k in _HUB_KWARGS})
    return getattr(config, "vision_config", None) or config


def _load_vision_tower(name_or_path: str, **kwargs) -> PreTrainedModel:
    # For a composite checkpoint only its vision tower is loaded.
    return AutoModel.from_pretrained(name_or_path, config=_vision_tower_config(name_or_path, **kwargs), **kwargs)


__all__ = [
    "GatedCrossAttentionBlock",
    "OpenFlamingoForConditionalGeneration",
    "OpenFlamingoMediaCache",
    "OpenFlamingoModel",
    "OpenFlamingoPerceiverResampler",
    "OpenFlamingoPreTrainedModel",
    "decode_compile_config",
    "find_decoder_layers",
]
