"""OpenFlamingo as a native Hugging Face transformers model.

Importing this package registers the OpenFlamingo classes with the transformers Auto classes (`AutoConfig`,
`AutoModel` (the headless `OpenFlamingoModel`), `AutoModelForImageTextToText`, `AutoProcessor`) and the MPT-1B
("MosaicGPT") language model with `AutoConfig` / `AutoModelForCausalLM`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .modeling.configuration_mosaic_gpt import MosaicGPTConfig
from .modeling.configuration_openflamingo import OpenFlamingoConfig
from .modeling.modeling_mosaic_gpt import MosaicGPTForCausalLM, MosaicGPTModel
from .modeling.modeling_openflamingo import (
    GatedCrossAttentionBlock,
    OpenFlamingoForConditionalGeneration,
    OpenFlamingoMediaCache,
    OpenFlamingoModel,
    OpenFlamingoPerceiverResampler,
    OpenFlamingoPreTrainedModel,
    decode_compile_config,
    find_decoder_layers,
)
from .processing.processing_openflamingo import OpenFlamingoProcessor
from .hub import export_for_hub

AutoConfig.register("openflamingo", OpenFlamingoConfig, exist_ok=True)
AutoModel.register(OpenFlamingoConfig, OpenFlamingoModel, exist_ok=True)
AutoModelForImageTextToText.register(OpenFlamingoConfig, OpenFlamingoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(OpenFlamingoConfig, OpenFlamingoProcessor, exist_ok=True)

__all__ = [
    "GatedCrossAttentionBlock",
    "MosaicGPTConfig",
    "MosaicGPTForCausalLM",
    "MosaicGPTModel",
    "OpenFlamingoConfig",
    "OpenFlamingoForConditionalGeneration",
    "OpenFlamingoMediaCache",
    "OpenFlamingoModel",
    "OpenFlamingoPerceiverResampler",
    "OpenFlamingoPreTrainedModel",
    "OpenFlamingoProcessor",
    "decode_compile_config",
    "export_for_hub",
    "find_decoder_layers",
]
__version__ = "0.1.0"
