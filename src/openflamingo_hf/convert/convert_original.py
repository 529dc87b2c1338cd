"""Conversion between the original `open_flamingo` state dicts and `OpenFlamingoForConditionalGeneration`.

Layouts
-------
Ours (target of `convert_original_state_dict`):

    vision_model.*                        exactly a standalone vision model's keys (e.g. `CLIPVisionModel`)
    perceiver.latents, perceiver.norm.*, perceiver.frame_embs, perceiver.media_time_embs
    perceiver.layers.{l}.attn.{norm_media,norm_latents,to_q,to_kv,to_out}.*
    perceiver.layers.{l}.ff.{norm,fc1,fc2}.*
    gated_cross_attn_layers.{i}.attn.{norm,to_q,to_kv,to_out}.*, .attn_gate, .ff.{norm,fc1,fc2}.*, .ff_gate
    language_model.*                      exactly a standalone causal LM's keys

Original (`open_flamingo` v2):

    vision_encoder.*                      open_clip `VisionTransformer` keys (full state dicts only)
    perceiver.layers.{l}.0.*              attention (same inner names as ours)
    perceiver.layers.{l}.1.{0,1,3}.*      feed-forward nn.Sequential: LayerNorm, Linear, GELU, Linear
    lang_encoder.<layers>.{i}.gated_cross_attn_layer.{attn.*, attn_gate, ff.{0,1,3}.*, ff_gate}
    lang_encoder.<layers>.{i}.decoder_layer.*   the LM's own decoder layer, wrapped
    lang_encoder.*                        the rest of the LM (embeddings, final norm, ...)
    lang_encoder.old_decoder_blocks.{i}.*, lang_encoder.gated_cross_attn_layers.{i}.*   duplicates (full only)

`<layers>` is the LM's decoder-layer list (`transformer.blocks`, `gpt_neox.layers`, `model.layers`, ...), `{i}` the
index of the decoder layer a gated block precedes (the same index in both layouts).

Inside the LM, names are the standalone model's, except where this package's LM names a parameter differently from
the model the original was trained with: the 9B release's MPT-7B (`norm_1`, `norm_2`, `ffn.up_proj`,
`ffn.down_proj`, `norm_f`) is this package's MosaicGPT (`ln_1`, `ln_2`, `mlp.mlp_up`, `mlp.mlp_down`, `ln_f`), see
`LM_KEY_MAPPINGS`; the export writes the names of the LM config's `checkpoint_layout`.

A released `checkpoint.pt` is *trainable-only*: the Perceiver, the gated blocks and the LM's embeddings (the original
saved every parameter whose name contains "embed" plus every trainable one). The LM's other weights and the vision
tower must then come from the backbones, given explicitly as `base_state_dict` (see `base_state_dict_from_backbones`).
Keys present in both the checkpoint and the base (the embeddings, resized to the tokenizer by the original) are
taken from the checkpoint; the report records which base entries were overridden.

Strictness: every source key is either used or matched by an explicit ignore rule with a reason (duplicates that
are checked equal, stale buffers of old transformers versions, open_clip's `proj`); every target key is filled;
every shape is checked. Problems are collected and raised together in one `ConversionError` naming each key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling.configuration_openflamingo import OpenFlamingoConfig
from ..modeling.modeling_mosaic_gpt import MPT_KEY_MAPPING
from ..modeling.modeling_openflamingo import (
    OpenFlamingoForConditionalGeneration,
    _extract_vision_tower,
    find_decoder_layers,
)

LM_PREFIX = "lang_encoder."
VISION_PREFIX = "vision_encoder."
DECODER_LAYER = "decoder_layer"
GATED_BLOCK = "gated_cross_attn_layer"
OLD_DECODER_BLOCKS = "old_decoder_blocks"
GATED_BLOCK_LIST = "gated_cross_attn_layers"

# Top-level entries of training checkpoints that are not weights: {"model_state_dict": ..., "optimizer_state_dict":
# ..., ...}. Only `model_state_dict` is read.
_TRAINING_STATE_KEYS = ("optimizer_state_dict", "lr_scheduler_state_dict", "epoch", "step", "args", "scaler")

# Feed-forward nn.Sequential indices of the original -> our module names (index 2 is the parameterless GELU).
_FF_ORIGINAL_TO_OURS = {"0": "norm", "1": "fc1", "3": "fc2"}
_FF_OURS_TO_ORIGINAL = {v: k for k, v in _FF_ORIGINAL_TO_OURS.items()}

# LM parameters that transformers renamed since the original was trained (original prefix -> current prefix),
# per model_type. transformers itself applies these on `from_pretrained`; the converter must do it by hand.
LEGACY_LM_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt_neox": (("embed_out.", "lm_head."),),
}

# LM parameter names of a source (regex over the key inside the LM) -> ours, per target LM model_type, applied to the
# checkpoint's LM keys and to the base's. MosaicGPT, the one MPT of this package, reads the MPT names of the 9B
# release (MPT-7B, also transformers' `MptForCausalLM`) with the mapping its `from_pretrained` uses; its own names
# (the 3B releases) match none of the patterns.
LM_KEY_MAPPINGS: dict[str, dict[str, str]] = {
    "mosaic_gpt": MPT_KEY_MAPPING,
}
# Ours -> the MPT names, for the export of a MosaicGPT whose original checkpoints use them (`checkpoint_layout="mpt"`).
_MOSAIC_GPT_TO_MPT_KEYS: tuple[tuple[str, str], ...] = (
    (r"\.ln_1\.", ".norm_1."),
    (r"\.ln_2\.", ".norm_2."),
    (r"\.mlp\.mlp_up\.", ".ffn.up_proj."),
    (r"\.mlp\.mlp_down\.", ".ffn.down_proj."),
    (r"(?<!\w)ln_f\.", "norm_f."),
)
# Source LM keys that are a tied copy of another key of the same source, per target LM model_type: an MPT state dict
# (`MptForCausalLM.state_dict()` as a base) holds `lm_head.weight`, the same tensor as `transformer.wte.weight`, which
# MosaicGPT uses as its output projection directly. Used only if equal to what they copy (or as its only copy).
SOURCE_TIED_LM_KEYS: dict[str, dict[str, str]] = {
    "mosaic_gpt": {"lm_head.weight": "transformer.wte.weight"},
}

# Source keys that are not weights of any current model and are skipped, with the reason. They only apply to keys
# that match no target key, so a real parameter is never skipped.
IGNORED_SOURCE_PATTERNS: tuple[tuple[re.Pattern, str], ...] = (
    (
        re.compile(r"^vision_encoder\.proj$"),
        "open_clip's projection into the joint image-text space; OpenFlamingo uses the patch tokens before it",
    ),
    (
        re.compile(r"^lang_encoder\..*\.attention\.(bias|masked_bias)$"),
        "causal-mask buffer that transformers < 4.31 stored in GPT-NeoX state dicts; recomputed now",
    ),
    (
        re.compile(r"^lang_encoder\..*\.attn\.(bias|masked_bias)$"),
        "causal-mask buffer that older transformers stored in GPT-2/GPT-J state dicts; recomputed now",
    ),
    (
        re.compile(r"^lang_encoder\..*rotary_emb\.inv_freq$"),
        "rotary-embedding frequencies that older transformers stored as a buffer; recomputed from the config",
    ),
)


MAX_PROBLEMS_SHOWN = 40


class ConversionError(ValueError):
    """A state dict does not match the model: lists every offending key and what to do about it."""


@dataclass
class ConversionReport:
    """
    Where each converted weight came from.

    Attributes:
        sources: target key -> the source key(s) it was built from. Checkpoint keys appear as in the file; base keys
            are prefixed `base:`; weights tied to another target key are `tied:<key>`.
        ignored: source key -> why it was not used (duplicate checked equal, overridden by the checkpoint, stale
            buffer, ...). Base keys are prefixed `base:`.
    """

    sources: dict[str, list[str]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A short human-readable summary (counts per origin)."""
        from_checkpoint = sum(1 for s in self.sources.values() if not s[0].startswith(("base:", "tied:")))
        from_base = sum(1 for s in self.sources.values() if s[0].startswith("base:"))
        tied = sum(1 for s in self.sources.values() if s[0].startswith("tied:"))
        return (
            f"{len(self.sources)} weights: {from_checkpoint} from the checkpoint, {from_base} from the base models, "
            f"{tied} tied; {len(self.ignored)} source entries not used (see `ignored`)."
        )

    def to_dict(self) -> dict:
        return {"sources": self.sources, "ignored": self.ignored}


# ----------------------------------------------------------------------------------------------------------------------
# Target layout
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _TargetSpec:
    """What the converted state dict must contain, read off a model built on the meta device (no memory)."""

    shapes: dict[str, torch.Size]
    tied: dict[str, str]  # tied target key -> key it is tied to
    layers_path: str  # decoder-layer list inside the LM, e.g. "gpt_neox.layers"
    lm_model_type: str
    lm_config: object  # the LM's config (its `model_type`, and `checkpoint_layout` for MosaicGPT)
    vision_model_type: str
    input_embedding_key: str  # inside the LM, e.g. "transformer.wte.weight"


def _build_meta_model(config: OpenFlamingoConfig) -> OpenFlamingoForConditionalGeneration:
    with torch.device("meta"):
        return OpenFlamingoForConditionalGeneration(config)


def _parameter_name(module: nn.Module, parameter: nn.Parameter) -> str:
    for name, p in module.named_parameters():
        if p is parameter:
            return name
    raise ValueError(f"{type(module).__name__}: parameter not found.")


def _target_spec(config: OpenFlamingoConfig) -> _TargetSpec:
    model = _build_meta_model(config)
    layers_path, _ = find_decoder_layers(model.language_model, config.decoder_layers_attr_name)
    lm = model.language_model
    return _TargetSpec(
        shapes={k: v.shape for k, v in model.state_dict().items()},
        tied=dict(getattr(model, "all_tied_weights_keys", None) or {}),
        layers_path=layers_path,
        lm_model_type=lm.config.model_type,
        lm_config=lm.config,
        vision_model_type=model.vision_model.config.model_type,
        input_embedding_key=_parameter_name(lm, lm.get_input_embeddings().weight),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Name mapping, original -> ours
# ----------------------------------------------------------------------------------------------------------------------


def _ff_or_same(tail: str) -> str | None:
    """Inner name of a Perceiver layer / gated block part: `ff.{0,1,3}.x` -> `ff.{norm,fc1,fc2}.x`."""
    parts = tail.split(".")
    if parts[0] == "ff":
        if len(parts) < 3 or parts[1] not in _FF_ORIGINAL_TO_OURS:
            return None
        return ".".join(["ff", _FF_ORIGINAL_TO_OURS[parts[1]], *parts[2:]])
    return tail


def _map_perceiver(key: str) -> str | None:
    """`perceiver.layers.{l}.0.x` -> `.attn.x`, `.1.{0,1,3}.x` -> `.ff.{norm,fc1,fc2}.x`; other names unchanged."""
    match = re.fullmatch(r"perceiver\.layers\.(\d+)\.([01])\.(.+)", key)
    if match is None:
        return key
    layer, part, tail = match.groups()
    if part == "0":
        return f"perceiver.layers.{layer}.attn.{tail}"
    mapped = _ff_or_same(f"ff.{tail}")
    return None if mapped is None else f"perceiver.layers.{layer}.{mapped}"


def _map_gated(index: str, tail: str) -> str | None:
    mapped = _ff_or_same(tail)
    return None if mapped is None else f"gated_cross_attn_layers.{index}.{mapped}"


def _rename_legacy_lm(lm_key: str, model_type: str) -> str:
    """A source name inside the LM -> ours (`LEGACY_LM_RENAMES`, then `LM_KEY_MAPPINGS`)."""
    for old, new in LEGACY_LM_RENAMES.get(model_type, ()):
        if lm_key.startswith(old):
            lm_key = new + lm_key[len(old) :]
            break
    for pattern, replacement in LM_KEY_MAPPINGS.get(model_type, {}).items():
        lm_key = re.sub(pattern, replacement, lm_key, count=1)
    return lm_key


def _unrename_legacy_lm(lm_key: str, lm_config) -> str:
    """Our name inside the LM -> the name in the original checkpoints of that LM (inverse of `_rename_legacy_lm`)."""
    for old, new in LEGACY_LM_RENAMES.get(lm_config.model_type, ()):
        if lm_key.startswith(new):
            lm_key = old + lm_key[len(new) :]
            break
    if lm_config.model_type == "mosaic_gpt" and getattr(lm_config, "checkpoint_layout", "mosaic_gpt") == "mpt":
        for pattern, replacement in _MOSAIC_GPT_TO_MPT_KEYS:
            lm_key = re.sub(pattern, replacement, lm_key, count=1)
    return lm_key


def _lm_target(lm_key: str, spec: _TargetSpec) -> str:
    return "language_model." + _rename_legacy_lm(lm_key, spec.lm_model_type)


_OPEN_CLIP_TOP = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _map_open_clip(key: str) -> list[str] | None:
    """
    open_clip ViT key (without `vision_encoder.`) -> `CLIPVisionModel` key(s), under `vision_model.`. The stacked
    `attn.in_proj_{weight,bias}` ((3 * width, ...), q, k, v in that order) maps to three keys.
    """
    if key in _OPEN_CLIP_TOP:
        return ["vision_model." + _OPEN_CLIP_TOP[key]]
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if match is None:
        return None
    block, module, kind = match.groups()
    if module in _OPEN_CLIP_BLOCK:
        return [f"vision_model.encoder.layers.{block}.{_OPEN_CLIP_BLOCK[module]}.{kind}"]
    return None


def _map_open_clip_in_proj(key: str) -> list[str] | None:
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
    if match is None:
        return None
    block, kind = match.groups()
    return [f"vision_model.encoder.layers.{block}.self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]


# ----------------------------------------------------------------------------------------------------------------------
# Reading a source state dict
# ----------------------------------------------------------------------------------------------------------------------


def unwrap_checkpoint(checkpoint: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """
    The model state dict inside a loaded `.pt` file.

    Accepts a flat state dict (released `checkpoint.pt`) or a training checkpoint `{"model_state_dict": ...,
    "optimizer_state_dict": ..., "epoch": ...}`, of which only `model_state_dict` is read.

    Returns:
        (state dict, {top-level entry: why it was skipped})
    """
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(
            f"The checkpoint is a {type(checkpoint).__name__}, not a state dict. Pass the dict returned by "
            "`torch.load(path, weights_only=True)`."
        )
    skipped: dict[str, str] = {}
    if "model_state_dict" in checkpoint:
        for key in checkpoint:
            if key != "model_state_dict":
                skipped[key] = "training state of a training checkpoint, not model weights"
        checkpoint = checkpoint["model_state_dict"]
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        hint = (
            " It looks like a training checkpoint: the weights are expected under 'model_state_dict'."
            if any(k in _TRAINING_STATE_KEYS for k in bad)
            else ""
        )
        raise ConversionError(
            f"The checkpoint holds entries that are not tensors: {bad[:5]}{' ...' if len(bad) > 5 else ''}.{hint} "
            "Pass a flat state dict of tensors, or a dict with the state dict under 'model_state_dict'."
        )
    return dict(checkpoint), skipped


def normalize_original_key(key: str) -> str:
    """
    Strips wrapper artifacts from an original parameter name: a DDP `module.` prefix, FSDP / activation-checkpoint
    wrappers (`_fsdp_wrapped_module.`, `._checkpoint_wrapped_module`) and `torch.compile`'s `_orig_mod.`.
    """
    for wrapper in ("._checkpoint_wrapped_module", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod."):
        key = key.replace(wrapper, "")
    if key.startswith("module."):
        key = key[len("module.") :]
    return key


def infer_cross_attn_every_n_layers(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """
    The interval N of gated blocks in an original state dict (blocks before layers N-1, 2N-1, ...), or `None` when it
    holds no gated block.
    """
    indices = set()
    for key in state_dict:
        match = re.search(rf"\.(\d+)\.{GATED_BLOCK}\.", normalize_original_key(key))
        if match is not None:
            indices.add(int(match.group(1)))
    if not indices:
        return None
    interval = min(indices) + 1
    if any((i + 1) % interval for i in indices):
        raise ConversionError(
            f"The gated cross-attention blocks sit before decoder layers {sorted(indices)}, which is not every N-th "
            "layer. Set decoder_layers_attr_name / cross_attn_every_n_layers by hand and check the checkpoint."
        )
    return interval


def original_input_embedding_key(config: OpenFlamingoConfig) -> str:
    """Name of the LM's input embedding in an original state dict (e.g. `lang_encoder.gpt_neox.embed_in.weight`)."""
    spec = _target_spec(config)
    return LM_PREFIX + _unrename_legacy_lm(spec.input_embedding_key, spec.lm_config)


class _Collector:
    """Accumulates converted tensors, their provenance and problems, then checks completeness."""

    def __init__(self, spec: _TargetSpec):
        self.spec = spec
        self.out: dict[str, torch.Tensor] = {}
        self.report = ConversionReport()
        self.problems: list[str] = []

    def put(self, target: str, tensor: torch.Tensor, source: str) -> None:
        if target not in self.spec.shapes:
            self.problems.append(f"{source}: would become '{target}', which the model does not have.")
            return
        if target in self.out:
            self.problems.append(
                f"{source}: '{target}' is already given by {self.report.sources[target]}. Remove one of them."
            )
            return
        expected = self.spec.shapes[target]
        if tuple(tensor.shape) != tuple(expected):
            self.problems.append(
                f"{source}: shape {tuple(tensor.shape)}, but the model's '{target}' has shape {tuple(expected)}."
                + _shape_hint(target, self.spec)
            )
            return
        self.out[target] = tensor
        self.report.sources[target] = [source]


def _shape_hint(target: str, spec: _TargetSpec) -> str:
    if target == "language_model." + spec.input_embedding_key or target.endswith(("lm_head.weight", "embed_out.weight")):
        return (
            " The embedding rows are the vocabulary size: set config.text_config.vocab_size to the number of rows of "
            "the checkpoint's embedding (len(tokenizer) at training time; 50280 for the GPT-NeoX tokenizer with "
            "OpenFlamingo's tokens)."
        )
    if target.startswith("gated_cross_attn_layers."):
        return " The gated blocks' width is the LM's hidden size: check that the config's text_config is the LM the checkpoint was trained on."
    return " Check that the config describes the architecture the checkpoint was trained with."


def _unknown_key_hint(key: str, spec: _TargetSpec) -> str:
    if spec.lm_model_type == "mpt" and re.search(r"\.(ln_1|ln_2|q_ln|k_ln|mlp_up|mlp_down)\.", key):
        return (
            " This looks like a MosaicGPT (MPT-1B) weight, which transformers' MPT does not have: use a text_config of "
            "model_type 'mosaic_gpt' (see openflamingo_hf.releases.get_release_config)."
        )
    return (
        " If the checkpoint was trained with another language model, pass that model's config; if this entry is "
        "not a weight, remove it from the state dict."
    )


def convert_original_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: OpenFlamingoConfig,
    base_state_dict: Mapping[str, torch.Tensor] | None = None,
    return_report: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], ConversionReport]:
    """
    Converts an original `open_flamingo` state dict to the state dict of `OpenFlamingoForConditionalGeneration(config)`.

    Args:
        state_dict: the original state dict: a released trainable-only `checkpoint.pt` or a full state dict, flat or
            as `{"model_state_dict": ...}`; `module.` (DDP) prefixes and `._checkpoint_wrapped_module` are accepted.
        config: the target architecture (e.g. `get_release_config(name)`); its LM's vocabulary size must equal the
            rows of the checkpoint's embeddings.
        base_state_dict: weights *in our layout* (`language_model.*`, `vision_model.*`) for everything a
            trainable-only checkpoint lacks; build it with `base_state_dict_from_backbones(lm, vision)`. Keys the
            checkpoint also holds (its resized embeddings) are taken from the checkpoint.
        return_report: also return a `ConversionReport`.
    Returns:
        The state dict (tensors shared with the inputs, not copied), or `(state dict, report)`.
    Raises:
        ConversionError: listing every source key that has no place, every target key left empty and every shape
            mismatch, with what to do.
    """
    state_dict, skipped = unwrap_checkpoint(state_dict)
    spec = _target_spec(config)
    collector = _Collector(spec)
    collector.report.ignored.update(skipped)

    normalized = _normalize_keys(state_dict, collector)
    duplicates = _place_primary_keys(normalized, spec, config, collector)
    _resolve_duplicates(duplicates, spec, collector)
    if base_state_dict is not None:
        _fill_from_base(base_state_dict, spec, collector)
    _share_tied_weights(spec, collector)
    _check_complete(spec, collector, has_base=base_state_dict is not None)
    # Same order as the model's own state dict.
    result = {k: collector.out[k] for k in spec.shapes}
    return (result, collector.report) if return_report else result


def _normalize_keys(
    state_dict: Mapping[str, torch.Tensor], collector: _Collector
) -> dict[str, tuple[str, torch.Tensor]]:
    """
    Phase 1: `{normalized key: (raw key, tensor)}`. Two raw keys may only collapse onto one name if they hold the
    same tensor (then the second is ignored); otherwise that is a problem.
    """
    normalized: dict[str, tuple[str, torch.Tensor]] = {}
    for raw_key, tensor in state_dict.items():
        key = normalize_original_key(raw_key)
        if key in normalized:
            other_key, other = normalized[key]
            if other.shape != tensor.shape or not torch.equal(other, tensor):
                collector.problems.append(
                    f"'{raw_key}' and '{other_key}' both name '{key}' once wrappers are stripped, with different "
                    "values. Keep one of them."
                )
            else:
                collector.report.ignored[raw_key] = f"same tensor as '{other_key}'"
            continue
        normalized[key] = (raw_key, tensor)
    return normalized


# A duplicate held back until the primary keys are placed: (target, raw source key, tensor).
_Duplicate = tuple[str, str, torch.Tensor]


def _place_primary_keys(
    normalized: dict[str, tuple[str, torch.Tensor]], spec: _TargetSpec, config: OpenFlamingoConfig,
    collector: _Collector,
) -> list[_Duplicate]:
    """
    Phase 2: every primary key into the collector; the duplicates (old_decoder_blocks, gated_cross_attn_layers,
    tied copies) are returned instead, so that phase 3 can compare them with what they duplicate.
    """
    duplicates: list[_Duplicate] = []
    for key, (raw_key, tensor) in normalized.items():
        if key.startswith(VISION_PREFIX):
            targets = _vision_targets(key, raw_key, tensor, spec, collector)
        elif key.startswith("perceiver."):
            target = _map_perceiver(key)
            targets = None if target is None else [target]
        elif key.startswith(LM_PREFIX):
            targets = _lm_targets(key, raw_key, tensor, spec, duplicates)
        else:
            targets = None
        if targets == []:  # placed, held back as a duplicate, or already reported
            continue
        if targets is None or targets[0] not in spec.shapes:
            _report_unplaced(key, raw_key, targets, spec, config, collector)
            continue
        collector.put(targets[0], tensor, raw_key)
    return duplicates


def _vision_targets(
    key: str, raw_key: str, tensor: torch.Tensor, spec: _TargetSpec, collector: _Collector
) -> list[str] | None:
    """An open_clip vision key's target (a list of one), None if it has none, or [] once placed or reported here (a
    fused q/k/v projection is split into its three targets)."""
    if spec.vision_model_type != "clip_vision_model":
        collector.problems.append(
            f"{raw_key}: open_clip vision weights can only be converted to a CLIP vision tower, but the "
            f"config's vision model is '{spec.vision_model_type}'. Use a CLIP vision_config."
        )
        return []
    inner = key[len(VISION_PREFIX) :]
    targets = _map_open_clip_in_proj(inner) or _map_open_clip(inner)
    if targets is not None and len(targets) == 3:
        if tensor.shape[0] % 3:
            collector.problems.append(f"{raw_key}: first dimension {tensor.shape[0]} is not q, k, v stacked.")
            return []
        for target, part in zip(targets, tensor.chunk(3, dim=0)):
            collector.put(target, part, raw_key)
        return []
    return targets


def _lm_targets(
    key: str, raw_key: str, tensor: torch.Tensor, spec: _TargetSpec, duplicates: list[_Duplicate]
) -> list[str] | None:
    """A language-model key's target (a list of one), None if it has none, or [] once held back in `duplicates`."""
    rest = key[len(LM_PREFIX) :]
    layers_prefix = spec.layers_path + "."
    targets = None
    if rest.startswith(OLD_DECODER_BLOCKS + "."):
        index, _, tail = rest[len(OLD_DECODER_BLOCKS) + 1 :].partition(".")
        duplicates.append((_lm_target(f"{spec.layers_path}.{index}.{tail}", spec), raw_key, tensor))
        return []
    if rest.startswith(GATED_BLOCK_LIST + "."):
        index, _, tail = rest[len(GATED_BLOCK_LIST) + 1 :].partition(".")
        target = _map_gated(index, tail)
        if target is not None:
            duplicates.append((target, raw_key, tensor))
            return []
    elif rest.startswith(layers_prefix):
        index, _, tail = rest[len(layers_prefix) :].partition(".")
        part, _, inner = tail.partition(".")
        if part == GATED_BLOCK:
            target = _map_gated(index, inner)
            targets = None if target is None else [target]
        elif part == DECODER_LAYER:
            targets = [_lm_target(f"{spec.layers_path}.{index}.{inner}", spec)]
        else:  # an unwrapped decoder layer (LM saved without the Flamingo wrapper)
            targets = [_lm_target(f"{spec.layers_path}.{index}.{tail}", spec)]
    else:
        targets = [_lm_target(rest, spec)]
        copied = SOURCE_TIED_LM_KEYS.get(spec.lm_model_type, {}).get(targets[0][len("language_model.") :])
        if copied is not None:  # a tied copy: checked equal to (or used as) the weight it copies
            duplicates.append(("language_model." + copied, raw_key, tensor))
            return []
    if targets is not None and targets[0] in spec.tied:
        duplicates.append((targets[0], raw_key, tensor))
        return []
    return targets


def _report_unplaced(key: str, raw_key: str, targets: list[str] | None, spec: _TargetSpec,
                     config: OpenFlamingoConfig, collector: _Collector) -> None:
    """A key with no place in the model: ignored when it is a known non-weight, a problem otherwise."""
    reason = _ignore_reason(key)
    if reason is not None:
        collector.report.ignored[raw_key] = reason
    elif targets is None:
        collector.problems.append(
            f"{raw_key}: not a key of the original OpenFlamingo layout." + _unknown_key_hint(key, spec)
        )
    else:
        collector.problems.append(
            f"{raw_key}: would become '{targets[0]}', which the model does not have."
            + _unknown_key_hint(key, spec)
            + _gated_hint(targets[0], config)
        )


def _resolve_duplicates(duplicates: list[_Duplicate], spec: _TargetSpec, collector: _Collector) -> None:
    """Phase 3: a duplicate equal to what it duplicates is ignored; the only copy is used; a different one is a
    problem."""
    for target, raw_key, tensor in duplicates:
        reference_key = spec.tied.get(target, target)
        if reference_key in collector.out:
            reference = collector.out[reference_key]
            if reference.shape == tensor.shape and torch.equal(reference, tensor):
                collector.report.ignored[raw_key] = f"duplicate of {collector.report.sources[reference_key]} (equal)"
            else:
                collector.problems.append(
                    f"{raw_key}: duplicates {collector.report.sources[reference_key]} but holds different values. The "
                    "state dict is inconsistent; re-export it from the original model."
                )
        elif target in spec.tied:
            collector.put(reference_key, tensor, raw_key)  # the only copy of a tied pair
        else:
            collector.put(target, tensor, raw_key)


def _fill_from_base(base_state_dict: Mapping[str, torch.Tensor], spec: _TargetSpec, collector: _Collector) -> None:
    """Phase 4: base weights for what the checkpoint does not hold (what it holds wins)."""
    base = _rename_base(base_state_dict, spec, collector)
    tied_copies = {
        "language_model." + k: "language_model." + v for k, v in SOURCE_TIED_LM_KEYS.get(spec.lm_model_type, {}).items()
    }
    for key, (label, tensor) in base.items():
        if key in tied_copies and key not in spec.shapes:
            _base_tied_copy(label, tensor, tied_copies[key], base, collector)
        elif key in spec.tied:
            reference = base.get(spec.tied[key])
            reference = None if reference is None else reference[1]
            if reference is not None and (reference.shape != tensor.shape or not torch.equal(reference, tensor)):
                collector.problems.append(
                    f"{label}: tied to '{spec.tied[key]}' in the model, but the base holds different values. The "
                    "config ties these weights but the base model does not: fix tie_word_embeddings."
                )
            else:
                collector.report.ignored[label] = f"tied to '{spec.tied[key]}'"
        elif key in collector.out:
            collector.report.ignored[label] = f"overridden by the checkpoint's {collector.report.sources[key]}"
        elif key not in spec.shapes:
            collector.problems.append(
                f"{label}: the model has no such weight. base_state_dict must use our layout (keys under "
                "'language_model.' / 'vision_model.' as built by base_state_dict_from_backbones) and match the config."
            )
        else:
            collector.put(key, tensor, label)


def _base_tied_copy(label: str, tensor: torch.Tensor, reference_key: str,
                    base: dict[str, tuple[str, torch.Tensor]], collector: _Collector) -> None:
    """A base weight that the source model keeps as a copy of `reference_key` (its tied output head), which our model
    has no key for: used when it is the only copy, ignored when equal, a problem when different."""
    reference = base.get(reference_key)
    if reference is None:
        if reference_key not in collector.out:
            collector.put(reference_key, tensor, label)  # the only copy of a tied pair
        else:
            collector.report.ignored[label] = f"tied copy of '{reference_key}'"
    elif reference[1].shape != tensor.shape or not torch.equal(reference[1], tensor):
        collector.problems.append(
            f"{label}: a copy of '{reference[0]}' in a tied model, but it holds different values. The "
            "model ties its output projection to the input embedding: this base is not such a model."
        )
    else:
        collector.report.ignored[label] = f"tied copy of {reference[0]}"


def _share_tied_weights(spec: _TargetSpec, collector: _Collector) -> None:
    """Phase 5: tied weights share their source's tensor."""
    for target, reference_key in spec.tied.items():
        if reference_key in collector.out and target not in collector.out:
            collector.out[target] = collector.out[reference_key]
            collector.report.sources[target] = ["tied:" + reference_key]


def _check_complete(spec: _TargetSpec, collector: _Collector, has_base: bool) -> None:
    """Every model weight has a source, and nothing went wrong; otherwise one `ConversionError` lists the problems."""
    missing = [k for k in spec.shapes if k not in collector.out]
    if missing:
        kinds = sorted({k.split(".")[0] for k in missing})
        hint = (
            " The checkpoint is trainable-only (the released checkpoint.pt holds only the Perceiver, gated blocks and "
            "embeddings): pass base_state_dict=base_state_dict_from_backbones(language_model, vision_model)."
            if not has_base and set(kinds) <= {"language_model", "vision_model"}
            else " Give these weights in the checkpoint or in base_state_dict."
        )
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        # First, so that it is never cut off: it is one line however many weights are missing.
        collector.problems.insert(0, f"No source for {len(missing)} model weights ({', '.join(kinds)}): {shown}.{hint}")

    if collector.problems:
        # A wrong architecture produces one problem per weight: show enough to see the pattern, not thousands.
        shown = collector.problems[:MAX_PROBLEMS_SHOWN]
        more = len(collector.problems) - len(shown)
        raise ConversionError(
            f"Cannot convert the state dict ({len(collector.problems)} problems):\n- "
            + "\n- ".join(shown)
            + (f"\n- ... and {more} more of the same kind." if more else "")
        )


def _rename_base(
    base_state_dict: Mapping[str, torch.Tensor], spec: _TargetSpec, collector: _Collector
) -> dict[str, tuple[str, torch.Tensor]]:
    """
    Base keys -> `{our key: ("base:" + key, tensor)}`: the LM's keys go through the same renames as the checkpoint's
    (a transformers `MptForCausalLM` base for a MosaicGPT target). Two base keys may not name one weight.
    """
    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in base_state_dict.items():
        target = _lm_target(key[len("language_model.") :], spec) if key.startswith("language_model.") else key
        if target in renamed:
            collector.problems.append(
                f"base:{key} and {renamed[target][0]} both name '{target}'. Give the base in one layout only."
            )
            continue
        renamed[target] = ("base:" + key, tensor)
    return renamed


def _ignore_reason(key: str) -> str | None:
    for pattern, reason in IGNORED_SOURCE_PATTERNS:
        if pattern.match(key):
            return reason
    return None


def _gated_hint(target: str, config: OpenFlamingoConfig) -> str:
    match = re.match(r"gated_cross_attn_layers\.(\d+)\.", target)
    if match is None:
        return ""
    return (
        f" The checkpoint has a gated block before decoder layer {match.group(1)}, but cross_attn_every_n_layers="
        f"{config.cross_attn_every_n_layers} puts none there: set cross_attn_every_n_layers to the checkpoint's "
        "interval (infer_cross_attn_every_n_layers(state_dict))."
    )


def base_state_dict_from_backbones(
    language_model: nn.Module | Mapping[str, torch.Tensor] | None = None,
    vision_model: nn.Module | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """
    The frozen backbones' weights in our layout, to complete a trainable-only checkpoint.

    Args:
        language_model: the standalone causal LM (e.g. `AutoModelForCausalLM.from_pretrained(release.language_model)`)
            or its state dict.
        vision_model: the vision tower (`CLIPVisionModel`), a composite model holding one (`CLIPModel`, whose
            tower is extracted), or the tower's state dict.
    Returns:
        `{"language_model." + key: tensor, "vision_model." + key: tensor}`
    """
    base: dict[str, torch.Tensor] = {}
    if language_model is not None:
        lm_state = language_model.state_dict() if isinstance(language_model, nn.Module) else language_model
        base.update({"language_model." + k: v for k, v in lm_state.items()})
    if vision_model is not None:
        if isinstance(vision_model, nn.Module):
            if getattr(vision_model.config, "vision_config", None) is not None:
                vision_model = _extract_vision_tower(vision_model)
            vision_state = vision_model.state_dict()
        else:
            vision_state = vision_model
        base.update({"vision_model." + k: v for k, v in vision_state.items()})
    return base


# ----------------------------------------------------------------------------------------------------------------------
# Export, ours -> original
# ----------------------------------------------------------------------------------------------------------------------


def _export_perceiver(key: str) -> str:
    match = re.fullmatch(r"perceiver\.layers\.(\d+)\.(attn|ff)\.(.+)", key)
    if match is None:
        return key  # latents, norm, frame_embs, media_time_embs keep their names
    layer, part, tail = match.groups()
    if part == "attn":
        return f"perceiver.layers.{layer}.0.{tail}"
    module, _, kind = tail.partition(".")
    return f"perceiver.layers.{layer}.1.{_FF_OURS_TO_ORIGINAL[module]}.{kind}"


def _export_gated_tail(tail: str) -> str:
    parts = tail.split(".")
    if parts[0] == "ff":
        return ".".join(["ff", _FF_OURS_TO_ORIGINAL[parts[1]], *parts[2:]])
    return tail


def _export_open_clip(vision_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    block_names = {v: k for k, v in _OPEN_CLIP_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in vision_state.items():
        if key in top:
            out[VISION_PREFIX + top[key]] = tensor
            continue
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if match is None:
            raise ConversionError(f"vision_model.{key}: no open_clip equivalent; export with full=False.")
        block, module, kind = match.groups()
        projection = re.fullmatch(r"self_attn\.([qkv])_proj", module)
        if projection is not None:
            qkv.setdefault((block, kind), {})[projection.group(1)] = tensor
        elif module in block_names:
            out[f"{VISION_PREFIX}transformer.resblocks.{block}.{block_names[module]}.{kind}"] = tensor
        else:
            raise ConversionError(f"vision_model.{key}: no open_clip equivalent; export with full=False.")
    for (block, kind), parts in qkv.items():
        out[f"{VISION_PREFIX}transformer.resblocks.{block}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


def export_original_state_dict(
    model: OpenFlamingoForConditionalGeneration,
    full: bool = False,
    vision_projection: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """
    The model's weights in the original `open_flamingo` layout (inverse of `convert_original_state_dict`).

    Args:
        model: the model to export.
        full: `False` gives the layout of a released `checkpoint.pt` (Perceiver, gated blocks under the wrapped
            decoder-layer names, and the LM parameters the original saved although frozen: the input embedding and
            every name containing "embed", e.g. GPT-NeoX's `embed_out`). `True` gives the original model's whole
            `state_dict()`: also every LM weight (decoder layers under `<layers>.{i}.decoder_layer.`), the duplicates
            `lang_encoder.old_decoder_blocks.*` and `lang_encoder.gated_cross_attn_layers.*`, and the vision tower
            as open_clip keys (CLIP vision towers only). Weights tied to another (an MPT `lm_head`) are not written,
            as in the original MPT models, which have no `lm_head`.
        vision_projection: with `full=True`, open_clip's `proj` ((width, embed_dim), i.e. `CLIPModel.
            visual_projection.weight.T`) to include; our model does not hold it, so it is left out by default.
    Returns:
        A flat state dict; duplicated entries share tensors, as in the original.
    """
    config = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    layers_path, _ = find_decoder_layers(model.language_model, config.decoder_layers_attr_name)
    lm = model.language_model
    input_embedding = _parameter_name(lm, lm.get_input_embeddings().weight)
    layers_prefix = f"language_model.{layers_path}."

    out: dict[str, torch.Tensor] = {}
    if full:
        if model.vision_model.config.model_type != "clip_vision_model":
            raise ConversionError(
                f"full=True writes the vision tower as open_clip keys, which exist only for CLIP vision towers (this "
                f"one is '{model.vision_model.config.model_type}'). Use full=False."
            )
        vision_state = {k[len("vision_model.") :]: v for k, v in state.items() if k.startswith("vision_model.")}
        out.update(_export_open_clip(vision_state))
        if vision_projection is not None:
            out[VISION_PREFIX + "proj"] = vision_projection.detach()

    for key, tensor in state.items():
        if key.startswith("perceiver."):
            out[_export_perceiver(key)] = tensor
        elif key.startswith("gated_cross_attn_layers."):
            index, _, tail = key[len("gated_cross_attn_layers.") :].partition(".")
            tail = _export_gated_tail(tail)
            out[f"{LM_PREFIX}{layers_path}.{index}.{GATED_BLOCK}.{tail}"] = tensor
            if full:
                out[f"{LM_PREFIX}{GATED_BLOCK_LIST}.{index}.{tail}"] = tensor
        elif key.startswith("language_model."):
            if key in tied:
                continue
            lm_key = key[len("language_model.") :]
            original = _unrename_legacy_lm(lm_key, lm.config)
            if not full and lm_key != input_embedding and "embed" not in original:
                continue
            if key.startswith(layers_prefix):
                index, _, tail = original[len(layers_path) + 1 :].partition(".")
                out[f"{LM_PREFIX}{layers_path}.{index}.{DECODER_LAYER}.{tail}"] = tensor
                if full:
                    out[f"{LM_PREFIX}{OLD_DECODER_BLOCKS}.{index}.{tail}"] = tensor
            else:
                out[LM_PREFIX + original] = tensor
    return out


__all__ = [
    "IGNORED_SOURCE_PATTERNS",
    "LEGACY_LM_RENAMES",
    "LM_KEY_MAPPINGS",
    "SOURCE_TIED_LM_KEYS",
    "ConversionError",
    "ConversionReport",
    "base_state_dict_from_backbones",
    "convert_original_state_dict",
    "export_original_state_dict",
    "infer_cross_attn_every_n_layers",
    "normalize_original_key",
    "original_input_embedding_key",
    "unwrap_checkpoint",
]
