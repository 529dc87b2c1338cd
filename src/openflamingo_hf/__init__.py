"""OpenFlamingo as a native Hugging Face transformers model.

Importing this package registers the OpenFlamingo classes with the transformers Auto classes
(`AutoConfig`, `AutoModelForImageTextToText`).
"""

from transformers import AutoConfig, AutoModelForImageTextToText

from .modeling.configuration_openflamingo import OpenFlamingoConfig
from .modeling.modeling_openflamingo import (
    GatedCrossAttentionBlock,
    OpenFlamingoForConditionalGeneration,
    OpenFlamingoMediaCache,
    OpenFlamingoPerceiverResampler,
    OpenFlamingoPreTrainedModel,
    find_decoder_layers,
)

AutoConfig.register("openflamingo", OpenFlamingoConfig, exist_ok=True)
AutoModelForImageTextToText.register(OpenFlamingoConfig, OpenFlamingoForConditionalGeneration, exist_ok=True)

__all__ = [
    "GatedCrossAttentionBlock",
    "OpenFlamingoConfig",
    "OpenFlamingoForConditionalGeneration",
    "OpenFlamingoMediaCache",
    "OpenFlamingoPerceiverResampler",
    "OpenFlamingoPreTrainedModel",
    "find_decoder_layers",
]
__version__ = "0.1.0"
