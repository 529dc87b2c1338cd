"""OpenFlamingo as a native Hugging Face transformers model.

Importing this package registers the OpenFlamingo classes with the transformers Auto classes
(`AutoConfig`, `AutoModelForImageTextToText`) and the MPT-1B ("MosaicGPT") language model
with `AutoConfig` / `AutoModelForCausalLM`.
"""

from transformers import AutoConfig, AutoModelForImageTextToText

from .modeling.configuration_mosaic_gpt import MosaicGPTConfig
from .modeling.configuration_openflamingo import OpenFlamingoConfig
from .modeling.modeling_mosaic_gpt import MosaicGPTForCausalLM, MosaicGPTModel
from .modeling.modeling_mosaic_gpt import register as _register_mosaic_gpt
from .modeling.modeling_openflamingo import (
    GatedCrossAttentionBlock,
    OpenFlamingoForConditionalGeneration,
    OpenFlamingoMediaCache,
    OpenFlamingoPerceiverResampler,
    OpenFlamingoPreTrainedModel,
    find_decoder_layers,
)

_register_mosaic_gpt()  # MPT-1B of the 3B releases: AutoConfig "mosaic_gpt" + AutoModelForCausalLM
AutoConfig.register("openflamingo", OpenFlamingoConfig, exist_ok=True)
AutoModelForImageTextToText.register(OpenFlamingoConfig, OpenFlamingoForConditionalGeneration, exist_ok=True)

__all__ = [
    "GatedCrossAttentionBlock",
    "MosaicGPTConfig",
    "MosaicGPTForCausalLM",
    "MosaicGPTModel",
    "OpenFlamingoConfig",
    "OpenFlamingoForConditionalGeneration",
    "OpenFlamingoMediaCache",
    "OpenFlamingoPerceiverResampler",
    "OpenFlamingoPreTrainedModel",
    "find_decoder_layers",
]
__version__ = "0.1.0"
