"""Conversion of the original `open_flamingo` checkpoints (and back); the `openflamingo-convert` CLI is in `cli`."""

from .convert_original import (
    ConversionError,
    ConversionReport,
    base_state_dict_from_backbones,
    convert_original_state_dict,
    export_original_state_dict,
    infer_cross_attn_every_n_layers,
    normalize_original_key,
    original_input_embedding_key,
    unwrap_checkpoint,
)

__all__ = [
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
