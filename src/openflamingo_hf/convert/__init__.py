"""Conversion of the original `open_flamingo` checkpoints (and back); the command `openflamingo-convert` is
`openflamingo_hf.cli.convert`."""

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
from .release_conversion import ConversionInputError, ConversionSettings, convert_checkpoint

__all__ = [
    "ConversionError",
    "ConversionInputError",
    "ConversionReport",
    "ConversionSettings",
    "base_state_dict_from_backbones",
    "convert_checkpoint",
    "convert_original_state_dict",
    "export_original_state_dict",
    "infer_cross_attn_every_n_layers",
    "normalize_original_key",
    "original_input_embedding_key",
    "unwrap_checkpoint",
]
